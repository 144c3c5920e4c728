"""Model bundles: round trip, towers loaded alone, checksums, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_mgdspr.config import FeatureConfig, LossConfig, ModelConfig
from ray_mgdspr.data.vocab import KINDS, Vocabulary
from ray_mgdspr.model.batch import random_batch
from ray_mgdspr.model.bundle import load_bundle, read_bundle_manifest, save_bundle
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.model.mgdspr import build_model

FEATURES = FeatureConfig(realtime_len=6, short_len=8, long_len=5)
CFG = ModelConfig(d=16, heads=4, item_buckets=101, shop_buckets=20, brand_buckets=20, category_buckets=20)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    tokens = {k: [(f"{k}{i}", 10 - i % 10) for i in range(30)] for k in KINDS}
    return Vocabulary("en", tokens, oov_buckets=7)


def _model(vocab: Vocabulary, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CFG, {k: vocab.num_ids(k) for k in KINDS}).eval()


def _batch(vocab: Vocabulary) -> dict[str, torch.Tensor]:
    return as_tensors(random_batch(4, FEATURES, vocab_size=vocab.num_ids("words"), n_items=100))


def test_round_trip_and_towers_alone(tmp_path: Path, vocab: Vocabulary) -> None:
    model, b = _model(vocab, 0), _batch(vocab)
    q, item, _ = model(b)
    m = save_bundle(tmp_path / "b", model, vocab, FEATURES, LossConfig(), metadata={"steps": 3}, version="v1")
    assert m.version == "v1" and m.metadata == {"steps": 3}
    assert set(m.files) == {"query_tower.pt", "item_tower.pt", "vocab.json"}
    loaded, vocab2, m2 = load_bundle(tmp_path / "b")
    assert m2.version == "v1" and vocab2.tokens == vocab.tokens and m2.features == FEATURES
    q2, item2, _ = loaded(b)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(item, item2)
    # Each tower alone: the item tower's output does not depend on the query tower file, and vice versa.
    item_only, _, _ = load_bundle(tmp_path / "b", towers=("item",))
    torch.testing.assert_close(item_only.embed_items(b), item)
    (tmp_path / "b" / "item_tower.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"item_tower\.pt is missing"):
        load_bundle(tmp_path / "b", towers=("query",))


def test_default_version_and_refusal_to_overwrite(tmp_path: Path, vocab: Vocabulary) -> None:
    m = save_bundle(tmp_path / "b", _model(vocab, 0), vocab, FEATURES, LossConfig())
    assert len(m.version.split("-")[-1]) == 8
    with pytest.raises(FileExistsError, match="overwrite"):
        save_bundle(tmp_path / "b", _model(vocab, 1), vocab, FEATURES, LossConfig())
    m2 = save_bundle(tmp_path / "b", _model(vocab, 1), vocab, FEATURES, LossConfig(), overwrite=True)
    assert m2.version != m.version  # different weights, different checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directories left


def test_corrupt_file_is_refused(tmp_path: Path, vocab: Vocabulary) -> None:
    save_bundle(tmp_path / "b", _model(vocab, 0), vocab, FEATURES, LossConfig())
    with (tmp_path / "b" / "query_tower.pt").open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"query_tower\.pt does not match its checksum"):
        read_bundle_manifest(tmp_path / "b")


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_failed_write_leaves_nothing(tmp_path: Path, vocab: Vocabulary) -> None:
    model = _model(vocab, 0)
    bad_features = FeatureConfig.model_construct(query_chars_kept=object())  # not serialisable: fails mid-write
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own error type
        save_bundle(tmp_path / "b", model, vocab, bad_features, LossConfig())
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_readable_json(tmp_path: Path, vocab: Vocabulary) -> None:
    save_bundle(tmp_path / "b", _model(vocab, 0), vocab, FEATURES, LossConfig())
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw["model"]["d"] == 16 and raw["parameters"]["query"] > raw["parameters"]["item"] > 0


def test_format_1_bundle_loads_as_the_paper_item_tower(tmp_path: Path, vocab: Vocabulary) -> None:
    """A bundle written before item side information (format 1, no such keys) loads as the paper's towers: no side
    information, no price level, no popularity, item ID rows; a format-2 one without popularity, with ID rows."""
    torch.manual_seed(0)
    paper = CFG.model_copy(update={"item_side_info": False, "price_level": False, "item_ids": True})
    model = build_model(paper, {k: vocab.num_ids(k) for k in KINDS}).eval()
    save_bundle(tmp_path / "b", model, vocab, FEATURES, LossConfig(), version="old")
    path = tmp_path / "b" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 1
    for key in ("item_side_info", "price_level", "item_popularity", "item_ids"):
        del raw["model"][key]
    path.write_text(json.dumps(raw))
    loaded, _, manifest = load_bundle(tmp_path / "b")
    assert manifest.model.item_side_info is False and manifest.model.price_level is False
    assert manifest.model.item_ids is True and manifest.model.item_popularity is False
    b = {k: v for k, v in _batch(vocab).items() if not k.endswith("_price") and k not in
         ("item_leaf", "item_cate1", "item_brand", "item_shop")}
    torch.testing.assert_close(loaded.embed_items(b), model.embed_items(b))
    two = {**raw, "format_version": 2, "model": {**raw["model"], "item_side_info": True, "price_level": True}}
    path.write_text(json.dumps(two))  # format 2: side information and price level; no popularity, ID rows
    two = read_bundle_manifest(tmp_path / "b").model
    assert (two.item_side_info, two.item_popularity, two.item_ids) == (True, False, True)
    raw["format_version"] = 7
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bundle format 7, this code reads 3"):
        load_bundle(tmp_path / "b")


def test_price_levels_and_popularity_travel_with_the_bundle(tmp_path: Path, vocab: Vocabulary) -> None:
    """The edges and counts a model was trained with are saved in its bundle (checksummed) and read back exactly;
    a bundle without them reads None, and ``item_context`` then takes them from the world it is given."""
    import numpy as np

    from ray_mgdspr.data.features import ItemContext, ItemPopularity, PriceLevels
    from ray_mgdspr.model.bundle import POPULARITY_FILE, PRICE_LEVELS_FILE, item_context, item_popularity, price_levels

    rng = np.random.default_rng(0)
    leaf, price = rng.integers(0, 40, 2000), np.round(rng.lognormal(3, 1, 2000), 2)
    trained = PriceLevels(leaf, price)
    counts = ItemPopularity(rng.permutation(3000)[:500], rng.integers(0, 5000, 500), rng.integers(0, 50, 500))
    m = save_bundle(tmp_path / "b", _model(vocab, 0), vocab, FEATURES, LossConfig(),
                    context=ItemContext(trained, counts))
    assert {PRICE_LEVELS_FILE, POPULARITY_FILE} <= m.files.keys()
    again = price_levels(tmp_path / "b")
    np.testing.assert_array_equal(again.edges, trained.edges)
    probe_leaf, probe_price = rng.integers(-1, 45, 500), rng.lognormal(3, 1, 500)
    assert again(probe_leaf, probe_price).tolist() == trained(probe_leaf, probe_price).tolist()
    probe_items = rng.integers(-1, 3500, 800)
    got, want = item_popularity(tmp_path / "b").levels(probe_items), counts.levels(probe_items)
    assert all(got[k].tolist() == want[k].tolist() for k in want) and want["item_impressions"].max() > 10
    (tmp_path / "b" / PRICE_LEVELS_FILE).write_text(trained.to_json().replace("1", "2", 1))
    with pytest.raises(ValueError, match=r"price_levels\.json does not match its checksum"):
        price_levels(tmp_path / "b")
    save_bundle(tmp_path / "c", _model(vocab, 0), vocab, FEATURES, LossConfig())
    assert price_levels(tmp_path / "c") is None and item_popularity(tmp_path / "c") is None
    with pytest.raises(ValueError, match="name the world it was trained on"):
        item_context(tmp_path / "c")
