"""Joining or starting Ray for a command (resources come from the config, never from constants)."""

from __future__ import annotations

import logging
import os

from ray_mgdspr.config import RayConfig


def connect_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Join ``address`` (or ``cfg.address``, or $RAY_ADDRESS; ``auto`` finds a ``ray start`` cluster on this
    machine), else start a local Ray with
    ``cfg.local_num_cpus`` logical CPUs. Does nothing when Ray is already initialised in this process."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # keep the worker's prints as they are
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Data 2.60 starts 32 Parquet footer-reader actors per read: about 10 s per epoch on 2 cores
    # (a 4-epoch fit took 122 s with them, 47 s with one). Must be set before Ray starts.
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    if ray.is_initialized():
        return
    address = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": always a new Ray of our own, never whichever `ray start` cluster happens to run here
        ray.init(address="local", num_cpus=cfg.local_num_cpus, logging_level=logging.WARNING)
