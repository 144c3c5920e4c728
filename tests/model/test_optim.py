"""The learning-rate schedule (``optim.schedule``) and its application to every optimiser of a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_mgdspr.config import OptimConfig
from ray_mgdspr.model.optim import learning_rate_at, make_optimizer, set_learning_rate


def test_constant_schedule_is_lr_at_every_step() -> None:
    cfg = OptimConfig(lr=0.01, schedule="constant")
    assert {learning_rate_at(cfg, s, 100) for s in range(100)} == {0.01}


@pytest.mark.parametrize("total", [2, 7, 1500])
def test_cosine_runs_from_lr_down_to_the_final_ratio(total: int) -> None:
    cfg = OptimConfig(lr=0.003, schedule="cosine", final_lr_ratio=0.1)
    lrs = np.array([learning_rate_at(cfg, s, total) for s in range(total)])
    assert lrs[0] == pytest.approx(0.003) and lrs[-1] == pytest.approx(0.0003)
    assert np.all(np.diff(lrs) < 0)  # strictly decreasing
    assert learning_rate_at(cfg, total + 10, total) == pytest.approx(0.0003)  # past the end: stays at the floor
    if total % 2 == 1:
        assert lrs[total // 2] == pytest.approx(0.00165)  # half way: the mean of lr and the floor


def test_a_one_step_run_uses_lr() -> None:
    assert learning_rate_at(OptimConfig(lr=0.5, schedule="cosine"), 0, 1) == 0.5


@pytest.mark.parametrize(("scaling", "want"), [("none", 0.003), ("sqrt", 0.006), ("linear", 0.012)])
def test_lr_scales_with_the_global_batch(scaling: str, want: float) -> None:
    cfg = OptimConfig(lr=0.003, schedule="constant", lr_scaling=scaling, lr_reference_batch=256)
    assert learning_rate_at(cfg, 5, 100, global_batch=1024) == pytest.approx(want)
    assert learning_rate_at(cfg, 5, 100, global_batch=256) == pytest.approx(0.003)  # the reference: unscaled
    assert learning_rate_at(cfg, 5, 100) == pytest.approx(0.003)  # no batch given: unscaled


def test_warmup_rises_to_the_scaled_lr_then_the_cosine_ends_at_the_floor() -> None:
    cfg = OptimConfig(lr=0.001, schedule="cosine", final_lr_ratio=0.1, warmup_steps=10, lr_scaling="sqrt")
    total, peak = 110, 0.001 * 4  # batch 4096 = 16 x 256: sqrt -> 4x
    lrs = np.array([learning_rate_at(cfg, s, total, global_batch=4096) for s in range(total)])
    assert np.all(np.diff(lrs[:10]) > 0) and lrs[0] == pytest.approx(peak / 10)
    assert lrs[9] == pytest.approx(peak) and lrs[10] == pytest.approx(peak)  # warm-up ends where the cosine starts
    assert np.all(np.diff(lrs[10:]) < 0) and lrs[-1] == pytest.approx(peak * 0.1)


def test_final_lr_ratio_is_bounded() -> None:
    with pytest.raises(ValueError, match="final_lr_ratio"):
        OptimConfig(schedule="cosine", final_lr_ratio=1.5)


def test_set_learning_rate_reaches_the_dense_and_the_sparse_optimiser() -> None:
    table, dense = torch.nn.Embedding(5, 2, sparse=True), torch.nn.Linear(2, 1)
    opt = make_optimizer([*table.parameters(), *dense.parameters()], OptimConfig(kind="adam", lr=0.1),
                         sparse_params=[table.weight])
    set_learning_rate(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]
    before = table.weight.detach().clone()
    table(torch.tensor([1])).sum().backward()
    opt.step()
    moved = (table.weight.detach() - before).abs().max().item()
    assert moved == pytest.approx(0.02, rel=1e-3)  # Adam's first step is lr per coordinate
