"""Fixtures of the Ray training tests: one local Ray runtime per module, with the dashboard (the State API)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

import logging
import time
from collections.abc import Iterator

import pytest

RAY_TEST_ENV = {
    # Set before Ray starts: the raylet, and every worker it starts, inherits them.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # Train notices finished or dead workers sooner: ~11 s -> ~7 s per fit
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Data 2.60 lists Parquet files with 32 footer-reader actors per read, i.e. per epoch: on 2 cores starting
    # them costs ~10 s of each ~13 s epoch of world_en. One actor reads the 7 footers as fast.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}


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


def wait_for_state_api(timeout_s: float = 60.0) -> None:
    """The dashboard starts after ``ray.init`` returns (seconds later on a busy machine): wait until the State API
    answers, so tests that list actors do not race it."""
    import ray
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # the address: without it the client looks for "the" cluster and fails when others run on the machine
            list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=5)
            return
        except Exception:
            if time.monotonic() > deadline:
                return  # the tests fall back to finding worker processes without it
            time.sleep(0.5)
