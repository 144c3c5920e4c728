"""Shared fixtures. Ray-free: simulated worlds are written once per test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

from pathlib import Path

import pytest
from helpers import small_config

from ray_mgdspr.config import VocabConfig
from ray_mgdspr.data.simulator.simulate import simulate
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world


@pytest.fixture(autouse=True, scope="module")
def no_ray_from_another_module() -> None:
    """Every module starts without Ray in this process: one that an earlier module left running (`mgdspr eval`
    or another command run in process leaves its Ray up, as a CLI may) is shut down first, so that each module's
    own fixture starts Ray with its own settings (Train's dashboard, test_faults' metrics export, test_app's 8
    CPUs) whichever modules ran before it (pytest-randomly orders modules at random)."""
    ray = sys.modules.get("ray")  # never imported: nothing runs (and Ray-free modules do not import it here)
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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


@pytest.fixture(scope="module")
def one_faiss_thread() -> Iterator[None]:
    """Faiss's OpenMP threads spin-wait for each other: on a busy 2-core machine one thread is 3x faster. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
