"""EvalSet scoring against the simulator's ground truth, and real (tiny) training runs with curves and ANN loss
on a small simulated world (synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ray_mgdspr.config import FeatureConfig, IndexConfig, LossConfig, ModelConfig, OptimConfig, VocabConfig
from ray_mgdspr.data.vocab import build_vocab_from_world
from ray_mgdspr.data.world import read_table
from ray_mgdspr.eval.evalset import EvalSet
from ray_mgdspr.eval.experiments import evalset_inputs, run_key, run_plan
from ray_mgdspr.eval.report import demo_table
from ray_mgdspr.eval.runs import RunSpec, run_one, variant_configs
from ray_mgdspr.index.shards import METADATA_SCHEMA, build_index_version, split_by_shard
from ray_mgdspr.model.bundle import save_bundle
from ray_mgdspr.model.retrieval import item_vectors
from ray_mgdspr.train.loop import fit_local

FEATURES = FeatureConfig(realtime_len=10, short_len=10, long_len=10, his_queries=3)
MODEL = ModelConfig(d=16, heads=2)
LOSS = LossConfig(pool_size=128, n_hard=32)
OPTIM, BATCH = OptimConfig(), 32


@pytest.fixture(scope="module")
def data(world_en: Path) -> EvalSet:
    return EvalSet.load(world_en, build_vocab_from_world(world_en, VocabConfig()), FEATURES, max_events=200)


def test_evalset_carries_the_logged_intents(data: EvalSet, world_en: Path) -> None:
    logged = read_table(world_en, "search_events").to_pandas().set_index("event_id")
    rows = logged.loc[data.events["event_id"].to_numpy()]
    assert len(data) == 200
    np.testing.assert_array_equal(data.events["intent_leaf_id"].to_numpy(), rows["intent_leaf_id"].to_numpy())
    for targets, clicked, bought in zip(data.targets, rows["clicked_item_ids"], rows["bought_item_ids"], strict=True):
        assert set(targets.tolist()) == set(clicked) | set(bought)


def test_scores_of_oracle_rankings(data: EvalSet) -> None:
    """Targets first: Recall@K is 1 once K covers them. Items of the intended leaf first: P_good@K is the share of
    the leaf that fits in K, computed here from the items table."""
    k = 20
    items = read_table(data.world, "items", columns=["item_id", "leaf_id"]).to_pandas()
    leaf_items = items.groupby("leaf_id")["item_id"].apply(list).to_dict()
    targets_first = np.full((len(data), k), -1)
    leaf_first = np.full((len(data), k), -1)
    for r, (t, leaf) in enumerate(zip(data.targets, data.events["intent_leaf_id"].to_pylist(), strict=True)):
        targets_first[r, : min(k, len(t))] = t[:k]
        same = leaf_items.get(leaf, [])[:k]
        leaf_first[r, : len(same)] = same
    assert data.score(targets_first, [k])[f"recall@{k}"] == pytest.approx(
        np.mean([min(len(t), k) / len(t) for t in data.targets]))
    leaves = data.events["intent_leaf_id"].to_pylist()
    expected = np.mean([min(len(leaf_items.get(leaf, [])), k) / k for leaf in leaves])
    scores = data.score(leaf_first, [k], [k])
    assert scores[f"p_good@{k}"] == pytest.approx(expected)
    assert scores[f"p_exact@{k}"] <= scores[f"p_good@{k}"]
    passes = data.relevance.pass_mask(data.query_words, leaf_first)
    assert scores[f"pass@{k}"] == pytest.approx(passes.sum(1).mean())
    assert 0 < scores[f"pass@{k}"] < k


def test_variant_configs_switch_one_thing() -> None:
    assert variant_configs("no_mgs", MODEL, LOSS) == (MODEL.model_copy(update={"mgs": False}), LOSS)
    assert variant_configs("dnn_hinge", MODEL, LOSS)[1].kind == "hinge"
    assert variant_configs("alpha=0.8-1", MODEL, LOSS)[1].alpha_low == 0.8
    assert variant_configs("tau=4", MODEL, LOSS)[1].tau == 4.0
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        variant_configs("nope", MODEL, LOSS)


def test_trained_run_learns_and_measures_the_index(data: EvalSet) -> None:
    """A real fit_local run: recall well above chance; the exact Flat index loses no recall, IVF at nprobe 1 some."""
    ann = (IndexConfig(factory="Flat", shards=3), IndexConfig(factory="IVF16,Flat", shards=2, nprobe=1))
    spec = RunSpec("en", "mgdspr", 0, 200, (10, 100), (10,), 100, MODEL, LOSS, OPTIM, BATCH, ann)
    record = run_one(spec, data)
    curve = record["curve"]
    assert [p["step"] for p in curve] == [100, 200]
    chance = 100 / len(data.catalogue)
    assert record["metrics"]["recall@100"] == pytest.approx(curve[-1]["recall@100"])
    assert record["metrics"]["recall@100"] > 2 * chance
    flat, ivf = record["ann"]
    assert flat["factory"] == "Flat" and abs(flat["recall_lost@100"]) < 1e-9 and flat["overlap@100"] > 0.999
    assert ivf["overlap@100"] < 0.999 and 0 <= ivf["overlap@10"] <= 1


def test_journal_reuses_finished_runs_only_when_nothing_changed(data: EvalSet, tmp_path: Path) -> None:
    specs = [RunSpec("en", v, 0, 50, (10,), (), 50, MODEL, LOSS, OPTIM, BATCH) for v in ("bm25", "mgdspr")]
    world, inputs = data.manifest.config, evalset_inputs(data)
    journal = tmp_path / "runs.jsonl"
    journal.write_text("".join(json.dumps({"key": run_key(s, world, inputs), "variant": s.variant, "metrics": {}})
                               + "\n" for s in specs))
    records = run_plan(specs, {"en": data}, 1.0, journal=journal)  # all journalled: Ray is never needed
    assert [r["variant"] for r in records] == ["bm25", "mgdspr"]
    longer = RunSpec("en", "mgdspr", 0, 60, (10,), (), 50, MODEL, LOSS, OPTIM, BATCH)
    assert run_key(longer, world) != run_key(specs[1], world)
    assert run_key(specs[1], {**world, "seed": 1}) != run_key(specs[1], world)
    longer_sequences = {**inputs, "features": {**inputs["features"], "short_len": 30}}
    assert run_key(specs[1], world, longer_sequences) != run_key(specs[1], world, inputs)  # features are inputs too


def test_demo_table_compares_the_served_model_with_bm25(data: EvalSet, tmp_path: Path) -> None:
    """The README demo's table from a real bundle and a real (Flat, 2-shard) index version of its vectors."""
    run = fit_local(data.featurizer, data.featurizer.vocab, data.world, data.manifest.train_days, MODEL, LOSS, OPTIM,
                    steps=60, batch_size=BATCH)
    save_bundle(tmp_path / "bundle", run.model, run.vocab, FEATURES, LOSS)
    vectors = item_vectors(run.model, data.catalogue).numpy()
    metadata = read_table(data.world, "items", columns=METADATA_SCHEMA.names)
    cfg = IndexConfig(shards=2)
    build_index_version(tmp_path / "index", "v1", split_by_shard(vectors, data.catalogue.item_id, metadata, 2), cfg,
                        "v1", "test", vectors.shape[1])
    table = demo_table(data.world, tmp_path / "bundle", tmp_path / "index" / "v1", k=20, max_events=100)
    lines = table.splitlines()
    assert lines[0].startswith("**SYNTHETIC data**") and "1,500 items" in lines[0] and "100 held-out" in lines[0]
    served, exact, bm25 = (line.split("|")[2:6] for line in lines[-3:])
    assert "served index" in lines[-3] and "BM25" in lines[-1]
    assert served == exact  # a Flat index answers exactly like the brute-force search
    assert served != bm25
    assert [line.split("|")[1].strip() for line in lines[4:7]] == [
        "oracle: user-aware propensity × exposure", "oracle: user-agnostic propensity × exposure",
        "oracle: ground-truth grade only"]
