"""Catalogue embedding with a real Ray Data actor pool, and index builds with shards as Ray tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from ray_mgdspr.config import EmbedConfig, IndexConfig
from ray_mgdspr.data.features import ITEM_COLUMNS, Featurizer
from ray_mgdspr.index.build import build_index
from ray_mgdspr.index.embed import (
    ItemEmbedder,
    RowRanges,
    embed_catalogue,
    read_embeddings,
    read_embeddings_manifest,
    row_ranges,
    vectors_of,
)
from ray_mgdspr.index.search import IndexReader
from ray_mgdspr.index.versions import current_version, list_versions
from ray_mgdspr.model.bundle import item_context, load_bundle, read_bundle_manifest
from ray_mgdspr.model.layers import as_tensors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session() -> None:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def test_actor_pool_embedding_equals_an_in_process_pass(ray_session: None, world_en: Path, bundle: Path,
                                                        tmp_path: Path) -> None:
    r = embed_catalogue(world_en, bundle, EmbedConfig(out=str(tmp_path), actors=1, batch_size=256))
    items = pq.read_table(world_en / "items.parquet", columns=["item_id", "title_words"])
    assert r.rows == items.num_rows and r.dim == 16 and r.path == tmp_path / "v-test"
    ids, vectors = read_embeddings(r.path)
    # the reference: the featurizer's item features (its own price levels from the whole catalogue), in-process
    model, vocab, manifest = load_bundle(bundle, towers=("item",))
    with torch.inference_mode():
        ref_ids = np.sort(items["item_id"].to_numpy())
        features = Featurizer(world_en, vocab, manifest.features, history_days=[]).items(ref_ids)
        assert (features["item_price"] >= 0).mean() > 0.9  # the tower reads real price levels, not padding
        reference = model.embed_items(as_tensors(features)).numpy()
    order = np.argsort(ids)
    assert np.array_equal(ids[order], ref_ids)
    np.testing.assert_allclose(vectors[order], reference, rtol=1e-5, atol=1e-6)
    info = read_embeddings_manifest(r.path)
    assert info.model_version == "v-test" and info.rows == items.num_rows
    assert [p.name for p in tmp_path.iterdir()] == ["v-test"]  # no temporary directory left
    with pytest.raises(FileExistsError, match="overwrite"):
        embed_catalogue(world_en, bundle, EmbedConfig(out=str(tmp_path)))


@pytest.mark.parametrize("row_groups", [5, 1])
def test_actors_read_their_own_row_ranges_of_a_many_row_group_catalogue(
        ray_session: None, world_en: Path, bundle: Path, tmp_path: Path, row_groups: int) -> None:
    """Two actors, the catalogue in 5 row groups (one range each) or 1 (two ranges that both read it): every item
    embedded once, as an in-process pass embeds it."""
    items = pq.read_table(world_en / "items.parquet")
    world = tmp_path / "world"
    world.mkdir()
    pq.write_table(items, world / "items.parquet", row_group_size=-(-items.num_rows // row_groups))
    assert pq.ParquetFile(world / "items.parquet").num_row_groups == row_groups
    r = embed_catalogue(world, bundle, EmbedConfig(out=str(tmp_path / "emb"), actors=2, batch_size=64))
    assert len(list(r.path.glob("part-*.parquet"))) == max(row_groups, 2)
    # what each actor did: every part and row counted once, with its own process's times
    assert 1 <= len(r.actors) <= 2 and sum(a.parts for a in r.actors) == max(row_groups, 2)
    assert sum(a.rows for a in r.actors) == items.num_rows and all(a.embed_s > 0 for a in r.actors)
    assert 0 <= r.first_range_s < r.seconds and "items/s each while busy" in r.summary()
    ids, vectors = read_embeddings(r.path)
    embedder = ItemEmbedder(str(bundle), item_context(bundle, read_bundle_manifest(bundle), world))
    reference = embedder(items.select(ITEM_COLUMNS))
    order, ref_order = np.argsort(ids), np.argsort(reference["item_id"])
    assert np.array_equal(ids[order], reference["item_id"][ref_order])
    np.testing.assert_allclose(vectors[order], reference["embedding"][ref_order], rtol=1e-5, atol=1e-6)


def test_row_ranges_cover_the_file_and_read_exactly_their_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for sizes, min_rows, at_least in [([7] * 7 + [1], 4, 1), ([7] * 7 + [1], 16, 2), ([49], 6, 3), ([0], 2, 1)]:
        path = tmp_path / "t.parquet"
        n = sum(sizes)
        with pq.ParquetWriter(path, pa.schema([("a", pa.int64())])) as w:
            lo = 0
            for size in sizes:
                w.write_table(pa.table({"a": np.arange(lo, lo + size)}), row_group_size=max(size, 1))
                lo += size
        assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(len(sizes))] == sizes
        ranges = row_ranges(sizes, min_rows, at_least)
        assert [b - a for a, b in ranges] == sorted((b - a for a, b in ranges), reverse=True)  # largest first
        edges = [0, *(b for _, b in sorted(ranges))]  # contiguous, non-empty, from 0 to n
        assert [a for a, _ in sorted(ranges)] == edges[:-1] and edges[-1] == n and all(a < b for a, b in ranges)
        assert len(ranges) >= min(at_least, n // min_rows) and all(b - a >= min_rows for a, b in ranges[:-1])
        reader = RowRanges(path, ["a"])
        for a, b in [*ranges, *sorted(tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(20))]:
            assert reader.read(a, b)["a"].to_pylist() == list(range(a, b))
        with pytest.raises(IndexError, match=f"of {n}"):
            reader.read(0, n + 1)


def test_vectors_read_from_tensor_or_list_columns() -> None:
    v = np.arange(6, dtype=np.float32).reshape(3, 2)
    as_list = pa.array(v.tolist(), pa.list_(pa.float32()))
    as_large = pa.array(v.tolist(), pa.large_list(pa.float32()))
    as_tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(v)
    for column in (as_list, as_large, as_tensor, pa.chunked_array([as_list])):
        np.testing.assert_array_equal(vectors_of(column), v)


def test_index_built_with_ray_tasks_searches_like_exact(ray_session: None, world_en: Path, bundle: Path,
                                                       tmp_path: Path) -> None:
    emb = embed_catalogue(world_en, bundle, EmbedConfig(out=str(tmp_path / "emb")))
    cfg = IndexConfig(out=str(tmp_path / "index"), shards=3)
    m = build_index(world_en, emb.path, cfg)
    assert m.version == "v-test" and m.total_rows == emb.rows and len(m.shards) == 3
    assert current_version(cfg.out) == "v-test" and list_versions(cfg.out) == ["v-test"]
    ids, vectors = read_embeddings(emb.path)
    queries = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    scores, got = IndexReader.from_config(cfg).search(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, exact, 1), rtol=1e-5, atol=1e-5)
    assert (got == ids[exact]).mean() > 0.99  # equal up to exact score ties
    meta = IndexReader.from_config(cfg).metadata(ids[:3])
    assert meta["item_id"].to_pylist() == ids[:3].tolist() and "title_words" in meta.column_names


def test_cli_verify_names_a_corrupt_shard(ray_session: None, world_en: Path, bundle: Path, tmp_path: Path) -> None:
    emb = embed_catalogue(world_en, bundle, EmbedConfig(out=str(tmp_path / "emb")))
    cfg = IndexConfig(out=str(tmp_path / "index"), shards=2)
    build_index(world_en, emb.path, cfg)
    version_dir = tmp_path / "index" / "v-test"
    cli = [sys.executable, "-m", "ray_mgdspr.cli", "index", "verify", str(version_dir)]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    ok = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "ok" in ok.stdout
    shard = version_dir / "shard-00001.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "shard-00001.faiss" in bad.stderr


def test_build_index_job_embeds_then_builds_a_current_version(world_en: Path, bundle: Path, tmp_path: Path) -> None:
    """jobs/build_index.py as `ray job submit` runs it (a subprocess with its own local Ray): both stages, through
    the same functions as `mgdspr embed` and `mgdspr index build`; bad input exits 2 naming it."""
    import yaml

    from ray_mgdspr.index.shards import verify_index

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"embed": {"out": str(tmp_path / "emb"), "actors": 1},
                                      "index": {"out": str(tmp_path / "index"), "shards": 2},
                                      "train": {"world": str(world_en)}}))
    job = [sys.executable, str(Path(__file__).resolve().parents[2] / "jobs" / "build_index.py")]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "RAY_ADDRESS": ""}
    done = subprocess.run([*job, "--bundle", str(bundle), "--config", str(config)], capture_output=True, text=True,
                          env=env, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert current_version(tmp_path / "index") == "v-test" and verify_index(tmp_path / "index" / "v-test") == []
    assert read_embeddings_manifest(tmp_path / "emb" / "v-test").model_version == "v-test"
    assert "embedded" in done.stdout and "now current" in done.stdout
    missing = subprocess.run([*job, "--bundle", str(tmp_path / "nope"), "--config", str(config)],
                             capture_output=True, text=True, env=env, timeout=280)
    assert missing.returncode == 2 and str(tmp_path / "nope") in missing.stderr, missing.stderr[-3000:]


def test_a_bad_embeddings_manifest_is_named_by_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an embedding set"):
        read_embeddings_manifest(tmp_path)
    (tmp_path / "embeddings.json").write_text(json.dumps({"model_version": "v", "model_files": {}, "rows": 3,
                                                          "dim": 0, "world": "w", "seconds": 1.0}))
    with pytest.raises(ValueError, match=r"embeddings.json: invalid embeddings manifest: dim: "):
        read_embeddings_manifest(tmp_path)
    (tmp_path / "embeddings.json").write_text(json.dumps({"model_version": "v", "model_files": {}, "rows": 3,
                                                          "dim": 4, "world": "w", "seconds": 1.0}))
    with pytest.raises(ValueError, match=r"item_tower\.pt"):
        read_embeddings_manifest(tmp_path)
