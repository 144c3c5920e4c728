"""Daily catalogue deltas (index/update.py): a new version from a base without re-embedding the unchanged catalogue,
equal to a full build of the changed catalogue on Flat shards; the CLI and its refusals (Ray-free, real Faiss)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ray_mgdspr.config import IndexConfig
from ray_mgdspr.data.features import ItemContext, PriceLevels
from ray_mgdspr.data.schema import ITEMS
from ray_mgdspr.data.simulator.churn import daily_churn
from ray_mgdspr.data.world import conform, read_table
from ray_mgdspr.index.manifest import read_manifest
from ray_mgdspr.index.search import IndexReader
from ray_mgdspr.index.shards import build_index_version, split_by_shard, verify_index
from ray_mgdspr.index.update import CATALOGUE_COLUMNS, base_catalogue, embed_rows, plan_delta, update_index
from ray_mgdspr.index.versions import current_version, list_versions
from ray_mgdspr.model.bundle import item_context, item_popularity, price_levels, read_bundle_manifest


def full_build(root: Path, version: str, catalogue: pa.Table, bundle: Path, config: IndexConfig,
               context: ItemContext, make_current: bool = True) -> np.ndarray:
    """A full build of ``catalogue``: every item embedded (the class Ray Data's actors run) and indexed."""
    ids, vectors = embed_rows(bundle, catalogue, context)
    model = read_bundle_manifest(bundle)
    build_index_version(root, version, split_by_shard(vectors, ids, catalogue, config.shards), config,
                        model.version, model.files["item_tower.pt"], vectors.shape[1], make_current=make_current,
                        bundle=str(bundle))
    return vectors


def items_of(world: Path) -> pa.Table:
    return read_table(world, "items", columns=CATALOGUE_COLUMNS)


@pytest.fixture
def base(tmp_path: Path, world_en: Path, bundle: Path) -> tuple[IndexConfig, ItemContext]:
    config = IndexConfig(out=str(tmp_path / "index"), shards=3)
    context = item_context(bundle)
    full_build(tmp_path / "index", "v-test", items_of(world_en), bundle, config, context)
    return config, context


def test_plan_finds_added_removed_and_changed_items(world_en: Path) -> None:
    before = items_of(world_en)
    after = daily_churn(before, share=0.04, seed=3)
    delta = plan_delta(before, after)
    part = round(before.num_rows * 0.04 / 4)
    assert (len(delta.added), len(delta.removed), len(delta.changed)) == (part, part, 2 * part)
    assert delta.unchanged == before.num_rows - 3 * part
    assert delta.rows["item_id"].to_pylist() == np.union1d(delta.added, delta.changed).tolist()
    same = plan_delta(before, before.take(pa.array(np.random.default_rng(0).permutation(before.num_rows))))
    assert (len(same.added), len(same.removed), len(same.changed)) == (0, 0, 0)  # row order does not matter


def test_delta_equals_a_full_build_of_the_new_catalogue_on_flat_shards(tmp_path: Path, world_en: Path,
                                                                       bundle: Path, base) -> None:
    config, context = base
    after = daily_churn(items_of(world_en), share=0.04, seed=1)
    result = update_index(after, bundle, config, version="v-test.d1")
    m = result.manifest
    assert (m.version, m.model_version, current_version(config.out)) == ("v-test.d1", "v-test", "v-test.d1")
    assert m.delta is not None and m.delta.base == "v-test" and m.total_rows == after.num_rows
    assert (m.delta.added, m.delta.removed, m.delta.changed) == (15, 15, 30)
    assert verify_index(Path(config.out) / "v-test.d1") == []
    assert read_manifest(Path(config.out) / "v-test").total_rows == items_of(world_en).num_rows  # base untouched

    # the reference: a full build of the changed catalogue (with the model's price levels, as embed_catalogue)
    ref = IndexConfig(out=str(tmp_path / "full"), shards=3)
    vectors = full_build(tmp_path / "full", "v-test", after, bundle, ref, context)
    queries = np.random.default_rng(0).standard_normal((64, vectors.shape[1])).astype(np.float32)
    scores, ids = IndexReader(Path(config.out) / "v-test.d1").search(queries, 20)
    ref_scores, ref_ids = IndexReader(Path(ref.out) / "v-test").search(queries, 20)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert (ids == ref_ids).mean() > 0.99  # equal up to exact score ties
    for s in range(3):  # same items, same metadata, shard by shard
        mine = pq.read_table(Path(config.out) / "v-test.d1" / f"shard-{s:05d}.parquet")
        theirs = pq.read_table(Path(ref.out) / "v-test" / f"shard-{s:05d}.parquet")
        assert mine.equals(theirs)


def test_removed_items_are_never_found_and_untouched_shards_are_shared(tmp_path: Path, world_en: Path,
                                                                       bundle: Path, base) -> None:
    config, _ = base
    before = items_of(world_en)
    gone = before["item_id"].to_numpy()[:5]
    after = before.filter(pa.array(~np.isin(before["item_id"].to_numpy(), gone)))
    result = update_index(after, bundle, config, version="v-test.d2")
    assert (result.delta.added, result.delta.removed, result.delta.changed) == (0, 5, 0)
    catalogue = base_catalogue(Path(config.out) / "v-test.d2")
    assert not np.isin(gone, catalogue["item_id"].to_numpy()).any()
    ids_base, vectors_base = embed_rows(bundle, before.filter(pa.array(np.isin(before["item_id"].to_numpy(), gone))),
                                        item_context(bundle))
    _, found = IndexReader(Path(config.out) / "v-test.d2").search(vectors_base, 50)  # their own vectors
    assert not np.isin(found, ids_base).any()
    from ray_mgdspr.serve.engine import LexicalChannel

    titles = before.filter(pa.array(np.isin(before["item_id"].to_numpy(), gone)))["title_words"].to_pylist()
    lexical = [LexicalChannel(Path(config.out) / v).search(titles, 20, [()] * len(titles))
               for v in ("v-test", "v-test.d2")]
    assert all(np.isin(hits.item_ids, gone).any() for hits in lexical[0])  # BM25 over the base finds them
    assert not any(np.isin(hits.item_ids, gone).any() for hits in lexical[1])  # the channel follows the version
    untouched = set(range(3)) - set(result.delta.shards_touched)
    for s in untouched:  # not rewritten: the base's bytes (a hard link where the file system allows)
        for ext in ("faiss", "parquet"):
            a, b = (Path(config.out) / v / f"shard-{s:05d}.{ext}" for v in ("v-test", "v-test.d2"))
            assert a.read_bytes() == b.read_bytes()


def test_ivf_delta_keeps_recall_within_a_point_of_a_full_build(tmp_path: Path, world_en: Path, bundle: Path
                                                               ) -> None:
    ivf = dict(shards=2, factory="IVF8,Flat", nprobe=2)
    config = IndexConfig(out=str(tmp_path / "index"), **ivf)
    context = item_context(bundle)
    full_build(tmp_path / "index", "v-test", items_of(world_en), bundle, config, context)
    after = daily_churn(items_of(world_en), share=0.04, seed=2)
    update_index(after, bundle, config, version="v-test.d1")
    ref = IndexConfig(out=str(tmp_path / "full"), **ivf)
    vectors = full_build(tmp_path / "full", "v-test", after, bundle, ref, context)
    ids_all, _ = embed_rows(bundle, after, context)
    queries = vectors[np.random.default_rng(1).choice(len(vectors), 200, replace=False)]
    exact = ids_all[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]

    def recall(path: Path) -> float:
        _, got = IndexReader(path, nprobe=2).search(queries, 10)
        return float(np.mean([len(np.intersect1d(g, e)) / 10 for g, e in zip(got, exact, strict=True)]))

    delta_recall, full_recall = recall(Path(config.out) / "v-test.d1"), recall(Path(ref.out) / "v-test")
    assert delta_recall >= full_recall - 0.01, (delta_recall, full_recall)


def test_refusals_name_the_reason(tmp_path: Path, world_en: Path, bundle: Path, base) -> None:
    config, _ = base
    with pytest.raises(FileExistsError, match="immutable"):
        update_index(items_of(world_en), bundle, config, version="v-test")
    with pytest.raises(FileNotFoundError, match="no CURRENT"):
        update_index(items_of(world_en), bundle, IndexConfig(out=str(tmp_path / "empty")))
    other = tmp_path / "other-bundle"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["version"] = "v-other"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the model of index version v-test"):
        update_index(items_of(world_en), other, config)
    hnsw = IndexConfig(out=str(tmp_path / "hnsw"), shards=1, factory="HNSW8")
    full_build(tmp_path / "hnsw", "v-test", items_of(world_en), bundle, hnsw, item_context(bundle))
    with pytest.raises(ValueError, match=r"cannot remove vectors.*mgdspr index build"):
        update_index(daily_churn(items_of(world_en), share=0.04), bundle, hnsw, version="v-test.d1")
    assert list_versions(hnsw.out) == ["v-test"]  # nothing half-written
    no_prices = IndexConfig(out=str(tmp_path / "old"), shards=1)
    items = items_of(world_en).drop_columns(["price", "shop_id"])
    ids, vectors = embed_rows(bundle, items_of(world_en), item_context(bundle))
    model = read_bundle_manifest(bundle)
    build_index_version(no_prices.out, "v-test", split_by_shard(vectors, ids, items, 1), no_prices, "v-test",
                        model.files["item_tower.pt"], 16, make_current=True, bundle=str(bundle))
    with pytest.raises(ValueError, match=r"no shop_id or price.*index build"):
        update_index(items_of(world_en), bundle, no_prices)


def test_cli_update_writes_a_new_version_from_a_changed_world(tmp_path: Path, world_en: Path, bundle: Path,
                                                              base) -> None:
    config, _ = base
    world = tmp_path / "world"
    shutil.copytree(world_en, world)
    items = pq.read_table(world_en / "items.parquet")
    pq.write_table(conform(ITEMS, daily_churn(items, share=0.04, seed=5)), world / "items.parquet")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"index": {"out": config.out, "shards": 3}, "train": {"world": str(world)}}))
    cli = [sys.executable, "-m", "ray_mgdspr.cli", "index", "update", "--bundle", str(bundle), "--config", str(cfg)]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run([*cli, "--version", "v-test.d5"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "+15 new, -15 removed, ~30 changed" in done.stdout and "now current" in done.stdout
    assert current_version(config.out) == "v-test.d5"
    again = subprocess.run([*cli, "--version", "v-test.d5"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "immutable" in again.stderr


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "IVF4,PQ4", "IVF4,SQ8"])
def test_without_keeps_every_other_vector_where_it_was(factory: str) -> None:
    """Removing items leaves every kept entry's list and code as it was: searches give the base's answers with the
    removed items taken out (IVF: not what IDMap2.remove_ids gives, whose positions go out of step)."""
    from ray_mgdspr.index.shards import build_shard
    from ray_mgdspr.index.update import without

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    ids = rng.choice(10**9, 400, replace=False).astype(np.int64)
    index = build_shard(vectors, ids, factory)
    gone = ids[rng.choice(400, 40, replace=False)]
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    for ivf in filter(None, [__import__("faiss").try_extract_index_ivf(index)]):
        ivf.nprobe = 4  # every list: the answers are comparable item for item
    scores, found = index.search(queries, 400)
    smaller = without(index, gone)
    assert smaller.ntotal == 360
    got_scores, got = smaller.search(queries, 360)
    for row in range(30):
        keep = ~np.isin(found[row], gone)
        assert got[row].tolist() == found[row][keep].tolist()
        np.testing.assert_allclose(got_scores[row], scores[row][keep], rtol=1e-6)
    smaller.add_with_ids(rng.standard_normal((5, 16)).astype(np.float32), np.arange(5, dtype=np.int64))
    everything = smaller.search(queries[:1], 365)[1][0]  # every list probed, k = all: each entry once
    assert sorted(everything.tolist()) == sorted([*ids[~np.isin(ids, gone)].tolist(), *range(5)])


def test_a_bundle_without_price_levels_updates_with_the_base_catalogues(tmp_path: Path, world_en: Path,
                                                                        bundle: Path) -> None:
    """A bundle written before bundles carried their price levels: the delta embeds with the edges of the base's
    own catalogue (the ones its vectors were made with), and still equals a full build made with them."""
    old_style = tmp_path / "bundle"
    shutil.copytree(bundle, old_style)
    manifest = json.loads((old_style / "manifest.json").read_text())
    del manifest["files"]["price_levels.json"]
    (old_style / "price_levels.json").unlink()
    (old_style / "manifest.json").write_text(json.dumps(manifest))
    assert price_levels(old_style) is None
    config = IndexConfig(out=str(tmp_path / "index"), shards=2)
    before = items_of(world_en)
    base_edges = ItemContext(PriceLevels.of_world(world_en), item_popularity(old_style))
    full_build(tmp_path / "index", "v-test", before, old_style, config, base_edges)
    after = daily_churn(before, share=0.04, seed=4)
    update_index(after, old_style, config, version="v-test.d1")
    ref = IndexConfig(out=str(tmp_path / "full"), shards=2)
    full_build(tmp_path / "full", "v-test", after, old_style, ref, base_edges)
    for s in range(2):
        assert pq.read_table(Path(config.out) / "v-test.d1" / f"shard-{s:05d}.parquet").equals(
            pq.read_table(Path(ref.out) / "v-test" / f"shard-{s:05d}.parquet"))
    queries = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    np.testing.assert_allclose(IndexReader(Path(config.out) / "v-test.d1").search(queries, 10)[0],
                               IndexReader(Path(ref.out) / "v-test").search(queries, 10)[0], rtol=1e-5, atol=1e-6)
