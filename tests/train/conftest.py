"""Fixtures of the Ray training tests: one local Ray runtime per module, with the dashboard (the State API)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

import logging
from collections.abc import Iterator

import pytest
from helpers import RAY_TEST_ENV, wait_for_state_api


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    """A local Ray with 4 logical CPUs (2 workers x 0.5 CPU + Ray Data's reader and featurizer on 2 cores) and the
    dashboard on (Train needs the State API). Reused when Ray is already initialised; shut down only if started."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        started = not ray.is_initialized()
        if started:
            for key, value in RAY_TEST_ENV.items():
                mp.setenv(key, value)
            # "local": a new Ray of its own, never a `ray start` cluster that /tmp/ray/ray_current_cluster points to
            ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False,
                     logging_level=logging.WARNING)
            wait_for_state_api()
        context = ray.data.DataContext.get_current()
        progress_bars, context.enable_progress_bars = context.enable_progress_bars, False
        try:
            yield
        finally:
            context.enable_progress_bars = progress_bars
            if started:
                ray.shutdown()

