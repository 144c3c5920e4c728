"""Search an index version: one shard (a serving replica's share) or all shards merged (``IndexReader``).

Backends, each behind ``Shard.search(queries, k) -> (scores, item_ids)``:

- ``faiss-cpu``: the shard's Faiss index as built (IVF ``nprobe`` and HNSW ``efSearch`` set at load); an IVF
  search at least as deep as its probed lists hold ranks all they hold, score then item id (``_FaissSearcher``).
- ``faiss-gpu``: the same index copied to GPU 0; needs a faiss build with GPU support.
- ``torch``: exact inner-product search, matmul + top-k, on CUDA when a GPU is visible (else CPU).
  It reads the shard's float vectors back from Faiss, so it takes shards that store them uncompressed
  (Flat, HNSW..,Flat, IVF..,Flat); on PQ shards it refuses rather than rank by decoded approximations.

Scores are inner products, larger is better. A shard with fewer than k items pads with id -1 and
score -inf, and ``merge_topk`` sorts the pads last.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import pyarrow as pa

from ray_mgdspr.arrays import sorted_lookup
from ray_mgdspr.config import IndexConfig
from ray_mgdspr.index.manifest import read_manifest
from ray_mgdspr.index.shards import read_shard, shard_of
from ray_mgdspr.index.versions import current_version

log = logging.getLogger(__name__)

Backend = Literal["faiss-cpu", "faiss-gpu", "torch"]
BACKENDS: tuple[Backend, ...] = ("faiss-cpu", "faiss-gpu", "torch")
_DEFAULTS = IndexConfig()
_TORCH_SCORE_FLOATS = 1 << 26  # scores per torch matmul (query rows x shard rows): 256 MiB of float32
_PAD_KEY = 2**32 - 1  # top_order: the id part of a pad's key, after every real id
DENSE_IDS = 16  # Shard.lookup_rows gathers from an id -> row table when the id range is at most this x the rows


def torch_sees_cuda() -> bool:
    """Whether torch sees a GPU. Torch is imported only to ask (it is not at the top of this module: a process
    that only routes requests, or a shard replica on faiss, never loads it: ~1.3 s and ~180 MiB), and not at all
    when the installed torch is a CPU-only build (its version's local part is ``+cpu``), which never sees one."""
    try:
        if importlib.metadata.version("torch").endswith("+cpu"):
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str = "auto") -> Backend:
    """The backend ``name`` stands for on this machine; ``auto`` logs why it chose what it chose.

    auto: faiss-gpu when faiss has GPU support (it then sees a GPU), else torch when CUDA is visible
    (exact search on the GPU beats faiss on the CPU), else faiss-cpu.

    Raises:
        ValueError: an unknown name, or faiss-gpu on a machine where faiss sees no GPU.
    """
    if name == "auto":
        if faiss.get_num_gpus() > 0:
            chosen, why = "faiss-gpu", f"faiss sees {faiss.get_num_gpus()} GPU(s)"
        elif torch_sees_cuda():
            chosen, why = "torch", "a GPU is visible but this faiss has no GPU support"
        else:
            chosen, why = "faiss-cpu", "no GPU is visible"
        log.info("index backend auto -> %s (%s)", chosen, why)
        return chosen
    if name not in BACKENDS:
        raise ValueError(f"unknown index backend {name!r}; choose auto or one of {list(BACKENDS)}")
    if name == "faiss-gpu" and faiss.get_num_gpus() == 0:
        raise ValueError("backend 'faiss-gpu': this faiss sees no GPU (faiss-cpu build, or no GPU visible); "
                         "install the gpu extra (faiss-gpu-cu12) on a CUDA 12 machine, or use 'torch' or 'faiss-cpu'")
    return name


class Shard:
    """One loaded shard of an index version: search it, look up its items' metadata.

    Attributes:
        shard_no: s; the shard holds the items with ``shard_of(item_id, S) == s``.
        backend: the concrete backend searching it.
        dim: d of the vectors (and of the queries).
        metadata: one row per item (``shards.METADATA_SCHEMA``).
    """

    def __init__(self, shard_no: int, backend: Backend, dim: int, metadata: pa.Table,
                 searcher: _FaissSearcher | _TorchSearcher) -> None:
        self.shard_no, self.backend, self.dim, self.metadata = shard_no, backend, dim, metadata
        self._searcher = searcher
        ids = metadata["item_id"].to_numpy()
        self._order = np.argsort(ids)
        self._sorted_ids = ids[self._order]
        # id -> row as one gather when the ids are dense enough (a shard of S holds about 1/S of an id range:
        # 4 S bytes per item, against d x 4 for its vector); a binary search per id otherwise. A deep filtered
        # search looks up thousands of ids per request (issue 16's 1M-item profile: 2.6 ms of binary searches)
        self._base, self._row_of = 0, None
        if len(ids) and (span := int(self._sorted_ids[-1]) - int(self._sorted_ids[0]) + 1) <= DENSE_IDS * len(ids):
            self._base = int(self._sorted_ids[0])
            self._row_of = np.full(span, -1, np.int32 if len(ids) < 2**31 else np.int64)
            self._row_of[ids - self._base] = np.arange(len(ids))

    @property
    def rows(self) -> int:
        return self.metadata.num_rows

    @property
    def faiss_index(self) -> faiss.Index | None:
        """The Faiss index this shard searches (faiss backends), for searches with other parameters (the recall
        canary's exhaustive reference); None for the torch backend, which searches exactly."""
        return getattr(self._searcher, "index", None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of this shard per query.

        Args:
            queries: (q, d) float32 query embeddings.
            k: results per query, >= 1.

        Returns:
            scores (q, k) float32, best first (-inf pads), and item_ids (q, k) int64 (-1 pads).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (q, {self.dim}); got {queries.shape}")
        scores, ids = self._searcher(queries, k)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX; one pad value for every backend
        return scores, ids

    def lookup(self, item_ids: np.ndarray) -> pa.Table:
        """Metadata rows of ``item_ids`` (n,), in that order.

        Raises:
            KeyError: an id that is not in this shard (-1 pads included: drop them first).
        """
        return self.metadata.take(self.lookup_rows(item_ids))

    def lookup_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row numbers in ``metadata`` of ``item_ids`` (n,), in that order (raises as ``lookup``)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if self._row_of is not None:
            at = ids - self._base
            inside = (at >= 0) & (at < len(self._row_of))
            rows = self._row_of[np.where(inside, at, 0)]
            found = inside & (rows >= 0)
            if found.all():
                return rows.astype(np.int64)
        else:
            pos, found = sorted_lookup(self._sorted_ids, ids)
            if found.all():
                return self._order[pos]
        raise KeyError(f"shard {self.shard_no}: item ids not in this shard: {ids[~found][:5].tolist()}")


class _FaissSearcher:
    """A Faiss index's search. On the CPU, an inner-product IVF index asked for at least as many hits as its probed
    lists hold on average (``deep_from``) returns every vector those lists hold, ranked by score and then item id
    (as ``top_order`` ranks), from one ``range_search``: Faiss's ``search`` keeps a heap of k entries per query and
    pushes every scanned vector into it, which is what a filtered request's depth costs. On the ``large`` preset's
    shards (250k items, ``IVF1024,Flat``, nprobe 16, ~3,900 vectors probed) the 4 shards' search at depth 9,600 took
    p50 3.6 against 6.7 ms; the hits are the same, ties in id order (``benchmarks/deep_search.py``;
    ``docs/serving.md``, "Deep searches")."""

    def __init__(self, index: faiss.Index, resources: object = None) -> None:
        self.index = index
        self._resources = resources  # a GPU index is only valid while its StandardGpuResources lives
        inner = faiss.downcast_index(index.index) if resources is None and isinstance(index, faiss.IndexIDMap) \
            else None
        self._ivf: faiss.IndexIVF | None = inner if isinstance(inner, faiss.IndexIVF) \
            and inner.metric_type == faiss.METRIC_INNER_PRODUCT else None

    @property
    def deep_from(self) -> float:
        """The k from which an IVF search returns all its probed lists hold: what nprobe of them hold on average
        (inf for other indexes)."""
        ivf = self._ivf
        if ivf is None or ivf.nlist == 0:
            return float("inf")
        return min(ivf.nprobe, ivf.nlist) * ivf.ntotal / ivf.nlist

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k >= self.deep_from:
            return self._probed(queries, k)
        return self.index.search(queries, k)

    def _probed(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of every vector the probed lists hold (an IVF index's ``range_search`` with no radius to
        speak of), score descending then item id ascending, padded as ``search`` pads."""
        lims, found_scores, found_ids = self.index.range_search(queries, float(np.finfo(np.float32).min))
        scores = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row in range(len(queries)):
            lo, hi = int(lims[row]), int(lims[row + 1])
            order = top_order(found_scores[None, lo:hi], found_ids[None, lo:hi], k)[0]
            scores[row, :len(order)], ids[row, :len(order)] = found_scores[lo:hi][order], found_ids[lo:hi][order]
        return scores, ids


class _TorchSearcher:
    def __init__(self, vectors: np.ndarray, item_ids: np.ndarray, device: str) -> None:
        import torch

        self.vectors = torch.from_numpy(vectors).to(device)  # (n, d)
        self.item_ids = torch.from_numpy(item_ids).to(device)  # (n,)

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.vectors)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        kept = min(k, n)
        if kept == 0:
            return scores, ids
        step = max(1, _TORCH_SCORE_FLOATS // n)  # bounds the (queries, n) score matrix
        import torch

        with torch.inference_mode():
            for lo in range(0, len(queries), step):
                q = torch.from_numpy(queries[lo:lo + step]).to(self.vectors.device)
                top = torch.topk(q @ self.vectors.T, kept, dim=1)  # (step, kept), sorted best first
                scores[lo:lo + step, :kept] = top.values.cpu().numpy()
                ids[lo:lo + step, :kept] = self.item_ids[top.indices].cpu().numpy()
        return scores, ids


def load_shard(path: str | Path, shard_no: int, backend: str = "auto", *, nprobe: int = _DEFAULTS.nprobe,
               ef_search: int = _DEFAULTS.ef_search) -> Shard:
    """Verify and load shard ``shard_no`` of the index version at ``path`` for ``backend``.

    Args:
        backend: auto, faiss-cpu, faiss-gpu or torch (see ``resolve_backend``).
        nprobe: IVF lists visited per query (faiss backends).
        ef_search: HNSW candidate list size (faiss-cpu).

    Raises:
        IndexCorruptError: the shard's files fail verification.
    """
    chosen = resolve_backend(backend)
    manifest, index, metadata = read_shard(path, shard_no)
    _set_search_params(index, nprobe, ef_search)
    if chosen == "faiss-cpu":
        searcher = _FaissSearcher(index)
    elif chosen == "faiss-gpu":
        searcher = _faiss_gpu_searcher(index, shard_no)
    else:
        searcher = _torch_searcher(index, shard_no, manifest.factory)
    return Shard(shard_no, chosen, manifest.dim, metadata, searcher)


def _set_search_params(index: faiss.IndexIDMap2, nprobe: int, ef_search: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe  # the GPU cloner copies it
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = ef_search


def _faiss_gpu_searcher(index: faiss.IndexIDMap2, shard_no: int) -> _FaissSearcher:
    resources = faiss.StandardGpuResources()
    try:
        return _FaissSearcher(faiss.index_cpu_to_gpu(resources, 0, index), resources)
    except RuntimeError as e:  # e.g. HNSW, which faiss has no GPU version of
        raise ValueError(f"shard {shard_no}: faiss-gpu cannot hold a {type(faiss.downcast_index(index.index)).__name__}"
                         f" ({e}); use backend faiss-cpu or torch") from None


def _torch_searcher(index: faiss.IndexIDMap2, shard_no: int, factory: str) -> _TorchSearcher:
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat | faiss.IndexIVFFlat):
        raise ValueError(f"shard {shard_no}: backend torch needs the float vectors, and a {factory!r} shard "
                         f"({type(inner).__name__}) stores compressed codes; use a Flat, HNSW..,Flat or IVF..,Flat "
                         "factory, or a faiss backend")
    if isinstance(inner, faiss.IndexIVFFlat):
        inner.make_direct_map()  # reconstruct needs the position of each vector in its inverted list
    # IDMap2 numbers the inner index's vectors 0..n-1 in add order, the order of id_map
    vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), np.float32)
    import torch

    # CUDA matmul stays float32 unless someone set torch.backends.cuda.matmul.allow_tf32 (rankings would drift)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return _TorchSearcher(vectors, faiss.vector_to_array(index.id_map), device)


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top-k of per-shard top-k results; equal scores are ordered by item id.

    Every item lives in one shard, so the best k of the shards' best k are the best k overall.

    Args:
        results: per shard, scores (q, k_s) float32 and item_ids (q, k_s) int64 (-1 pads, score -inf).
        k: results kept per query.

    Returns:
        scores (q, k) float32 best first and item_ids (q, k) int64, padded with -inf / -1.

    Example:
        >>> a = (np.array([[0.9, 0.5]], np.float32), np.array([[4, 2]]))
        >>> b = (np.array([[0.7, 0.5]], np.float32), np.array([[3, 1]]))
        >>> merge_topk([a, b], k=3)
        (array([[0.9, 0.7, 0.5]], dtype=float32), array([[4, 3, 1]]))
    """
    if not results:
        raise ValueError("merge_topk needs the results of at least one shard")
    scores = np.concatenate([s for s, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1).astype(np.int64, copy=False)
    if scores.shape != ids.shape:
        raise ValueError(f"scores {scores.shape} and item ids {ids.shape} differ in shape")
    order = top_order(scores, ids, k)
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    missing = k - scores.shape[1]
    if missing > 0:
        scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
    return scores, ids


def top_order(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """(q, <=k) column order of the best k per row: score descending, then item id ascending, pads (-1) last.

    Item ids in 0..2^32 - 2 (and -1 pads): one argsort of a 64-bit key per hit, the score's bits above the id's.
    Other ids: one stable argsort by score, then only the runs of equal scores put in id order. A lexsort of both
    keys cost 1.6 ms of a 1M-item request's merge of 12k shard hits, against 0.05 ms for the argsort; the runs of
    ties: ~0.35 ms per shard of a deep search where many item vectors are equal (``docs/serving.md``, "Deep
    searches"), against 0.16-0.21 for the key.
    """
    if ids.size and ids.min() >= -1 and ids.max() < _PAD_KEY:
        # -0.0 + 0.0 is 0.0: equal scores, equal bits; the bits of a float32 flipped so that they sort as uint32
        # in the float's order (negatives: every bit; others: the sign bit), then inverted: best first
        bits = (np.asarray(scores, np.float32) + np.float32(0)).view(np.uint32)
        rank = ~np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
        key = rank.astype(np.uint64) << np.uint64(32) | np.where(ids < 0, _PAD_KEY, ids).astype(np.uint64)
        return np.argsort(key, axis=1)[:, :k]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    tied = ranked[:, 1:] == ranked[:, :-1]  # (q, n - 1): column j + 1 has column j's score
    if tied.any():
        tie_break = np.where(ids < 0, np.iinfo(np.int64).max, ids)  # pads after real items of equal score
        for row in np.flatnonzero(tied.any(axis=1)):
            after = np.concatenate([[False], tied[row]])  # (n,): ties with the one before
            at = np.flatnonzero(after | np.concatenate([tied[row], [False]]))  # every column of a run of ties
            run = np.cumsum(~after)[at]  # which run each is in
            cols = order[row, at]
            order[row, at] = cols[np.lexsort((tie_break[row, cols], run))]
    return order[:, :k]


class IndexReader:
    """A whole index version in one process: every shard loaded, searched in turn, results merged.

    Serving runs one ``Shard`` per replica instead and merges with ``merge_topk``; this is that fan-out
    without Ray, for evaluation, the CLI and tests.

    Args:
        path: an index version directory (``<root>/<version>``).
        backend, nprobe, ef_search: as for ``load_shard``.

    Raises:
        IndexCorruptError: a shard fails verification (the message names the shard and file).
    """

    def __init__(self, path: str | Path, backend: str = "auto", *, nprobe: int = _DEFAULTS.nprobe,
                 ef_search: int = _DEFAULTS.ef_search) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.backend = resolve_backend(backend)
        self.shards = [load_shard(self.path, s, self.backend, nprobe=nprobe, ef_search=ef_search)
                       for s in range(len(self.manifest.shards))]

    @classmethod
    def from_config(cls, config: IndexConfig, version: str | None = None) -> IndexReader:
        """The version ``version`` (default: the one ``CURRENT`` names) under ``config.out``."""
        version = version or current_version(config.out)
        if version is None:
            raise FileNotFoundError(f"{config.out}: no CURRENT index version; build one or name a version")
        return cls(Path(config.out) / version, config.backend, nprobe=config.nprobe, ef_search=config.ef_search)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k: scores (q, k) float32 and item_ids (q, k) int64 for queries (q, d) float32."""
        return merge_topk([shard.search(queries, k) for shard in self.shards], k)

    def metadata(self, item_ids: np.ndarray) -> pa.Table:
        """Metadata rows of ``item_ids`` (n,) int64, in that order (drop -1 pads first)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        owner = shard_of(ids, len(self.shards))
        order = np.argsort(owner, kind="stable")
        parts = [shard.lookup(ids[order][owner[order] == shard.shard_no]) for shard in self.shards]
        return pa.concat_tables(parts).take(np.argsort(order))  # argsort(order) undoes the grouping by shard
