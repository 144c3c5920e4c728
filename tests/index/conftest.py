"""Fixtures of the index tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_mgdspr.config import FeatureConfig, LossConfig, ModelConfig, VocabConfig
from ray_mgdspr.data.features import ItemContext
from ray_mgdspr.data.vocab import KINDS, build_vocab_from_world
from ray_mgdspr.model.bundle import save_bundle
from ray_mgdspr.model.mgdspr import build_model
from ray_mgdspr.model.tables import resolve_buckets, world_max_ids


@pytest.fixture(scope="session")
def bundle(world_en: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained, seeded) model bundle for world_en, version ``v-test``, with the world's price levels as a
    trained bundle carries them: embedding does not need a trained model."""
    vocab = build_vocab_from_world(world_en, VocabConfig())
    torch.manual_seed(0)
    cfg = resolve_buckets(ModelConfig(d=16, heads=4), world_max_ids(world_en))
    model = build_model(cfg, {k: vocab.num_ids(k) for k in KINDS})
    out = tmp_path_factory.mktemp("bundle") / "b"
    save_bundle(out, model, vocab, FeatureConfig(), LossConfig(), version="v-test",
                context=ItemContext.of_world(world_en))
    return out
