"""A real learning test: single-process training on a small simulated world (synthetic data) lowers the
loss and reaches a Recall@K far above chance and far above the untrained model on the held-out test day."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ray_mgdspr.config import FeatureConfig, LossConfig, ModelConfig, OptimConfig, VocabConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.vocab import KINDS, build_vocab_from_world
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.metrics import recall_at_k
from ray_mgdspr.model.mgdspr import build_model
from ray_mgdspr.model.retrieval import CatalogueFeatures, retrieve, targets_of
from ray_mgdspr.model.tables import resolve_buckets, world_max_ids
from ray_mgdspr.train.loop import fit_local

K = 50
STEPS = 500
FEATURES = FeatureConfig(realtime_len=20, short_len=30, long_len=20, his_queries=5)
MODEL = ModelConfig(d=32, heads=4)
LOSS = LossConfig(pool_size=256, n_hard=64)
OPTIM, BATCH = OptimConfig(), 64  # Adam 3e-3 (the paper's Adagrad 0.1 needs far more than a few hundred steps)


@pytest.fixture(scope="module")
def setup(world_en: Path) -> dict:
    vocab = build_vocab_from_world(world_en, VocabConfig())
    featurizer = Featurizer(world_en, vocab, FEATURES)
    manifest = read_manifest(world_en)
    events = featurizer.events(manifest.test_days)
    items = read_table(world_en, "items", columns=["item_id"])["item_id"].to_numpy()
    return {"world": world_en, "vocab": vocab, "featurizer": featurizer, "manifest": manifest, "events": events,
            "catalogue": CatalogueFeatures.from_featurizer(featurizer, items)}


def _recall(model: torch.nn.Module, s: dict) -> float:
    topk = retrieve(model, s["featurizer"](s["events"]), s["catalogue"], K)
    return recall_at_k(topk, targets_of(s["events"]), K)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mgdspr", "dnn"])
def test_training_learns_to_retrieve(setup: dict, kind: str) -> None:
    s = setup
    model_cfg = MODEL.model_copy(update={"kind": kind})
    loss_cfg = LOSS if kind == "mgdspr" else LOSS.model_copy(update={"kind": "hinge"})
    torch.manual_seed(0)
    sizes = {k: s["vocab"].num_ids(k) for k in KINDS}
    untrained = build_model(resolve_buckets(model_cfg, world_max_ids(s["world"])), sizes)
    run = fit_local(s["featurizer"], s["vocab"], s["world"], s["manifest"].train_days, model_cfg, loss_cfg, OPTIM,
                    steps=STEPS, batch_size=BATCH, seed=0)
    losses = np.array([h["loss"] for h in run.history])
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.9 * losses[:20].mean(), (losses[:20].mean(), losses[-20:].mean())

    chance = K / len(s["catalogue"])
    before, after = _recall(untrained, s), _recall(run.model, s)
    print(f"{kind}: Recall@{K} untrained {before:.3f}, trained {after:.3f}, chance {chance:.3f} "
          f"({s['events'].num_rows} test events, {STEPS} steps in {run.seconds:.0f}s; SYNTHETIC data)")
    assert before < 3 * chance
    assert after > 5 * chance and after > before + 0.15


@pytest.mark.slow
def test_softmax_loss_leaves_the_uniform_value_within_the_first_tenth_of_training(setup: dict) -> None:
    """No initial plateau (issue 14): with the default optimiser and initialisation the softmax loss is below
    log(|pool| + N), the loss of scores that are all equal, within 10 % of the 500 steps of the learning test."""
    s = setup
    uniform = float(np.log(LOSS.pool_size + LOSS.n_hard))
    run = fit_local(s["featurizer"], s["vocab"], s["world"], s["manifest"].train_days, MODEL, LOSS, OPTIM,
                    steps=STEPS // 10, batch_size=BATCH, seed=1)
    losses = np.array([h["loss"] for h in run.history])
    print(f"uniform {uniform:.3f}; mean loss of steps 1-10 {losses[:10].mean():.3f}, 41-50 {losses[-10:].mean():.3f}")
    assert losses[-10:].mean() < uniform - 0.1, (uniform, losses[-10:].mean())
