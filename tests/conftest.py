"""Shared fixtures. Ray-free: simulated worlds are written once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

from pathlib import Path

import pytest

from ray_mgdspr.config import SimulateConfig
from ray_mgdspr.data.simulator.simulate import simulate

SMALL = dict(n_items=1500, n_users=300, n_brands=120, n_shops=200, warmup_days=10)


def small_config(**overrides: object) -> SimulateConfig:
    """A world that simulates in about a second (synthetic)."""
    return SimulateConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="session")
def world_en(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("worlds") / "en"
    simulate(small_config(lang="en"), out)
    return out


@pytest.fixture(scope="session")
def world_zh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("worlds") / "zh"
    simulate(small_config(lang="zh"), out)
    return out
