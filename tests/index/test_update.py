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
from ray_mgdspr.index.shards import build_index_version, shard_items, split_by_shard, verify_index
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


def assert_same_index(path: Path, ref: Path, dim: int) -> None:
    """The versions at ``path`` and ``ref`` serve the same items with the same metadata, shard by shard, and give
    the same answers (Flat: exact search, equal up to exact score ties)."""
    queries = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    scores, ids = IndexReader(path).search(queries, 20)
    ref_scores, ref_ids = IndexReader(ref).search(queries, 20)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert (ids == ref_ids).mean() > 0.99
    for mine, theirs in zip(read_manifest(path).shards, read_manifest(ref).shards, strict=True):
        assert shard_items(path, mine).equals(shard_items(ref, theirs))


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
    # 4% of the items changed: below compact_at (10%), so every shard keeps its base files and gains a segment
    assert m.delta.shards_touched == [0, 1, 2] and m.delta.shards_compacted == [] and m.format_version == 2
    for entry in m.shards:
        assert entry.delta is not None and entry.delta.rows + entry.delta.removed < 0.1 * entry.base_rows
        for name in (entry.index_file, entry.metadata_file):  # the base's bytes (linked where the disk allows)
            assert (Path(config.out) / "v-test.d1" / name).read_bytes() == (Path(config.out) / "v-test" / name
                                                                            ).read_bytes()

    # the reference: a full build of the changed catalogue (with the model's price levels, as embed_catalogue)
    ref = IndexConfig(out=str(tmp_path / "full"), shards=3)
    vectors = full_build(tmp_path / "full", "v-test", after, bundle, ref, context)
    assert_same_index(Path(config.out) / "v-test.d1", Path(ref.out) / "v-test", vectors.shape[1])


def test_deltas_day_after_day_fold_into_one_segment_then_compact(tmp_path: Path, world_en: Path, bundle: Path,
                                                                 base) -> None:
    """Three days of churn on top of each other: each version still equals a full build of its day's catalogue; a
    shard carries one segment (the days folded), until its changes reach compact_at and it is rewritten."""
    config, context = base
    root = Path(config.out)
    day, previous = items_of(world_en), "v-test"
    for n, share in enumerate((0.02, 0.02, 0.08), start=1):
        day = daily_churn(day, share=share, seed=10 + n)
        m = update_index(day, bundle, config, base=previous, version=f"v-test.d{n}").manifest
        ref = IndexConfig(out=str(tmp_path / f"full{n}"), shards=3)
        vectors = full_build(Path(ref.out), "v-test", day, bundle, ref, context)
        assert_same_index(root / f"v-test.d{n}", Path(ref.out) / "v-test", vectors.shape[1])
        assert verify_index(root / f"v-test.d{n}") == []
        segments = [e.delta for e in m.shards if e.delta is not None]
        assert all(len(list((root / m.version).glob(f"shard-{e.shard:05d}.*"))) == (5 if e.delta else 2)
                   for e in m.shards)  # one segment per shard: the earlier days' folded in
        previous = m.version
        if n < 3:
            assert m.delta.shards_compacted == [] and len(segments) == 3
    assert m.delta.shards_compacted == [0, 1, 2]  # 2% + 2% + 8% of changes: past 10%, rewritten in full
    assert all(e.delta is None for e in m.shards) and m.format_version == 1


def test_compact_at_zero_rewrites_every_touched_shard(tmp_path: Path, world_en: Path, bundle: Path, base) -> None:
    config, context = base
    after = daily_churn(items_of(world_en), share=0.04, seed=1)
    m = update_index(after, bundle, config.model_copy(update={"compact_at": 0.0}), version="v-test.d1").manifest
    assert m.delta.shards_compacted == [0, 1, 2] and all(e.delta is None for e in m.shards)
    ref = IndexConfig(out=str(tmp_path / "full"), shards=3)
    vectors = full_build(tmp_path / "full", "v-test", after, bundle, ref, context)
    assert_same_index(Path(config.out) / "v-test.d1", Path(ref.out) / "v-test", vectors.shape[1])
    for s in range(3):  # compacted: the files a full build writes
        assert (pq.read_table(Path(config.out) / "v-test.d1" / f"shard-{s:05d}.parquet")
                .equals(pq.read_table(Path(ref.out) / "v-test" / f"shard-{s:05d}.parquet")))


def test_a_damaged_delta_segment_fails_verification_and_loading(tmp_path: Path, world_en: Path, bundle: Path,
                                                                base) -> None:
    from ray_mgdspr.index.shards import IndexCorruptError

    config, _ = base
    update_index(daily_churn(items_of(world_en), share=0.04, seed=1), bundle, config, version="v-test.d1")
    path = Path(config.out) / "v-test.d1"
    segment = read_manifest(path).shards[1].delta
    removed = path / segment.removed_file
    data = removed.read_bytes()
    removed.unlink()  # a hard link could share its bytes with nothing else here, but write a new file anyway
    removed.write_bytes(data[:-8] + np.int64(-7).tobytes())
    problems = verify_index(path)
    assert problems == [f"shard 1: {segment.removed_file} does not match its sha256 (corrupt or modified)"]
    with pytest.raises(IndexCorruptError, match=segment.removed_file):
        IndexReader(path)
    with pytest.raises(ValueError, match=r"fails verification.*removed"):
        update_index(items_of(world_en), bundle, config, base="v-test.d1", version="v-test.d2")


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
    for s in range(3):  # every shard keeps the base's files (touched ones gain a segment beside them)
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
    assert all(e.delta for e in read_manifest(Path(config.out) / "v-test.d5").shards)
    # the scheduled compaction: the same catalogue (no change), every segment folded into new base files
    compacted = subprocess.run([*cli, "--version", "v-test.d6", "--compact"], capture_output=True, text=True,
                               env=env, timeout=300)
    assert compacted.returncode == 0, compacted.stderr
    assert "+0 new, -0 removed, ~0 changed; shards [] touched, [0, 1, 2] compacted" in compacted.stdout
    m = read_manifest(Path(config.out) / "v-test.d6")
    assert all(e.delta is None for e in m.shards) and m.format_version == 1 and verify_index(Path(config.out) /
                                                                                             "v-test.d6") == []
    assert shard_items(Path(config.out) / "v-test.d6", m.shards[0]).equals(
        shard_items(Path(config.out) / "v-test.d5", read_manifest(Path(config.out) / "v-test.d5").shards[0]))


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "IVF4,PQ4", "IVF4,SQ8"])
def test_without_keeps_every_other_vector_where_it_was(factory: str) -> None:
    """Removing items leaves every kept entry's list and code as it was: searches give the base's answers with the
    removed items taken out (IVF: not what IDMap2.remove_ids gives, whose positions go out of step)."""
    from ray_mgdspr.index.shards import build_shard, without

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
    assert_same_index(Path(config.out) / "v-test.d1", Path(ref.out) / "v-test", 16)
