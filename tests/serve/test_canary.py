"""The recall canary's Ray-free core: each shard's exact reference search (IVF probing every list, HNSW near-exact,
Flat as is) without touching the serving parameters, the recall of merged top-k lists, the running window."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from ray_mgdspr.config import IndexConfig, ServeConfig
from ray_mgdspr.index.shards import build_index_version, split_by_shard
from ray_mgdspr.serve.canary import ALL_LISTS, EXACT, RecallWindow, merged_recall, recall_at_k
from ray_mgdspr.serve.engine import ShardSearcher

SHARDS, K, N, D = 2, 50, 4000, 32


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def random_unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    """Gaussian unit vectors: the worst case for ANN recall (shared/notes/RAY.md), so probing one list of 16
    misses most of the true top k, as a deliberately degraded index should."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def metadata_for(ids: np.ndarray) -> pa.Table:
    return pa.table({"item_id": ids, "leaf_id": (ids % 97).astype(np.int32), "cate1_id": (ids % 7).astype(np.int32),
                     "brand_id": (ids % 31).astype(np.int32), "attr_value_ids": [[int(i % 5)] for i in ids],
                     "title_words": [[f"w{i}"] for i in ids], "title": [f"item w{i}" for i in ids]})


DATA = random_unit(N + 64)
VECTORS, QUERIES = DATA[:N], DATA[N:]
IDS = np.arange(N, dtype=np.int64) * 3 + 1_000


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("canary")
    parts = split_by_shard(VECTORS, IDS, metadata_for(IDS), SHARDS)
    for version, factory in [("flat", "Flat"), ("ivf", "IVF16,Flat"), ("hnsw", "HNSW8"),
                             ("pca-ivf", "PCA16,IVF16,Flat")]:
        build_index_version(out, version, parts, IndexConfig(shards=SHARDS, factory=factory), version, "sha", D)
    return out


def searchers(root: Path, version: str, backend: str = "faiss-cpu", **params: int) -> list[ShardSearcher]:
    return [ShardSearcher(root / version, s, backend, **params) for s in range(SHARDS)]


def brute_force(k: int = K) -> tuple[np.ndarray, np.ndarray]:
    scores = QUERIES @ VECTORS.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), IDS[order]


def canary_recall(shards: list[ShardSearcher], k: int = K, ef_search: int = 4096) -> tuple[np.ndarray, set[str]]:
    """What the ingress computes from the shards' canary answers (``merged_recall``), per query."""
    hits = [s.canary(QUERIES, k, ef_search) for s in shards]
    return merged_recall([h.ann for h in hits], [h.exact for h in hits], k), {h.reference for h in hits}


def test_degraded_ivf_shows_the_drop_and_a_fully_probed_one_does_not(root: Path) -> None:
    degraded, reference = canary_recall(searchers(root, "ivf", nprobe=1))
    assert reference == {ALL_LISTS}
    full, _ = canary_recall(searchers(root, "ivf", nprobe=16))  # nprobe = nlist: exhaustive as served
    print(f"IVF16,Flat recall@{K}: nprobe 1 {degraded.mean():.3f}, nprobe 16 {full.mean():.3f}")
    assert degraded.mean() < 0.8
    assert np.all(full == 1.0)


def test_exact_reference_equals_brute_force_and_leaves_serving_parameters_alone(root: Path) -> None:
    shards = searchers(root, "ivf", nprobe=1)
    served = [s.shard.search(QUERIES, K) for s in shards]
    exact = [s.search_exact(QUERIES, K) for s in shards]
    _, truth = brute_force()
    assert all(math.isclose(r, 1.0) for r in merged_recall([e[:2] for e in exact], [brute_force()], K))
    assert {e[2] for e in exact} == {ALL_LISTS}
    for s, before in zip(shards, served, strict=True):
        assert faiss.extract_index_ivf(s.shard._searcher.index).nprobe == 1  # never mutated
        after = s.shard.search(QUERIES, K)
        np.testing.assert_array_equal(after[1], before[1])
    assert truth.shape == (len(QUERIES), K)


def test_flat_is_exact_by_construction_and_still_measured(root: Path) -> None:
    recall, reference = canary_recall(searchers(root, "flat"))
    assert reference == {EXACT}
    assert np.all(recall == 1.0)


def test_torch_backend_is_exact(root: Path) -> None:
    recall, reference = canary_recall(searchers(root, "ivf", backend="torch", nprobe=1))
    assert reference == {EXACT} and np.all(recall == 1.0)


def test_hnsw_reference_is_near_exact_and_keeps_ef_search(root: Path) -> None:
    shards = searchers(root, "hnsw", ef_search=16)
    exact = [s.search_exact(QUERIES, K, ef_search=2048) for s in shards]
    assert {e[2] for e in exact} == {"hnsw-ef2048"}
    assert merged_recall([e[:2] for e in exact], [brute_force()], K).mean() >= 0.99
    for s in shards:
        assert faiss.downcast_index(s.shard._searcher.index.index).hnsw.efSearch == 16


def test_a_transform_before_the_ivf_is_kept_and_every_list_probed(root: Path) -> None:
    shards = searchers(root, "pca-ivf", nprobe=1)
    degraded, reference = canary_recall(shards)
    assert reference == {ALL_LISTS} and degraded.mean() < 1.0
    full, _ = canary_recall(searchers(root, "pca-ivf", nprobe=16))
    # the reference ranks in the PCA space too: it isolates the probing loss, as documented
    assert np.all(full == 1.0)


def test_exact_searches_beside_live_searches_in_threads_change_no_live_answer(root: Path) -> None:
    shard = searchers(root, "ivf", nprobe=1)[0]
    want = shard.search(QUERIES, K, [()] * len(QUERIES))
    failures: list[str] = []

    def live() -> None:
        for _ in range(20):
            got = shard.search(QUERIES, K, [()] * len(QUERIES))
            if any(not np.array_equal(g.item_ids, w.item_ids) for g, w in zip(got, want, strict=True)):
                failures.append("a live search changed")

    def reference() -> None:
        for _ in range(20):
            shard.search_exact(QUERIES, K)

    threads = [threading.Thread(target=f) for f in (live, reference, live, reference)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_recall_counts_the_overlap_of_the_exact_top_k() -> None:
    assert recall_at_k(np.array([1, 2, 3, -1]), np.array([3, 4, 1, 5])) == 0.5
    assert recall_at_k(np.array([1, 2]), np.array([2, 1])) == 1.0
    assert math.isnan(recall_at_k(np.array([1]), np.array([-1, -1])))
    # merged per side first: shard b's 0.9 beats shard a's 0.5 in the exact top 2, which the ANN missed
    ann = [(np.array([[0.9, 0.5]], np.float32), np.array([[4, 2]])), (np.array([[0.1]], np.float32), np.array([[7]]))]
    exact = [(np.array([[0.9, 0.5]], np.float32), np.array([[4, 2]])),
             (np.array([[0.95]], np.float32), np.array([[8]]))]
    assert merged_recall(ann, exact, 2).tolist() == [0.5]


def test_the_window_keeps_the_last_samples() -> None:
    window = RecallWindow(3)
    assert math.isnan(window.recall) and window.summary(10)["recall"] is None
    for r in (0.0, 1.0, 1.0, 0.5):
        window.add(r, ALL_LISTS)
    assert window.recall == pytest.approx(2.5 / 3)
    summary = window.summary(10)
    assert summary["window"] == 3 and summary["samples"] == 4 and summary["k"] == 10
    assert summary["reference"] == ALL_LISTS


def test_canary_settings_are_bounded() -> None:
    assert ServeConfig().canary_share == 0.01 and ServeConfig(canary_share=0).canary_share == 0
    for bad in ({"canary_share": 1.5}, {"canary_share": -0.1}, {"canary_k": 0}, {"canary_window": 0},
                {"canary_ef_search": 0}):
        with pytest.raises(ValueError):
            ServeConfig(**bad)
