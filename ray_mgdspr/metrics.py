"""Retrieval metrics over top-K result lists (spec §6.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(topk: np.ndarray, targets: Sequence[np.ndarray], k: int | None = None) -> float:
    """Mean over events of |top-K ∩ T| / |T| (spec §6.1), T = the event's clicked or bought items.

    Args:
        topk: (E, K') retrieved item ids per event, best first (K' >= k); -1 pads a short list.
        targets: E arrays of target item ids (each non-empty, no duplicates).
        k: cut-off (default K').

    Example:
        >>> recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), [np.array([2, 9]), np.array([7])], k=2)
        0.25
    """
    if len(targets) != len(topk):
        raise ValueError(f"{len(topk)} result lists but {len(targets)} target sets")
    k = topk.shape[1] if k is None else k
    lengths = np.array([len(t) for t in targets])
    if (lengths == 0).any():
        raise ValueError(f"event {int(np.argmax(lengths == 0))} has no targets")
    event = np.repeat(np.arange(len(targets)), lengths)
    flat = np.concatenate(targets).astype(np.int64)
    hits = np.isin(_keys(event, flat), _keys(np.arange(len(topk))[:, None], topk[:, :k]).ravel())
    per_event = np.bincount(event, weights=hits, minlength=len(targets)) / lengths
    return float(per_event.mean())


def _keys(event: np.ndarray, item: np.ndarray) -> np.ndarray:
    """One int per (event, item) pair, so membership per event is a single vectorised ``isin``."""
    return (np.asarray(event, np.int64) << 40) + np.asarray(item, np.int64)


def p_good_at_k(grades: np.ndarray, k: int, min_grade: int = 1) -> float:
    """P_good (spec §6.1): mean over queries of the share of the top-K whose grade is at least ``min_grade``.

    Missing results (pads) and unjudged items count as not good: the share is over K slots, as the paper's
    share of the retrieved top-K.

    Args:
        grades: (Q, K') graded relevance of each retrieved slot, best first (K' >= k); -1 for a pad or an
            unjudged item.
        k: cut-off.
        min_grade: the lowest grade that counts as relevant.

    Example:
        >>> p_good_at_k(np.array([[2, 0, 1], [0, -1, -1]]), k=2)
        0.25
    """
    _check_k(grades, k)
    return float((grades[:, :k] >= min_grade).mean()) if len(grades) else 0.0


def pass_count_at_k(passes: np.ndarray, k: int) -> float:
    """Mean number of the top-K that pass the relevance filter (the offline stand-in for Num_prank, spec §9.10).

    Args:
        passes: (Q, K') bool, whether each retrieved slot passes its query's filter (pads: False).
        k: cut-off.

    Example:
        >>> pass_count_at_k(np.array([[True, False, True], [True, True, False]]), k=2)
        1.5
    """
    _check_k(passes, k)
    return float(passes[:, :k].sum(axis=1).mean()) if len(passes) else 0.0


def topk_overlap(reference: np.ndarray, approx: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-K ∩ reference top-K| / K: how much of the exact top-K an ANN index keeps.

    Args:
        reference, approx: (Q, K') item ids best first; -1 pads never match.
        k: cut-off.

    Example:
        >>> topk_overlap(np.array([[1, 2, 3, 4]]), np.array([[2, 1, 9, -1]]), k=4)
        0.5
    """
    _check_k(reference, k)
    _check_k(approx, k)
    ref = np.where(reference[:, :k] >= 0, reference[:, :k], -2)  # pads of the two lists never pair up
    rows = np.arange(len(ref))[:, None]
    hits = np.isin(_keys(rows, approx[:, :k]), _keys(rows, ref).ravel()) & (approx[:, :k] >= 0)
    return float(hits.sum(axis=1).mean() / k) if len(ref) else 0.0


def judged_grades(judged: dict[int, dict[int, int]], query_ids: Sequence[int], topk: np.ndarray) -> np.ndarray:
    """Grades of retrieved items from graded judgements (real data sets: ESCI, WANDS).

    Args:
        judged: query id -> {item id: grade} (``judgement_maps``).
        query_ids: (Q,) the query of each result row.
        topk: (Q, K) retrieved item ids, -1 pads.

    Returns:
        (Q, K) int8: the judged grade, -1 for unjudged items and pads (they count as not relevant).
    """
    out = np.full(topk.shape, -1, np.int8)
    for r, q in enumerate(query_ids):
        grades = judged.get(int(q), {})
        out[r] = [grades.get(int(i), -1) for i in topk[r]]
    return out


def judgement_maps(query_id: np.ndarray, item_id: np.ndarray, grade: np.ndarray) -> dict[int, dict[int, int]]:
    """query id -> {item id: grade} from the columns of a ``judgements`` table."""
    out: dict[int, dict[int, int]] = {}
    for q, i, g in zip(query_id.tolist(), item_id.tolist(), grade.tolist(), strict=True):
        out.setdefault(q, {})[i] = g
    return out


def relevant_items(judged: dict[int, dict[int, int]], query_ids: Sequence[int], min_grade: int) -> list[np.ndarray]:
    """The items judged at least ``min_grade`` for each query: the target sets of Recall@K on judged data."""
    return [np.array([i for i, g in judged.get(int(q), {}).items() if g >= min_grade], np.int64) for q in query_ids]


def _check_k(a: np.ndarray, k: int) -> None:
    if a.ndim != 2:
        raise ValueError(f"expected a (queries, K) array, got shape {a.shape}")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k={k} outside 1..{a.shape[1]} (the result lists hold {a.shape[1]} slots)")
