"""Checkpoints without pickle: tensors in ``state.pt`` (loaded with ``weights_only``), progress in JSON; a planted
pickle payload is refused with the file's name and never runs (Ray-free; resuming a real Ray run from an honest
checkpoint is ``test_ray_training.py::test_resume_continues_from_checkpoint``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ray_mgdspr.config import FeatureConfig, ModelConfig, OptimConfig
from ray_mgdspr.model.batch import random_batch
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.model.mgdspr import build_model
from ray_mgdspr.model.optim import model_optimizer
from ray_mgdspr.train.trainer import PROGRESS, STATE, CheckpointError, load_checkpoint, save_checkpoint

SIZES = {"words": 40, "chars": 40, "bigrams": 40}
FEATURES = FeatureConfig(realtime_len=4, short_len=5, long_len=4, his_queries=3, query_words_kept=5)
MODEL = ModelConfig(d=8, heads=2, item_buckets=61, shop_buckets=60, brand_buckets=60, category_buckets=60)


def trained(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(MODEL, SIZES)
    optimizer = model_optimizer(model, OptimConfig(kind=kind))
    batch = as_tensors(random_batch(6, FEATURES, vocab_size=40, n_items=60, fill=0.7, seed=0))
    h_qu, h_item, _ = model(batch)
    (h_qu * h_item).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_checkpoint_round_trip_restores_model_optimiser_and_progress(tmp_path: Path, kind: str) -> None:
    model, optimizer = trained(kind)
    progress = {"epoch": 1, "step_in_epoch": 3, "global_step": 35, "history": [{"epoch": 1, "loss": 5.25}],
                "resumed_at": [20]}
    save_checkpoint(tmp_path, model, optimizer, progress)
    assert json.loads((tmp_path / PROGRESS).read_text()) == progress
    tensors, loaded = load_checkpoint(tmp_path)
    assert loaded == progress
    fresh = build_model(MODEL, SIZES)
    fresh.load_state_dict(tensors["model"])
    again = model_optimizer(fresh, OptimConfig(kind=kind))
    again.load_state_dict(tensors["optimizer"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert str(again.state_dict()) == str(optimizer.state_dict())


class Payload:
    """What an attacker with write access to the checkpoint storage would plant: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    model, optimizer = trained("adam")
    save_checkpoint(tmp_path, model, optimizer, {"epoch": 1})
    marker = tmp_path / "pwned"
    torch.save({"model": model.state_dict(), "optimizer": Payload(marker)}, tmp_path / STATE)
    with pytest.raises(CheckpointError, match=f"{tmp_path / STATE}: refused"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_old_or_incomplete_checkpoints_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{tmp_path / PROGRESS}: missing"):
        load_checkpoint(tmp_path)
    (tmp_path / PROGRESS).write_text("{}")
    with pytest.raises(CheckpointError, match=f"{tmp_path / STATE}: missing"):
        load_checkpoint(tmp_path)
    (tmp_path / STATE).write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path)
