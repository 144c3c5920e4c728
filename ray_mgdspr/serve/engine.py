"""The Ray-free serving core: one version's query encoder, shard searchers, lexical channel, and the
assembly of a response. ``answer`` is the one code path from an encoded query to the response: the Serve ingress
runs it over deployment handles (``serve/ingress.py``, the deployments wrap these classes one per replica), and
``Retriever`` runs it over the same classes in one process (tests, evaluation, the benchmark's monolith).

A *release* is what one version id names: the index version ``<index_root>/<version>`` and the model bundle
it was built from (recorded in the index manifest). ``verify_release`` checks both before anything loads it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import faiss
import numpy as np
import pyarrow as pa

from ray_mgdspr.arrays import sorted_lookup
from ray_mgdspr.config import ResolvedServeConfig, ServeConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.index.lexical import Bm25Index
from ray_mgdspr.index.manifest import IndexManifest, read_manifest
from ray_mgdspr.index.search import Shard, load_shard, top_order
from ray_mgdspr.index.shards import IndexCorruptError, verify_index, version_items
from ray_mgdspr.index.versions import current_version
from ray_mgdspr.model.bundle import BundleManifest, item_context, parse_bundle_manifest, read_bundle_manifest
from ray_mgdspr.serve.canary import AS_SERVED, EXACT, CanaryHits, exact_params
from ray_mgdspr.serve.collector import collector_paused
from ray_mgdspr.serve.relevance import ItemMatcher, KeyTerm, RelevanceFilter
from ray_mgdspr.serve.schemas import BehavioursRequest, RetrieveRequest
from ray_mgdspr.serve.store import Store, open_store

if TYPE_CHECKING:
    import torch

CHANNELS = ("embedding", "lexical")
LEXICAL_CACHE = 1024  # BM25 top-k results a LexicalChannel keeps (by query words and k)
log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def each_alone(fn: Callable[[Sequence[T]], list[R]], batch: Sequence[T]) -> list[R | Exception]:
    """``fn`` over a batch of requests (one result per request); when it raises, ``fn`` over each request alone,
    so that one request that fails fails only itself, never the others batched with it. A request that still
    fails gets its exception in its place (the Serve deployments raise it for that caller only)."""
    try:
        return list(fn(batch))
    except Exception as e:
        if len(batch) == 1:
            return [e]
        log.warning("a batch of %d failed (%r); answering its requests one by one", len(batch), e)
    out: list[R | Exception] = []
    for request in batch:
        try:
            out.append(fn([request])[0])
        except Exception as e:
            out.append(e)
    return out


class ReleaseError(ValueError):
    """A version that cannot be served; the message names the version, the file and what is wrong."""


@dataclass(frozen=True)
class Release:
    """A verified version: its index directory, its bundle, and their manifests."""

    version: str
    index_path: Path
    bundle_path: Path
    index: IndexManifest
    bundle: BundleManifest

    @property
    def shards(self) -> int:
        return len(self.index.shards)


def verify_release(index_root: str | Path, version: str, check_files: bool = True) -> Release:
    """Check that ``version`` can be served: index and bundle present, untampered and made for each other.

    Args:
        check_files: verify every file against its manifest checksum (what a promotion does; replicas
            loading a verified release pass False and still check the files they read).

    Raises:
        ReleaseError: what is missing, corrupt or inconsistent.
    """
    path = Path(index_root) / version
    try:
        index = read_manifest(path)
        problems = verify_index(path) if check_files else []
    except (FileNotFoundError, ValueError, IndexCorruptError) as e:
        raise ReleaseError(f"version {version}: index {path}: {e}") from None
    if problems:
        raise ReleaseError(f"version {version}: index {path} fails verification: {'; '.join(problems)}")
    if not index.bundle:
        raise ReleaseError(f"version {version}: the index manifest names no model bundle (rebuild the index)")
    bundle_path = Path(index.bundle)
    try:
        bundle = read_bundle_manifest(bundle_path) if check_files else parse_bundle_manifest(bundle_path)
    except (FileNotFoundError, ValueError) as e:
        raise ReleaseError(f"version {version}: bundle {bundle_path}: {e}") from None
    if bundle.version != index.model_version:
        raise ReleaseError(f"version {version}: bundle {bundle_path} is model {bundle.version}, but the index was "
                           f"built from model {index.model_version}")
    if bundle.files.get("item_tower.pt") != index.model_checksum:
        raise ReleaseError(f"version {version}: bundle {bundle_path} has other item-tower weights than the index "
                           "was built from (checksum differs)")
    if bundle.model.d != index.dim:
        raise ReleaseError(f"version {version}: bundle d={bundle.model.d} but index dim={index.dim}")
    return Release(version, path, bundle_path, index, bundle)


# ShardSearcher's passing prefix is checked in chunks: the first of PREFIX_FIRST x need hits, each next one
# PREFIX_GROWTH x larger. Each chunk costs a fixed ~0.1 ms of Python, and the verdicts over a few thousand hits
# about as much: x8 (at most 3 chunks to a depth of 9,600 for need 50) took a 1M-item version's 4 shards p50 2.6 /
# p99 7.5 ms against 3.5 / 15.0 for x2 (``benchmarks/deep_search.py``; ``docs/serving.md``, "Deep searches").
PREFIX_FIRST, PREFIX_GROWTH = 2, 8


@dataclass
class Hits:
    """One query's candidates from one source, best first (pads removed)."""

    item_ids: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float32
    passes: np.ndarray  # (n,) bool: passes the relevance filter
    titles: list[str]
    exhausted: bool = False  # every item of the source is among the hits (a deeper search finds nothing more)

    @classmethod
    def empty(cls) -> Hits:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool), [])


@dataclass
class Encoded:
    """One query after the encoder: H_qu and what the later stages need."""

    embedding: np.ndarray  # (d,) float32
    words: list[str]
    terms: tuple[KeyTerm, ...]


class QueryEncoder:
    """Query text + user id -> H_qu, with the user's histories from the behaviour store.

    Args:
        bundle: the model bundle (only its query tower is loaded, with ``weights_only``).
        world: the world whose items table gives behaviours' side information and the key terms.
        store: the behaviour store.
        threads: torch intra-op threads.
        tower: how the query tower runs (``serve.query_tower``, ``model/trace.py``): ``onnx`` (ONNX Runtime),
            ``torchscript`` or ``module``. A graph that cannot be made, or that disagrees with the module, is
            logged and the next of those runs.
    """

    @collector_paused()  # loading: no full collections over a growing heap (serve/collector.py)
    def __init__(self, bundle: str | Path, world: str | Path, store: Store, threads: int = 1,
                 tower: str = "module") -> None:
        # torch is imported by the encoder, not by this module: the processes that import engine only to route
        # requests (the ingress, the version manager) then never load it (~1.3 s and ~180 MiB each)
        import torch

        from ray_mgdspr.model.bundle import load_bundle

        torch.set_num_threads(threads)
        self.model, vocab, self.manifest = load_bundle(bundle, towers=("query",))
        self.featurizer = Featurizer(world, vocab, self.manifest.features, history_days=[],
                                     context=item_context(bundle, self.manifest, world))
        self.tokenizer = vocab.tokenizer()
        self.relevance = RelevanceFilter.from_world(world, load_items=False)
        self.store = store
        self.tower_kind, self.tower = self._compiled(tower, threads)

    def _features(self, queries: list[str], users: list[int], ts: list[int]) -> dict[str, torch.Tensor]:
        from ray_mgdspr.model.layers import as_tensors

        behaviours, past = self.store.histories(users, ts)
        return as_tensors(self.featurizer.with_history(behaviours, past)({"user_id": users, "ts": ts,
                                                                          "query": queries}))

    def _compiled(self, kind: str, threads: int) -> tuple[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
        """The query tower as ``kind`` asks (``onnx``, ``torchscript``, ``module``) and what it is: made on one
        request and checked on a batch of three (an unknown user: empty histories; the unit tests check batches
        with histories). A graph that cannot be made or disagrees is logged and the next kind is made."""
        from ray_mgdspr.model.trace import onnx_tower, trace_tower

        kinds = ("onnx", "torchscript", "module")
        if kind not in kinds:
            raise ValueError(f"serve.query_tower {kind!r}: one of {', '.join(kinds)}")
        makers = {"onnx": lambda ex, ch: onnx_tower(self.model.query_tower, ex, ch, threads=threads),
                  "torchscript": lambda ex, ch: trace_tower(self.model.query_tower, ex, ch)}
        for this in kinds[kinds.index(kind):-1]:
            try:
                example = self._features(["red dress"], [-1], [0])
                check = self._features(["a", "blue running shoes for men", "dress"], [-1, -1, -1], [0, 0, 0])
                return this, makers[this](example, [check])
            except Exception:
                log.warning("the query tower could not be made a graph of kind %s; trying the next of %s", this, kinds,
                            exc_info=True)
        return "module", self.model.query_tower

    def encode(self, queries: list[str], user_ids: list[int | None], ts: list[int]) -> list[Encoded]:
        """Encode a batch; a missing or unknown user gets empty histories (zero attention, spec §2)."""
        import torch

        users = [-1 if u is None else int(u) for u in user_ids]
        with torch.inference_mode():
            h_qu = self.tower(self._features(queries, users, ts)).numpy()  # (B, d)
        words = [self.tokenizer.words(q) for q in queries]
        return [Encoded(h_qu[i], words[i], self.relevance.key_terms(words[i])) for i in range(len(queries))]


class ShardSearcher:
    """One index shard, searched a batch at a time, each hit marked with the relevance filter's verdict."""

    @collector_paused()
    def __init__(self, index_path: str | Path, shard_no: int, backend: str = "auto", *, nprobe: int = 16,
                 ef_search: int = 128, faiss_threads: int = 1, verdict_cache_mb: int = 64) -> None:
        self.faiss_threads = faiss_threads
        self.shard: Shard = load_shard(index_path, shard_no, backend, nprobe=nprobe, ef_search=ef_search)
        # the titles stay in Arrow: a Python string per item, here and in the lexical channel, held 64-97 MiB more
        # in a replica of a 1M-item version
        self._titles: pa.Array = self.shard.metadata["title"].combine_chunks()
        self._matches = ItemMatcher(self.shard.metadata, verdict_cache_mb << 20)

    @property
    def rows(self) -> int:
        """Items in this shard."""
        return self.shard.rows

    def passing_bound(self, terms: tuple[KeyTerm, ...]) -> int:
        """At most how many of this shard's items pass ``terms`` (``ItemMatcher.passing_bound``)."""
        return self._matches.passing_bound(terms)

    def search(self, queries: np.ndarray, k: int | list[int], terms: list[tuple[KeyTerm, ...]],
               need: list[int | None] | None = None) -> list[Hits]:
        """Top-k of this shard for each query row of ``queries`` (q, d), each hit with its filter verdict.

        Args:
            k: candidates per query, or a list of them, one per query (a batch of requests); capped at the
                shard's size (a deeper search finds nothing more).
            terms: each query's key terms.
            need: per query, ``None`` (every one of the top k, verdicts and titles) or n: the filter is on and
                the caller keeps at most n passing hits, so only the prefix of the top k down to this shard's
                n-th passing hit is returned (all k when fewer pass), verdicts are computed in growing chunks
                only as deep as that, and titles only for passing hits ("" for the others). The global best n
                passing hits are always among the union of each shard's best n, and every failing hit ranked
                above the global n-th passing one lies inside these prefixes, so merging them gives exactly
                what merging the full top k would.
        """
        depths = [k] * len(terms) if isinstance(k, int) else list(k)
        return self.hits(*self.ann(queries, max(depths)), depths, terms, need)

    def ann(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's top ``depth`` of each query row (capped at the shard's size): scores and item ids (q, depth'),
        as ``Shard.search`` pads them. Faiss runs it without Python's GIL."""
        # OpenMP's thread count belongs to the calling thread, and searches run in worker threads
        faiss.omp_set_num_threads(self.faiss_threads)
        return self.shard.search(queries, max(1, min(depth, self.shard.rows)))

    def hits(self, scores: np.ndarray, ids: np.ndarray, depths: list[int], terms: list[tuple[KeyTerm, ...]],
             need: list[int | None] | None = None) -> list[Hits]:
        """``search``'s hits from ``ann``'s top lists (each row cut to its own depth), with verdicts and titles."""
        out = []
        for row, query_terms in enumerate(terms):
            keep = ids[row] >= 0
            hit_ids, hit_scores = ids[row][keep][:depths[row]], scores[row][keep][:depths[row]]
            exhausted = len(hit_ids) >= self.shard.rows
            wanted = None if need is None else need[row]
            if wanted is None:
                rows = self.shard.lookup_rows(hit_ids)
                out.append(Hits(hit_ids, hit_scores, self._matches(query_terms, rows),
                                self._titles.take(rows).to_pylist(), exhausted))
                continue
            rows, passes = self._passing_prefix(hit_ids, query_terms, wanted)
            n = len(passes)
            titles = np.full(n, "", object)  # only the passing hits' titles: the prefix can hold thousands of hits
            titles[passes] = self._titles.take(rows[passes]).to_numpy(zero_copy_only=False)
            out.append(Hits(hit_ids[:n], hit_scores[:n], passes, titles.tolist(), exhausted))
        return out

    def search_exact(self, queries: np.ndarray, k: int, ef_search: int = 4096) -> tuple[np.ndarray, np.ndarray, str]:
        """The reference top-k of this shard for the recall canary (``serve/canary.py``): the same index searched
        exhaustively (IVF: every list; HNSW: ``efSearch = ef_search``, near-exact; Flat and the torch backend:
        exact as served). The parameters are passed per call, so concurrent ``search`` calls keep the serving
        ``nprobe`` / ``efSearch``, and no second copy of the index is held.

        Returns:
            scores (q, k') float32 best first (-inf pads) and item ids (q, k') int64 (-1 pads), k' = min(k, rows)
            (at least 1), and the reference's name (``canary.exact_params``).
        """
        faiss.omp_set_num_threads(self.faiss_threads)
        k = max(1, min(k, self.shard.rows))
        index = self.shard.faiss_index
        if index is None or self.shard.backend == "faiss-gpu":  # torch: exact already; gpu: no params there
            return (*self.shard.search(queries, k), EXACT if index is None else AS_SERVED)
        params, reference, _keep = exact_params(index, ef_search, k)  # _keep: what params points to, alive
        if params is None:
            return (*self.shard.search(queries, k), reference)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.shard.dim:
            raise ValueError(f"queries must have shape (q, {self.shard.dim}); got {queries.shape}")
        scores, ids = index.search(queries, k, params=params)
        scores[ids < 0] = -np.inf  # as Shard.search pads
        return scores, ids, reference

    def canary(self, queries: np.ndarray, k: int, ef_search: int = 4096) -> CanaryHits:
        """One canary sample of this shard: the top k as served (``nprobe`` / ``efSearch`` of serving) and the
        reference top k (``search_exact``) of the same queries, unfiltered."""
        faiss.omp_set_num_threads(self.faiss_threads)
        depth = max(1, min(k, self.shard.rows))
        ann = self.shard.search(queries, depth)
        *exact, reference = self.search_exact(queries, depth, ef_search)
        return CanaryHits(ann, tuple(exact), reference)

    def _passing_prefix(self, item_ids: np.ndarray, terms: tuple[KeyTerm, ...], need: int
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Metadata rows and verdicts of ``item_ids`` (best first) down to the ``need``-th passing one (all of them
        when fewer pass), looked up and checked in growing chunks only as deep as that (a deep search returns
        thousands of ids, and looking each up cost more than the search: ``serve-profile.md``)."""
        n = len(item_ids)
        rows, passes = np.zeros(n, np.int64), np.zeros(n, bool)
        done, found, chunk = 0, 0, max(PREFIX_FIRST * need, 64)
        while done < n and found < need:
            hi = min(n, done + chunk)
            rows[done:hi] = self.shard.lookup_rows(item_ids[done:hi])
            passes[done:hi] = self._matches(terms, rows[done:hi])
            found += int(passes[done:hi].sum())
            done, chunk = hi, chunk * PREFIX_GROWTH
        if found >= need:
            done = int(np.flatnonzero(passes)[need - 1]) + 1
        return rows[:done], passes[:done]


class LexicalChannel:
    """BM25 over the titles of the items one index version serves (its shards' metadata, so an item a delta update
    removed is gone from this channel too), its hits marked with the relevance filter's verdict. Also the version's
    titles by item id (``titles``)."""

    @collector_paused()
    def __init__(self, index_path: str | Path, verdict_cache_mb: int = 64) -> None:
        items = version_items(index_path)  # sorted by item id
        self._ids, self._titles = items["item_id"].to_numpy(), items["title"].combine_chunks()  # titles: Arrow
        self.index = Bm25Index.build(self._ids, items["title_words"])
        self._matches = ItemMatcher(items, verdict_cache_mb << 20)
        # a query's BM25 top k, kept: the lexical fallback and the relaxed fill of one request rank the same words
        # (only their verdicts differ), and BM25 scores every item (3-5 ms at 1M items)
        self._top = functools.lru_cache(maxsize=LEXICAL_CACHE)(self._bm25)

    def _bm25(self, words: tuple[str, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25's top k of one query: rows of the version's items (the index is built in their order) and scores,
        of the items that share a word with it (read-only)."""
        rows, scores = self.index.top_rows(list(words), k)
        rows.flags.writeable = scores.flags.writeable = False
        return rows, scores

    def _rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's row among the version's items, and whether the version serves it (else its row is any)."""
        return sorted_lookup(self._ids, item_ids)

    def titles(self, item_ids: np.ndarray) -> list[str | None]:
        """The title of each item in this version; None for an item the version does not serve."""
        rows, served = self._rows(np.asarray(item_ids, np.int64))
        return [t if ok else None for t, ok in zip(self._titles.take(rows).to_pylist(), served.tolist(), strict=True)]

    def search(self, words: list[list[str]], k: int, terms: list[tuple[KeyTerm, ...]]) -> list[Hits]:
        out = []
        for query_words, query_terms in zip(words, terms, strict=True):
            rows, scores = self._top(tuple(query_words), k)
            out.append(Hits(self._ids[rows], scores, self._matches(query_terms, rows),
                            self._titles.take(rows).to_pylist()))
        return out


def merge_hits(parts: list[Hits], k: int) -> Hits:
    """The global top-k of per-shard hits (same order as ``index.search.merge_topk``)."""
    ids = np.concatenate([p.item_ids for p in parts])
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32)
    order = top_order(scores[None, :], ids[None, :], k)[0]
    passes = np.concatenate([p.passes for p in parts])
    titles = np.empty(len(ids), object)  # one numpy gather: a filtered search merges thousands of hits
    titles[:] = list(itertools.chain.from_iterable(p.titles for p in parts))
    return Hits(ids[order], scores[order], passes[order], titles[order].tolist(),
                bool(parts) and all(p.exhausted for p in parts) and len(order) == len(ids))


@dataclass
class Assembled:
    items: list[dict] = field(default_factory=list)
    filtered: int = 0
    fallback: str | None = None  # the channel that filled a page the filter left short (None: it did not run)
    fallback_added: int = 0  # items it added to the page
    relaxed_to: list[str] | None = None  # the key terms a relaxed fill kept (None: the page is not relaxed)


def fetch_size(k: int, apply_filter: bool, filter_fetch: int, max_fetch: int) -> int:
    """Candidates the lexical channel retrieves: k, or with the filter on k x ``filter_fetch`` (capped at
    ``max_fetch``, never below k) so that k items that pass usually remain."""
    return max(k, min(k * filter_fetch, max_fetch)) if apply_filter else k


def embedding_depth(k: int, apply_filter: bool, terms: tuple[KeyTerm, ...], filter_depth: int) -> int:
    """Candidates the embedding channel searches: k, or with the filter on and key terms in the query
    ``filter_depth`` (the paper filters the ANN's top 9,600), never below k. Each shard caps it at its size and
    returns only its prefix down to its k-th passing hit (``ShardSearcher.search``), so the depth costs a
    deeper ANN search and verdicts only as far down as the passing hits lie."""
    return max(k, filter_depth) if apply_filter and terms else k


def needs_fallback(result: Assembled, found: dict[str, Hits], k: int, apply_filter: bool,
                   channels: tuple[str, ...] | list[str], fallback: str) -> bool:
    """Whether the page needs the lexical fallback: the filter is on, the embedding channel was asked without
    the lexical one, fewer than k embedding hits passed, and the embedding search did not already see the whole
    catalogue (then every item that passes is on the page, and BM25 could only repeat some of them)."""
    return (fallback == "lexical" and apply_filter and "embedding" in channels and "lexical" not in channels
            and len(result.items) < k and not found["embedding"].exhausted)


def early_fallback_limit(k: int, apply_filter: bool, channels: tuple[str, ...] | list[str], fallback: str,
                         terms: tuple[KeyTerm, ...], early_fallback: float) -> int | None:
    """When the lexical fallback may start beside the embedding search (``serve.early_fallback``): the most items
    of the version that may pass the query's key terms for it to start (``LocalStages.early_fallback_hits``); None
    when it may not start early (it could never run: ``needs_fallback``; or no key terms, or the knob is 0)."""
    if not (early_fallback > 0 and terms and fallback == "lexical" and apply_filter and "embedding" in channels
            and "lexical" not in channels):
        return None
    return int(k * early_fallback)


def relaxed_terms(terms: tuple[KeyTerm, ...]) -> tuple[KeyTerm, ...] | None:
    """Query relaxation: the query's category terms alone, when it also names a brand or attribute values; None
    when there is nothing to drop or no product type to keep (relaxing "beige" to nothing would be no filter)."""
    category = tuple(t for t in terms if t.field == "category")
    return category if category and len(category) < len(terms) else None


def needs_relaxing(result: Assembled, k: int, apply_filter: bool, channels: tuple[str, ...] | list[str],
                   fallback: str, terms: tuple[KeyTerm, ...]) -> bool:
    """Whether a page still short after the filter (and the lexical fallback) should be filled with items of the
    query's product type that miss a brand or attribute value it names: the catalogue has too few items with
    every key term (on the demo's 2,000 items, 31 % of held-out searches had none)."""
    return (fallback == "lexical" and apply_filter and "embedding" in channels and len(result.items) < k
            and relaxed_terms(terms) is not None)


def assemble(channels: dict[str, Hits], k: int, apply_filter: bool) -> Assembled:
    """The response's items: each channel's best k (that pass the filter, when asked), embedding first, then
    lexical-only items; an item found by both channels is listed once with both channels and scores.

    ``filtered`` counts the candidates the filter removed above each channel's last kept item (all of them
    when fewer than k pass).
    """
    out = Assembled()
    by_id: dict[int, dict] = {}
    for channel in CHANNELS:
        hits = channels.get(channel)
        if hits is None:
            continue
        kept = np.flatnonzero(hits.passes)[:k] if apply_filter else np.arange(min(k, len(hits.item_ids)))
        if apply_filter:  # the failing hits above the last kept one; all of them when fewer than k pass
            out.filtered += (int(kept[-1]) + 1 - len(kept)) if len(kept) == k else len(hits.item_ids) - len(kept)
        ids, scores = hits.item_ids[kept].tolist(), hits.scores[kept].tolist()
        for i, item, score in zip(kept.tolist(), ids, scores, strict=True):
            _add(out, by_id, item, hits.titles[i], channel, score)
    return out


def fill_page(result: Assembled, lexical: Hits, k: int, relaxed_to: tuple[KeyTerm, ...] | None = None) -> Assembled:
    """Fill a page the filter left short (fewer than k items) with the lexical channel's passing hits, best
    first, until it has k items; never with a hit that fails the filter. A passing lexical hit already on the
    page gains the ``lexical`` channel and score (the channel did find it) and adds no item. Records the
    fallback in ``result.fallback`` / ``fallback_added``; the filter's removals in the fallback are not
    counted in ``filtered`` (which counts the asked channels' removals).

    ``relaxed_to``: the hits' verdicts are against these relaxed key terms (``relaxed_terms``), recorded in
    ``result.relaxed_to``; the strictly passing items already on the page stay first."""
    by_id = {entry["item_id"]: entry for entry in result.items}
    result.fallback = "lexical"
    if relaxed_to is not None:
        result.relaxed_to = [t.text for t in relaxed_to]
    for item, score, ok, title in zip(lexical.item_ids, lexical.scores, lexical.passes, lexical.titles,
                                      strict=True):
        if len(result.items) >= k:
            break
        if not ok:
            continue
        before = len(result.items)
        _add(result, by_id, int(item), title, "lexical", float(score))
        result.fallback_added += len(result.items) - before
    return result


def _add(out: Assembled, by_id: dict[int, dict], item: int, title: str, channel: str, score: float) -> None:
    entry = by_id.get(item)
    if entry is None:
        entry = by_id[item] = {"item_id": item, "title": title, "channels": [], "scores": {}}
        out.items.append(entry)
    if channel not in entry["channels"]:
        entry["channels"].append(channel)
        entry["scores"][channel] = score


def response_body(version: str, result: Assembled, terms: tuple[KeyTerm, ...], latency_s: dict[str, float]
                  ) -> dict:
    """The response of ``POST /v1/retrieve`` (the fields of ``schemas.RetrieveResponse``); stage times in ms."""
    return {"version": version, "data": result.items, "count": len(result.items), "filtered": result.filtered,
            "fallback": result.fallback, "fallback_added": result.fallback_added, "relaxed_to": result.relaxed_to,
            "key_terms": [t.text for t in terms],
            "latency_ms": {stage: round(s * 1000, 3) for stage, s in latency_s.items()}}


def recent_behaviours(store: Store, titles: Callable[[np.ndarray], list[str | None]], user_id: int, ts: int,
                      limit: int) -> list[dict]:
    """What ``GET /v1/users/{user_id}/behaviours`` answers: the user's behaviours that the query encoder reads for
    a search at ``ts`` (``Store.histories`` with the version's feature windows: only rows before ``ts``; the
    latest clicks of any age, and clicks, buys and collects in the long-term window), most recent first (equal
    times: the later arrival first), at most ``limit``, as ``schemas.UserBehaviour`` fields.

    Args:
        titles: item ids -> each item's title in the serving version, None for an item it does not serve
            (``LexicalChannel.titles``).
    """
    behaviours, _ = store.histories([user_id], [ts])  # in arrival order, each row once
    times = behaviours["ts"].to_numpy()
    order = np.lexsort((-np.arange(len(times)), -times))[:limit]  # ts descending, then arrival descending
    rows = behaviours.take(order)
    items = rows["item_id"].to_numpy()
    return [{"item_id": int(item), "action": action, "ts": int(t), "title": title}
            for item, action, t, title in zip(items, rows["action"].to_pylist(), rows["ts"].to_pylist(),
                                               titles(items), strict=True)]


def behaviours_body(user_id: int, version: str, ts: int, data: list[dict]) -> dict:
    """The response of ``GET /v1/users/{user_id}/behaviours`` (the fields of ``schemas.BehavioursResponse``)."""
    return {"user_id": user_id, "version": version, "ts": ts, "data": data, "count": len(data)}


def request_ts(ts: int | None) -> int:
    """The time a request reads the behaviour store at: its ``ts``, else now (epoch ms)."""
    return ts or int(time.time() * 1000)


# ------------------------------------------------------------------------------------- the answer


class RequestRefused(ValueError):
    """A request the configuration refuses (k out of bounds, query too long): the ingress answers 422.

    Attributes:
        field: the request field at fault. problem: what is wrong with it, in a few words.
    """

    def __init__(self, field: str, problem: str, message: str) -> None:
        super().__init__(message)
        self.field, self.problem = field, problem


def request_k(req: RetrieveRequest, cfg: ServeConfig) -> int:
    """The k a request asks for (``serve.default_k`` when it names none), after the configured limits that the
    request schema cannot know: k within 1..``serve.max_k``, the query at most ``serve.max_query_chars``.

    Raises:
        RequestRefused: naming the field, the configured limit and the value.
    """
    k = req.k if req.k is not None else cfg.default_k
    if not 1 <= k <= cfg.max_k:
        raise RequestRefused("k", f"not in 1..{cfg.max_k}",
                             f"k must be between 1 and serve.max_k={cfg.max_k} (got {k})")
    if len(req.query) > cfg.max_query_chars:
        raise RequestRefused("query", "too long", f"query has {len(req.query)} characters, more than "
                                                  f"serve.max_query_chars={cfg.max_query_chars}")
    return k


class Stages(Protocol):
    """The calls one answer makes, wherever the stages run: in this process (``Retriever``) or behind Serve
    handles with retries (the ingress). ``answer`` is the only code that decides what to call, how deep, and
    what the response holds."""

    async def encode(self, query: str, user_id: int | None, ts: int) -> Encoded:
        """H_qu of one query with the user's histories."""

    async def shards(self, embedding: np.ndarray, depth: int, terms: tuple[KeyTerm, ...], need: int | None
                     ) -> list[Hits]:
        """Every shard's hits of one query (``ShardSearcher.search``), in shard order."""

    async def lexical(self, words: list[str], k: int, terms: tuple[KeyTerm, ...]) -> Hits:
        """The lexical channel's top k of one query, with verdicts against ``terms``."""

    def early_fallback(self, words: list[str], k: int, terms: tuple[KeyTerm, ...], limit: int
                       ) -> Callable[[], Awaitable[Hits | None]] | None:
        """Start ``LocalStages.early_fallback_hits`` now, to run beside the embedding search: a function that
        awaits its hits (None: more than ``limit`` items may pass), called only if the page turns out short;
        None where these stages cannot start work ahead (the per-stage graph: it would cost a hop per request)."""

    async def together(self, *calls: Awaitable[Any]) -> list[Any]:
        """The results of ``calls``, run concurrently where the stages can (the shard fan-out beside BM25)."""


async def retrieve(req: RetrieveRequest, k: int, cfg: ServeConfig, version: str, stages: Stages) -> dict:
    """The response to a request (its k from ``request_k``): encode, then ``answer``."""
    t0 = time.perf_counter()
    enc = await stages.encode(req.query, req.user_id, request_ts(req.ts))
    return await answer(enc, k, req.filter, tuple(req.channels), cfg, version, stages,
                        {"encode": time.perf_counter() - t0}, t0)


async def answer(enc: Encoded, k: int, apply_filter: bool, channels: tuple[str, ...], cfg: ServeConfig,
                 version: str, stages: Stages, latency: dict[str, float] | None = None,
                 t0: float | None = None) -> dict:
    """The response to an encoded query: the asked channels (embedding: every shard, at ``embedding_depth``;
    lexical: at ``fetch_size``), the merge, the relevance filter, the lexical fallback and the relaxed fill
    (``serve.fallback``), as ``schemas.RetrieveResponse`` fields.

    Args:
        latency: stage seconds measured before (``encode``); the answer adds its own stages and ``total``.
        t0: ``time.perf_counter()`` when the request began (default: now).
    """
    t0 = time.perf_counter() if t0 is None else t0
    latency = {} if latency is None else latency
    fetch = fetch_size(k, apply_filter, cfg.filter_fetch, cfg.max_fetch)
    depth = embedding_depth(k, apply_filter, enc.terms, cfg.filter_depth)

    async def timed(stage: str, call: Awaitable[T]) -> T:
        t = time.perf_counter()
        result = await call
        latency[stage] = time.perf_counter() - t
        return result

    limit = early_fallback_limit(k, apply_filter, channels, cfg.fallback, enc.terms, cfg.early_fallback)
    early = None if limit is None else stages.early_fallback(enc.words, fetch, enc.terms, limit)
    calls: dict[str, Awaitable[Any]] = {}
    if "embedding" in channels:
        calls["embedding"] = timed("search", stages.shards(enc.embedding, depth, enc.terms,
                                                           k if apply_filter else None))
    if "lexical" in channels:
        calls["lexical"] = timed("lexical", stages.lexical(enc.words, fetch, enc.terms))
    found: dict[str, Hits] = dict(zip(calls, await stages.together(*calls.values()), strict=True))
    if "embedding" in found:
        t = time.perf_counter()
        found["embedding"] = merge_hits(found["embedding"], depth)
        latency["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    result = assemble(found, k, apply_filter)
    latency["filter"] = time.perf_counter() - t
    if needs_fallback(result, found, k, apply_filter, channels, cfg.fallback):
        # the filter left the page short: BM25's passing hits fill it (only then: one more call, unless it started
        # beside the search; ``fallback`` is then the time the request waited for it)
        async def fallback_hits() -> Hits:
            hits = None if early is None else await early()
            return await stages.lexical(enc.words, fetch, enc.terms) if hits is None else hits

        fill_page(result, await timed("fallback", fallback_hits()), k)
    if needs_relaxing(result, k, apply_filter, channels, cfg.fallback, enc.terms):
        # still short: too few items have every key term; fill with the query's product type (BM25-ranked)
        relaxed = relaxed_terms(enc.terms)
        fill_page(result, await timed("relaxed", stages.lexical(enc.words, fetch, relaxed)), k, relaxed)
    latency["total"] = time.perf_counter() - t0
    return response_body(version, result, enc.terms, latency)


def run_now(call: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (``answer`` over ``LocalStages``), without an event loop:
    callable from any thread, at no cost beyond the call itself."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value
    call.close()
    raise RuntimeError("a local serving stage suspended; LocalStages must not await anything that waits")


class LocalStages:
    """The stages of one version in this process (``Retriever``): one after another, except the shards, searched
    on ``search_threads`` threads, and the early fallback, on a thread of its own.

    Args:
        search_threads: threads that search the shards of one batch (``serve.search_threads``); 1: one shard
            after another in the calling thread.
    """

    def __init__(self, encoder: QueryEncoder, shards: list[ShardSearcher], lexical: LexicalChannel,
                 search_threads: int = 1) -> None:
        self.encoder, self.searchers, self.lexical_channel = encoder, shards, lexical
        self.search_threads = search_threads
        # one thread for early fallbacks (``early_fallback``): BM25 and Faiss release the GIL for their loops
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early-fallback")
        self._pools: dict[int, ThreadPoolExecutor] = {}  # the shard search's threads, by their number

    async def encode(self, query: str, user_id: int | None, ts: int) -> Encoded:
        return self.encoder.encode([query], [user_id], [ts])[0]

    async def shards(self, embedding: np.ndarray, depth: int, terms: tuple[KeyTerm, ...], need: int | None
                     ) -> list[Hits]:
        per_shard = self.search(embedding[None, :], [depth], [terms], None if need is None else [need])
        return [hits[0] for hits in per_shard]

    def search(self, queries: np.ndarray, depths: list[int], terms: list[tuple[KeyTerm, ...]],
               need: list[int | None] | None) -> list[list[Hits]]:
        """Every shard's ``ShardSearcher.search`` of a batch (queries (q, d)), in shard order. With
        ``search_threads`` > 1 the shards' index searches (``ShardSearcher.ann``, which Faiss runs without the GIL)
        run on that many threads at once, then this thread reads each shard's verdicts (Python: on threads they
        would only wait for each other's GIL)."""
        threads = min(self.search_threads, len(self.searchers))
        if threads <= 1:
            return [s.search(queries, depths, terms, need=need) for s in self.searchers]
        pool = self._pools.get(threads)
        if pool is None:
            pool = self._pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-search")
        tops = list(pool.map(lambda s: s.ann(queries, max(depths)), self.searchers))
        return [s.hits(*top, depths, terms, need) for s, top in zip(self.searchers, tops, strict=True)]

    async def lexical(self, words: list[str], k: int, terms: tuple[KeyTerm, ...]) -> Hits:
        return self.lexical_channel.search([words], k, [terms])[0]

    def early_fallback(self, words: list[str], k: int, terms: tuple[KeyTerm, ...], limit: int
                       ) -> Callable[[], Awaitable[Hits | None]]:
        future = self.start_early_fallback(words, k, terms, limit)
        return lambda: _waited(future)

    def start_early_fallback(self, words: list[str], k: int, terms: tuple[KeyTerm, ...], limit: int
                             ) -> Future[Hits | None]:
        """``early_fallback_hits`` on this stage's thread, started now."""
        return self._ahead.submit(self.early_fallback_hits, words, k, terms, limit)

    def early_fallback_hits(self, words: list[str], k: int, terms: tuple[KeyTerm, ...], limit: int) -> Hits | None:
        """The lexical fallback's hits of one query, before anyone knows its page is short: None, without a BM25
        search, when more than ``limit`` of the version's items can pass ``terms`` (the shards' ``passing_bound``,
        from the verdicts their search of the same terms keeps), as the embedding channel then nearly always fills
        the page."""
        bound = 0
        for shard in self.searchers:
            bound += shard.passing_bound(terms)
            if bound > limit:
                return None
        return self.lexical_channel.search([words], k, [terms])[0]

    def idle(self) -> None:
        """Return once every early fallback started so far has ended (one not needed runs on after its request)."""
        self._ahead.submit(lambda: None).result()

    async def together(self, *calls: Awaitable[Any]) -> list[Any]:
        return [await call for call in calls]


async def _waited(future: Future[T]) -> T:
    """A thread's result as an awaitable that blocks instead of suspending (``run_now`` runs it)."""
    return future.result()


class _Searched:
    """``LocalStages`` with one request's shard hits already searched (``Retriever.answer_batch``)."""

    def __init__(self, local: LocalStages, hits: list[Hits] | None, early: Future[Hits | None] | None) -> None:
        self.local, self.hits, self.early = local, hits, early

    async def encode(self, query: str, user_id: int | None, ts: int) -> Encoded:
        raise RuntimeError("a batched answer is encoded before its stages run")

    async def shards(self, embedding: np.ndarray, depth: int, terms: tuple[KeyTerm, ...], need: int | None
                     ) -> list[Hits]:
        assert self.hits is not None, "the batch searched no shards for a request without the embedding channel"
        return self.hits

    async def lexical(self, words: list[str], k: int, terms: tuple[KeyTerm, ...]) -> Hits:
        return await self.local.lexical(words, k, terms)

    def early_fallback(self, words: list[str], k: int, terms: tuple[KeyTerm, ...], limit: int
                       ) -> Callable[[], Awaitable[Hits | None]] | None:
        """The request's early fallback, started before the batch's shard search (``Retriever.answer_batch``)."""
        early = self.early
        return None if early is None else lambda: _waited(early)

    async def together(self, *calls: Awaitable[Any]) -> list[Any]:
        return await self.local.together(*calls)


class Retriever:
    """A whole version in one process (no Ray), configured as the endpoint is: the same ``ServeConfig`` (every
    depth, limit and the fallback), the same request checks (``request_k``), the same ``answer``, the same
    response. What the Serve graph is tested against, the benchmark's monolith, and the evaluation of pages.

    Args:
        release: the verified version (``verify_release``).
        cfg: the resolved serve section (``ServeConfig.resolved``): world, backend, nprobe, ef_search, threads,
            limits, depths and the fallback.
        store: the behaviour store (default: ``open_store(cfg.store)``).
    """

    @collector_paused()
    def __init__(self, release: Release, cfg: ResolvedServeConfig, store: Store | None = None) -> None:
        self.release, self._cfg = release, cfg
        store = open_store(cfg.store, release.bundle.features) if store is None else store
        self.encoder = QueryEncoder(release.bundle_path, cfg.world, store, threads=cfg.torch_threads,
                                    tower=cfg.query_tower)
        self.shards = [ShardSearcher(release.index_path, s, cfg.backend, nprobe=cfg.nprobe,
                                     ef_search=cfg.ef_search, faiss_threads=cfg.faiss_threads,
                                     verdict_cache_mb=cfg.verdict_cache_mb)
                       for s in range(release.shards)]
        self.lexical = LexicalChannel(release.index_path, cfg.verdict_cache_mb)
        self.stages = LocalStages(self.encoder, self.shards, self.lexical, cfg.search_threads)

    ANSWERED_WITH = frozenset({"default_k", "max_k", "max_query_chars", "filter_fetch", "max_fetch", "filter_depth",
                               "fallback", "early_fallback", "search_threads"})
    """The serve settings the request path reads per request. The others are read when the version is opened (the
    encoder, the shards, the lexical channel: ``query_tower``, ``nprobe``, threads, ...) or not by a ``Retriever``."""

    @property
    def cfg(self) -> ResolvedServeConfig:
        """The serve section this version answers with. Settable between requests (an A/B of serve settings in one
        process, ``benchmarks/profile_core.py``) for the settings in ``ANSWERED_WITH``; changing any other raises
        (it would take effect only in a ``Retriever.open``, and would otherwise be silently ignored)."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: ResolvedServeConfig) -> None:
        changed = sorted(f for f in type(cfg).model_fields
                         if f not in self.ANSWERED_WITH and getattr(cfg, f) != getattr(self._cfg, f))
        if changed:
            raise ValueError(f"serve {', '.join(changed)}: read when a version is opened, not between requests; "
                             "open another Retriever with them")
        self._cfg = cfg
        self.stages.search_threads = cfg.search_threads

    @classmethod
    def open(cls, cfg: ResolvedServeConfig, version: str | None = None, store: Store | None = None) -> Retriever:
        """The ``Retriever`` of ``version`` (default: ``serve.version``, else the index root's ``CURRENT``)."""
        version = version or cfg.version or current_version(cfg.index_root)
        if version is None:
            raise ReleaseError(f"nothing to serve: {cfg.index_root} has no CURRENT version and no version is named")
        return cls(verify_release(cfg.index_root, version), cfg, store)

    def retrieve(self, query: str, user_id: int | None = None, k: int | None = None, apply_filter: bool = True,
                 channels: tuple[str, ...] = ("embedding",), ts: int | None = None) -> dict:
        """One request, answered and refused as ``POST /v1/retrieve`` answers and refuses it.

        Raises:
            pydantic.ValidationError: what the request schema refuses. RequestRefused: what the configured
                limits refuse.
        """
        req = RetrieveRequest(query=query, user_id=user_id, k=k, filter=apply_filter, channels=list(channels),
                              ts=ts)
        return self.request(req)

    def request(self, req: RetrieveRequest) -> dict:
        """The response to a parsed request body (``retrieve`` without building it)."""
        return run_now(retrieve(req, request_k(req, self.cfg), self.cfg, self.release.version, self.stages))

    def answer_batch(self, requests: Sequence[tuple[RetrieveRequest, int]]) -> list[tuple[dict, np.ndarray]]:
        """Responses to a batch of parsed requests (each with its k from ``request_k``), each equal to
        ``request``'s: the batch's queries go through the query tower in one forward pass and each shard is
        searched once for all of them (at each request's own depth and passing prefix), then every request is
        answered on its own (merge, filter, fallbacks). What a replica of the whole version runs
        (``serve.placement: inline`` and ``colocated``, ``serve/versions.py``).

        Returns:
            per request, its response and its H_qu (d,) (the recall canary samples it). Stage times: ``encode``
            and ``search`` are the batch's; ``total`` runs from the batch's start to the request's answer.
        """
        t0 = time.perf_counter()
        encoded = self.encoder.encode([r.query for r, _ in requests], [r.user_id for r, _ in requests],
                                      [request_ts(r.ts) for r, _ in requests])
        encode_s = time.perf_counter() - t0
        early: dict[int, Future[Hits | None]] = {}  # requests whose fallback starts beside the batch's search
        for i, ((req, k), enc) in enumerate(zip(requests, encoded, strict=True)):
            limit = early_fallback_limit(k, req.filter, req.channels, self.cfg.fallback, enc.terms,
                                         self.cfg.early_fallback)
            if limit is not None:
                fetch = fetch_size(k, req.filter, self.cfg.filter_fetch, self.cfg.max_fetch)
                early[i] = self.stages.start_early_fallback(enc.words, fetch, enc.terms, limit)
        searched = [i for i, (r, _) in enumerate(requests) if "embedding" in r.channels]
        hits: dict[int, list[Hits]] = {}
        search_s = 0.0
        if searched:
            t = time.perf_counter()
            queries = np.stack([encoded[i].embedding for i in searched])
            depths = [embedding_depth(requests[i][1], requests[i][0].filter, encoded[i].terms, self.cfg.filter_depth)
                      for i in searched]
            terms = [encoded[i].terms for i in searched]
            need = [requests[i][1] if requests[i][0].filter else None for i in searched]
            per_shard = self.stages.search(queries, depths, terms, need)
            hits = {i: [shard[row] for shard in per_shard] for row, i in enumerate(searched)}
            search_s = time.perf_counter() - t
        out = []
        for i, ((req, k), enc) in enumerate(zip(requests, encoded, strict=True)):
            body = run_now(answer(enc, k, req.filter, tuple(req.channels), self.cfg, self.release.version,
                                  _Searched(self.stages, hits.get(i), early.get(i)), {"encode": encode_s}, t0))
            if i in hits:
                body["latency_ms"]["search"] = round(search_s * 1000, 3)
            out.append((body, enc.embedding))
        return out

    def canary(self, embedding: np.ndarray, k: int, ef_search: int = 4096) -> list[CanaryHits]:
        """A recall canary sample of one query H_qu (d,) on every shard (``ShardSearcher.canary``), in shard order."""
        return [s.canary(embedding[None, :], k, ef_search) for s in self.shards]

    def behaviours(self, user_id: int, limit: int = 20, ts: int | None = None) -> dict:
        """A user's behaviours as ``GET /v1/users/{user_id}/behaviours`` answers them (``recent_behaviours``).

        Raises:
            pydantic.ValidationError: what the request schema refuses.
        """
        req = BehavioursRequest(user_id=user_id, limit=limit, ts=ts)
        ts = request_ts(req.ts)
        data = recent_behaviours(self.encoder.store, self.lexical.titles, req.user_id, ts, req.limit)
        return behaviours_body(req.user_id, self.release.version, ts, data)

    def answer(self, enc: Encoded, k: int, apply_filter: bool = True, channels: tuple[str, ...] = ("embedding",)
               ) -> dict:
        """The response to an encoded query (``retrieve`` after the encoder; evaluation encodes in batches)."""
        return run_now(answer(enc, k, apply_filter, channels, self.cfg, self.release.version, self.stages))
