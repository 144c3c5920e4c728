"""Replica death under load with the production layout of 2 replicas per deployment: reads are retried on the
other replica, so no request fails (real Ray, real Serve over HTTP, real ``ray.kill``).

The 1-replica case (the laptop default: failures bounded to the restart window, all 503 with Retry-After) is
``test_app.py::test_killed_shard_replica_fails_clearly_and_recovers``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray
from helpers import Load, free_port, wait_for
from ray import serve

from ray_mgdspr.config import ServeConfig
from ray_mgdspr.serve.app import AppArgs, start

pytestmark = pytest.mark.slow
TWO = {"min_replicas": 2, "max_replicas": 2}


@pytest.fixture(scope="module")
def server(deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServeConfig]]:
    store = tmp_path_factory.mktemp("faults") / "behaviours.sqlite"
    shutil.copy(deployment.store, store)
    overrides = {"port": free_port(), "index_root": str(deployment.index_root), "world": str(deployment.world),
                 "store": str(store), "version": "v1", "watch_current_s": 0,
                 "encoder": {**TWO, "num_cpus": 0.2}, "shard": {**TWO, "num_cpus": 0.2},
                 "head": {**TWO, "num_cpus": 0.1}}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    cfg = start(AppArgs(serve=overrides))
    yield f"http://127.0.0.1:{cfg.port}", cfg
    serve.shutdown()
    if started:
        ray.shutdown()


def _replicas(stage: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if "mgdspr-v1#" in a["name"] and f"#{stage}#" in a["name"]]


def _running(stage: str) -> int:
    return serve.status().applications["mgdspr-v1"].deployments[stage].replica_states.get("RUNNING", 0)


@pytest.mark.parametrize("stage", ["shard-0", "encoder"])
def test_killing_one_of_two_replicas_under_load_fails_no_read(server: tuple[str, ServeConfig],
                                                              stage: str) -> None:
    wait_for(lambda: _running(stage) == 2 and len(_replicas(stage)) == 2, 120,
             f"2 running {stage} replicas")
    before = {a["name"] for a in _replicas(stage)}
    victim = _replicas(stage)[0]
    with Load(server[0], clients=8, query="red dress", k=20, user_id=3) as load:
        time.sleep(2.0)
        killed = time.time()
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        # recovered: a replica that did not exist before the kill runs beside the survivor
        wait_for(lambda: _running(stage) == 2 and len({a["name"] for a in _replicas(stage)} - before) == 1,
                 180, f"Serve to replace the killed {stage} replica")
        recovered = time.time()
        time.sleep(2.0)
    results = load.all
    failed = [r for r in results if r[0] != 200]
    during = [r for r in results if killed <= r[3] <= recovered]
    metrics = httpx.get(f"{server[0]}/metrics", timeout=30).text
    retried = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("mgdspr_retried_calls_total{"))
    print(f"{stage} replica killed under 8 clients with 2 replicas: {len(failed)} of {len(results)} requests "
          f"failed ({len(failed) / len(results):.3%}), {len(during)} answered during the "
          f"{recovered - killed:.1f} s until the replacement replica ran; {retried:.0f} calls retried so far "
          "(one ingress replica's count)")
    assert len(during) > 0
    assert len(failed) / len(results) < 0.001, Counter(r[:3] for r in failed)
