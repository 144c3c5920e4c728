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
