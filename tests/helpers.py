"""Helpers shared by test modules (imported by name: tests/ is on ``sys.path`` as the root conftest's directory;
``from conftest import`` would find whichever conftest.py was imported first)."""

from __future__ import annotations

import time

from ray_mgdspr.config import SimulateConfig

SMALL = dict(n_items=1500, n_users=300, n_brands=120, n_shops=200, warmup_days=10)


def small_config(**overrides: object) -> SimulateConfig:
    """A world that simulates in about a second (synthetic)."""
    return SimulateConfig(**{**SMALL, **overrides})


RAY_TEST_ENV = {
    # Set before Ray starts: the raylet, and every worker it starts, inherits them.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # Train notices finished or dead workers sooner: ~11 s -> ~7 s per fit
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Data 2.60 lists Parquet files with 32 footer-reader actors per read, i.e. per epoch: on 2 cores starting
    # them costs ~10 s of each ~13 s epoch of world_en. One actor reads the 7 footers as fast.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}


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
