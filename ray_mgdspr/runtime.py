"""Joining or starting Ray for a command (resources come from the config, never from constants)."""

from __future__ import annotations

import logging
import os

from ray_mgdspr.config import RayConfig


def connect_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Join ``address`` (or ``cfg.address``, or $RAY_ADDRESS), else start a local Ray with
    ``cfg.local_num_cpus`` logical CPUs. Does nothing when Ray is already initialised in this process."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # keep the worker's prints as they are
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if ray.is_initialized():
        return
    address = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=cfg.local_num_cpus, logging_level=logging.WARNING)
