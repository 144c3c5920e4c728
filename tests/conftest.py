"""Shared fixtures. Ray-free: simulated worlds are written once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

from pathlib import Path

import pytest
from helpers import small_config

from ray_mgdspr.config import VocabConfig
from ray_mgdspr.data.simulator.simulate import simulate
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world


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


@pytest.fixture(scope="session")
def vocab_en(world_en: Path) -> Vocabulary:
    return build_vocab_from_world(world_en, VocabConfig())


@pytest.fixture(scope="session")
def vocab_zh(world_zh: Path) -> Vocabulary:
    return build_vocab_from_world(world_zh, VocabConfig())
