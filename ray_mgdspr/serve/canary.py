"""The recall canary, Ray-free: the exact reference search of a shard's Faiss index, the recall@k of the ANN's merged
top k against the exact merged top k, and the running window of samples.

A share of live requests (``serve.canary_share``) is searched again in the background by every shard of the
serving version, at ``serve.canary_k``, with the serving parameters (the ANN) and exhaustively (the reference:
``ShardSearcher.canary`` in ``serve/engine.py``); the ingress merges each side across shards and records their
overlap (``serve/ingress.py``). The reference reuses the serving index, so it costs no second copy in memory:

- **IVF** (``IVF{nlist},...``): the same index probing every list (``nprobe = nlist``, passed per call as
  ``faiss.SearchParametersIVF``, so concurrent live searches keep their ``nprobe``). Exact for ``IVF..,Flat``; for
  quantised codes (``IVF..,PQ..``) the reference ranks by the same codes, so the canary isolates the probing loss,
  not the quantisation loss.
- **HNSW**: the same graph with ``efSearch = serve.canary_ef_search`` (4,096): near-exact, not exact.
- **Flat** and the ``torch`` backend: exact already; the canary still measures them (recall 1.0 by construction,
  up to ties at the k-th score).
- anything else (``PQ`` without IVF, ``faiss-gpu`` shards): the reference is the index as served, recall 1.0 by
  construction: ``reference`` says ``as-served``, so nobody reads it as a measurement.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from ray_mgdspr.index.search import merge_topk

EXACT, ALL_LISTS, AS_SERVED = "exact", "all-lists", "as-served"
MAX_IN_FLIGHT = 8
"""Canary samples one ingress replica runs at once; a sample drawn beyond that is skipped (counted), so that an
overloaded endpoint does not pile up background searches."""


def exact_params(index: faiss.Index, ef_search: int, k: int) -> tuple[Any, str, list[Any]]:
    """The search parameters that make ``index`` (a shard's ``IndexIDMap2``) search exhaustively, and what the
    reference then is (``EXACT``, ``ALL_LISTS``, ``hnsw-ef<N>`` or ``AS_SERVED``; see the module docstring).

    Returns:
        params for ``index.search(..., params=params)`` (None: search it as it is), the reference's name, and the
        parameter objects ``params`` points to (SWIG does not keep them alive: hold them while searching).
    """
    wrapped = index.index if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    inner = faiss.downcast_index(wrapped)
    pre = None
    if isinstance(inner, faiss.IndexPreTransform):  # PCA / OPQ before the index: the transform stays in both
        pre, inner = inner, faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        params, reference = faiss.SearchParametersIVF(nprobe=inner.nlist), ALL_LISTS
    elif isinstance(inner, faiss.IndexHNSW):
        ef = max(ef_search, k)
        params, reference = faiss.SearchParametersHNSW(efSearch=ef), f"hnsw-ef{ef}"
    elif isinstance(inner, faiss.IndexFlat):
        return None, EXACT, []
    else:
        return None, AS_SERVED, []
    if pre is None:
        return params, reference, [params]
    outer = faiss.SearchParametersPreTransform(index_params=params)
    return outer, reference, [outer, params]


def recall_at_k(ann_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """|ANN top k ∩ exact top k| / |exact top k| of one query (-1 pads ignored); NaN when the exact side is empty."""
    exact = set(exact_ids[exact_ids >= 0].tolist())
    if not exact:
        return math.nan
    return len(exact & set(ann_ids[ann_ids >= 0].tolist())) / len(exact)


def merged_recall(ann: list[tuple[np.ndarray, np.ndarray]], exact: list[tuple[np.ndarray, np.ndarray]], k: int
                  ) -> np.ndarray:
    """Recall@k per query of the ANN's global top k against the exact global top k.

    Args:
        ann, exact: per shard, scores (q, k_s) and item ids (q, k_s), as ``Shard.search`` returns them; each side
            is merged across shards as serving merges (``merge_topk``) before comparing.

    Returns:
        (q,) float64, NaN for a query whose exact top k is empty.
    """
    _, ann_ids = merge_topk(ann, k)
    _, exact_ids = merge_topk(exact, k)
    return np.array([recall_at_k(a, e) for a, e in zip(ann_ids, exact_ids, strict=True)])


@dataclass(frozen=True)
class CanaryHits:
    """One shard's answer to a canary query: its ANN top k as served and its reference top k."""

    ann: tuple[np.ndarray, np.ndarray]  # scores (q, k), item ids (q, k)
    exact: tuple[np.ndarray, np.ndarray]
    reference: str


class RecallWindow:
    """The running recall of one version: the mean of the last ``size`` samples."""

    def __init__(self, size: int) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self.total = 0  # samples ever added
        self.updated_at: float | None = None
        self.reference: str | None = None

    def add(self, recall: float, reference: str | None = None) -> float:
        """Record a sample; returns the running recall."""
        self.samples.append(float(recall))
        self.total += 1
        self.updated_at = time.time()
        self.reference = reference or self.reference
        return self.recall

    @property
    def recall(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else math.nan

    def summary(self, k: int) -> dict[str, Any]:
        """What ``GET /v1/version`` shows of it (``schemas.CanaryRecall``)."""
        return {"k": k, "recall": round(self.recall, 4) if self.samples else None, "window": len(self.samples),
                "samples": self.total, "reference": self.reference, "updated_at": self.updated_at}
