"""Searching index versions: exact merge, ANN recall on structured data, backends, the reader (Ray-free)."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch
from faiss.contrib.evaluation import check_ref_knn_with_draws, knn_intersection_measure
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_mgdspr.config import IndexConfig
from ray_mgdspr.index.search import IndexReader, load_shard, merge_topk, resolve_backend, top_order
from ray_mgdspr.index.shards import IndexCorruptError, build_index_version, split_by_shard
from ray_mgdspr.index.versions import set_current

NO_GPU = faiss.get_num_gpus() == 0 and not torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def metadata_for(ids: np.ndarray) -> pa.Table:
    return pa.table({
        "item_id": ids,
        "leaf_id": (ids % 97).astype(np.int32),
        "cate1_id": (ids % 7).astype(np.int32),
        "brand_id": (ids % 31).astype(np.int32),
        "attr_value_ids": [[int(i % 5)] for i in ids],
        "title_words": [[f"w{i}"] for i in ids],
        "title": [f"item w{i}" for i in ids],
    })


def integer_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Small integers as float32: every inner product is exact, so shard and global scores are bit-equal."""
    return np.random.default_rng(seed).integers(-100, 101, size=(n, d)).astype(np.float32)


def clustered(n: int, d: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 Gaussian centres: structured like embeddings, unlike pure noise.

    Take queries from the same call as the catalogue: another seed draws other centres, and queries far
    from every item measure nothing an index is built for.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(root: Path, vectors: np.ndarray, shards: int, factory: str = "Flat", version: str = "v1") -> Path:
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 1_000  # not row numbers: results must be item ids
    parts = split_by_shard(vectors, ids, metadata_for(ids), shards)
    build_index_version(root, version, parts, IndexConfig(shards=shards, factory=factory), version, "sha",
                        vectors.shape[1])
    return root / version


def exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global flat inner-product search, in item ids."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, rows = index.search(queries, k)
    return scores, np.where(rows < 0, -1, rows * 3 + 1_000)


# --------------------------------------------------------------------------------------------------
# exact merge


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_merged_flat_shards_equal_one_global_flat_search(tmp_path: Path, shards: int) -> None:
    vectors, queries = integer_vectors(1400, 16, seed=0), integer_vectors(40, 16, seed=1)
    reader = IndexReader(build(tmp_path, vectors, shards), "faiss-cpu")
    scores, ids = reader.search(queries, 25)
    ref_scores, ref_ids = exact(vectors, queries, 25)
    np.testing.assert_array_equal(scores, ref_scores)
    check_ref_knn_with_draws(ref_scores, ref_ids, scores, ids, rtol=0)  # equal scores may swap ids


def test_merge_orders_ties_by_id_and_pads_last() -> None:
    a = (np.array([[0.5, 0.2, -np.inf]], np.float32), np.array([[9, 4, -1]]))
    b = (np.array([[0.5, 0.2]], np.float32), np.array([[3, 7]]))
    scores, ids = merge_topk([a, b], k=6)
    assert ids.tolist() == [[3, 9, 4, 7, -1, -1]]
    assert scores.tolist() == [[0.5, 0.5, np.float32(0.2), np.float32(0.2), -np.inf, -np.inf]]
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_a_short_index_pads_with_minus_one_and_minus_inf(tmp_path: Path) -> None:
    vectors = integer_vectors(10, 8, seed=0)
    reader = IndexReader(build(tmp_path, vectors, 3), "faiss-cpu")
    assert min(shard.rows for shard in reader.shards) < 10
    scores, ids = reader.search(vectors[:2], 14)
    assert (ids[:, 10:] == -1).all() and np.isneginf(scores[:, 10:]).all()
    assert sorted(ids[0, :10].tolist()) == sorted((np.arange(10) * 3 + 1_000).tolist())


# --------------------------------------------------------------------------------------------------
# approximate shards against exact, on structured data


@pytest.fixture(scope="module")
def structured() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = clustered(20_200)
    vectors, queries = points[:20_000], points[20_000:]
    return vectors, queries, exact(vectors, queries, 100)[1]


@pytest.mark.parametrize(("factory", "low", "high"), [
    ("IVF64,Flat", 0.95, 1.0),
    ("HNSW32", 0.95, 1.0),
    ("IVF64,PQ16x4np", 0.4, 0.95),  # lossy codes (about 0.6 here): the floor catches a broken build, no more
])
def test_ann_recall_at_100_against_exact(tmp_path: Path, structured: tuple, factory: str, low: float,
                                         high: float) -> None:
    vectors, queries, truth = structured
    reader = IndexReader(build(tmp_path, vectors, 2, factory), "faiss-cpu", nprobe=16, ef_search=128)
    recall = knn_intersection_measure(reader.search(queries, 100)[1], truth)
    logging.getLogger(__name__).info("%s recall@100 = %.3f", factory, recall)
    assert low <= recall <= high


def test_nprobe_is_applied(tmp_path: Path, structured: tuple) -> None:
    vectors, queries, truth = structured
    path = build(tmp_path, vectors, 2, "IVF64,Flat")
    recall = {n: knn_intersection_measure(IndexReader(path, "faiss-cpu", nprobe=n).search(queries, 100)[1], truth)
              for n in (1, 64)}
    assert recall[1] < 0.95 and recall[64] > 0.999  # 1 list: about 0.9 here; all 64: exhaustive


@pytest.mark.parametrize("nprobe", [1, 3, 8])
def test_a_deep_ivf_search_returns_every_probed_vector_by_score_then_id(tmp_path: Path, nprobe: int) -> None:
    """From k = what the probed lists hold on average, the shard ranks all they hold (``range_search``) instead of
    Faiss's k-heap: the same hits as the heap search asked for all of them, ties by item id, pads last."""
    vectors = integer_vectors(600, 8, seed=0) // 40  # small integers: many exact ties
    vectors[300:] = vectors[:300]  # and duplicated items
    shard = load_shard(build(tmp_path, vectors, 1, "IVF8,Flat"), 0, "faiss-cpu", nprobe=nprobe)
    searcher = shard._searcher
    assert searcher.deep_from == nprobe * 600 / 8
    queries = integer_vectors(12, 8, seed=1) // 40
    every_s, every_i = shard.faiss_index.search(queries, 600)  # the heap search, asked for every vector
    for k in (int(searcher.deep_from) + 1, 2 * int(searcher.deep_from), 605):
        scores, ids = shard.search(queries, k)
        assert scores.shape == ids.shape == (12, k)
        for row in range(12):
            probed = every_i[row] >= 0
            order = top_order(every_s[row][probed][None], every_i[row][probed][None], k)[0]
            n = len(order)
            assert ids[row, :n].tolist() == every_i[row][probed][order].tolist()
            np.testing.assert_array_equal(scores[row, :n], every_s[row][probed][order])
            assert (ids[row, n:] == -1).all() and np.isneginf(scores[row, n:]).all()
        if nprobe == 8:  # every list probed: the exhaustive top k
            assert (ids[:, :min(k, 600)] >= 0).all()


def test_a_shallow_ivf_search_is_faiss_own(tmp_path: Path) -> None:
    vectors = integer_vectors(600, 8, seed=0)
    shard = load_shard(build(tmp_path, vectors, 1, "IVF8,Flat"), 0, "faiss-cpu", nprobe=2)
    queries = integer_vectors(5, 8, seed=1)
    scores, ids = shard.search(queries, 20)
    ref_scores, ref_ids = shard.faiss_index.search(queries, 20)
    assert ids.tolist() == ref_ids.tolist() and scores.tolist() == ref_scores.tolist()


# --------------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat"])
def test_torch_backend_is_exact_on_shards_that_store_float_vectors(tmp_path: Path, factory: str) -> None:
    vectors, queries = integer_vectors(1400, 16, seed=0), integer_vectors(40, 16, seed=1)
    path = build(tmp_path, vectors, 3, factory)
    scores, ids = IndexReader(path, "torch").search(queries, 25)
    ref_scores, ref_ids = exact(vectors, queries, 25)
    np.testing.assert_array_equal(scores, ref_scores)
    check_ref_knn_with_draws(ref_scores, ref_ids, scores, ids, rtol=0)
    if factory == "Flat":
        faiss_scores, faiss_ids = IndexReader(path, "faiss-cpu").search(queries, 25)
        np.testing.assert_array_equal(scores, faiss_scores)
        check_ref_knn_with_draws(faiss_scores, faiss_ids, scores, ids, rtol=0)


def test_torch_backend_refuses_compressed_shards(tmp_path: Path) -> None:
    path = build(tmp_path, clustered(500), 1, "IVF4,PQ8x4np")
    with pytest.raises(ValueError, match=r"shard 0: backend torch needs the float vectors, and a 'IVF4,PQ8x4np' shard"):
        load_shard(path, 0, "torch")


@pytest.mark.skipif(not NO_GPU, reason="checks the choice on a machine without a GPU")
def test_auto_picks_faiss_cpu_without_a_gpu_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ray_mgdspr.index.search"):
        assert resolve_backend("auto") == "faiss-cpu"
    assert "auto -> faiss-cpu (no GPU is visible)" in caplog.text


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this faiss sees a GPU")
def test_faiss_gpu_without_gpu_support_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="backend 'faiss-gpu': this faiss sees no GPU"):
        resolve_backend("faiss-gpu")
    with pytest.raises(ValueError, match="unknown index backend 'cuda'"):
        resolve_backend("cuda")


# --------------------------------------------------------------------------------------------------
# the reader


def test_reader_looks_up_metadata_in_the_order_asked(tmp_path: Path) -> None:
    vectors = integer_vectors(300, 8, seed=0)
    reader = IndexReader(build(tmp_path, vectors, 3), "faiss-cpu")
    ids = np.array([1_000 + 3 * i for i in (299, 0, 17, 150, 3)])
    table = reader.metadata(ids)
    assert table["item_id"].to_pylist() == ids.tolist()
    assert table["title_words"].to_pylist() == [[f"w{i}"] for i in ids]
    assert reader.metadata(np.array([], np.int64)).num_rows == 0
    with pytest.raises(KeyError, match=r"item ids not in this shard: \[1001\]"):
        reader.metadata(np.array([1_000, 1_001]))


def test_reader_refuses_a_corrupt_index_naming_the_file(tmp_path: Path) -> None:
    path = build(tmp_path, integer_vectors(300, 8, seed=0), 3)
    data = bytearray((path / "shard-00001.faiss").read_bytes())
    data[-5] ^= 0xFF
    (path / "shard-00001.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=r"shard 1: shard-00001\.faiss does not match its sha256"):
        IndexReader(path)


def test_reader_from_config_opens_the_current_version(tmp_path: Path) -> None:
    config = IndexConfig(out=str(tmp_path), backend="faiss-cpu")
    with pytest.raises(FileNotFoundError, match="no CURRENT index version"):
        IndexReader.from_config(config)
    build(tmp_path, integer_vectors(50, 8, seed=0), 2, version="v1")
    build(tmp_path, integer_vectors(60, 8, seed=0), 2, version="v2")
    set_current(tmp_path, "v1")
    assert IndexReader.from_config(config).manifest.total_rows == 50
    assert IndexReader.from_config(config, "v2").manifest.total_rows == 60


def test_queries_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    reader = IndexReader(build(tmp_path, integer_vectors(50, 8, seed=0), 2), "faiss-cpu")
    with pytest.raises(ValueError, match=r"queries must have shape \(q, 8\); got \(3, 16\)"):
        reader.search(np.zeros((3, 16), np.float32), 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        reader.search(np.zeros((3, 8), np.float32), 0)


@pytest.mark.parametrize("stride", [3, 1_000_003])  # dense ids: an id -> row table; sparse: binary search
def test_lookup_rows_finds_every_id_and_refuses_others_either_way(tmp_path: Path, stride: int) -> None:
    vectors = integer_vectors(200, 8, seed=1)
    ids = np.arange(200, dtype=np.int64) * stride + 5
    parts = split_by_shard(vectors, ids, metadata_for(ids), 2)
    build_index_version(tmp_path, "v1", parts, IndexConfig(shards=2), "v1", "sha", 8)
    shards = [load_shard(tmp_path / "v1", s, "faiss-cpu") for s in range(2)]
    for s, shard in enumerate(shards):
        assert (shard._row_of is not None) == (stride == 3)
        own = shard.metadata["item_id"].to_numpy()
        order = np.random.default_rng(s).permutation(len(own))
        np.testing.assert_array_equal(shard.lookup_rows(own[order]), order)
        other = int(shards[1 - s].metadata["item_id"][0].as_py())  # inside this shard's id range, not its own
        for stranger in (-1, 4, int(own.max()) + 1, other):
            with pytest.raises(KeyError, match=f"shard {s}: item ids not in this shard: \\[{stranger}\\]"):
                shard.lookup_rows(np.array([own[0], stranger]))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), cols=st.integers(1, 40), k=st.integers(1, 50), big=st.booleans())
def test_top_order_is_score_then_id_with_pads_last(data: st.DataObject, rows: int, cols: int, k: int,
                                                   big: bool) -> None:
    """Against the plain lexsort of both keys, on scores with many ties, -0.0, -inf and pads; ids below 2^32 (one
    key per hit) and above (runs of ties sorted)."""
    scores = np.array(data.draw(st.lists(st.sampled_from([0.5, 0.25, -1.0, 3.0, 0.0, -0.0, -1e-30, -np.inf]),
                                         min_size=rows * cols, max_size=rows * cols)), np.float32).reshape(rows, cols)
    ids = np.array(data.draw(st.lists(st.integers(-1, 30), min_size=rows * cols, max_size=rows * cols)),
                   np.int64).reshape(rows, cols)
    if big:
        ids = np.where(ids < 0, ids, ids + 2**32 - 20)  # some ids below 2^32 - 1, some above
    want = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
    got = top_order(scores, ids, k)
    np.testing.assert_array_equal(np.take_along_axis(scores, got, 1), np.take_along_axis(scores, want, 1))
    np.testing.assert_array_equal(np.take_along_axis(ids, got, 1), np.take_along_axis(ids, want, 1))
