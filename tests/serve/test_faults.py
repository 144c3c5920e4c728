"""Replica death under load with the production layout of 2 replicas per deployment: reads are retried on the
other replica, so no request fails (real Ray, real Serve over HTTP, real ``ray.kill``).

The 1-replica case (the laptop default: failures bounded to the restart window, all 503 with Retry-After) is
``test_app.py::test_killed_shard_replica_fails_clearly_and_recovers``.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray
from helpers import Load, free_port, running_endpoint, wait_for
from ray import serve

from ray_mgdspr.config import FeatureConfig, ServeConfig
from ray_mgdspr.serve.store import SqliteStore

pytestmark = pytest.mark.slow
TWO = {"min_replicas": 2, "max_replicas": 2}
TOKEN = "faults-token-789"
EXPORT: dict[str, int] = {}  # "port": Ray's Prometheus export of this node (every replica's series)


@pytest.fixture(scope="module")
def server(deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServeConfig]]:
    store = tmp_path_factory.mktemp("faults") / "behaviours.sqlite"
    shutil.copy(deployment.store, store)
    overrides = {"port": free_port(), "index_root": str(deployment.index_root), "world": str(deployment.world),
                 "store": str(store), "version": "v1", "watch_current_s": 0, "token": TOKEN, "placement": "per_stage",
                 "encoder": {**TWO, "num_cpus": 0.2}, "shard": {**TWO, "num_cpus": 0.2},
                 "head": {**TWO, "num_cpus": 0.1}, "ingress": {**TWO, "num_cpus": 0.1}}
    # no Ray is left from another module (tests/conftest.py): running_endpoint starts one with this export
    EXPORT["port"] = free_port()  # chosen now: a port chosen at collection could be taken by the time this runs
    with running_endpoint(overrides, metrics_export_port=EXPORT["port"]) as endpoint:
        yield endpoint


def _by_replica(name: str, **labels: str) -> dict[str, float]:
    """Replica -> the sum of ``name`` over the series Ray exports with these labels from that replica."""
    text = httpx.get(f"http://127.0.0.1:{EXPORT['port']}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            replica = next((part.split("=", 1)[1].strip('"') for part in
                            line[line.index("{") + 1:line.rindex("}")].split(",") if part.startswith("replica=")), "")
            out[replica] = out.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _exported(name: str, **labels: str) -> tuple[float, set[str]]:
    """The sum of ``name`` over every series Ray exports with these labels, and the replicas they come from."""
    values = _by_replica(name, **labels)
    return sum(values.values()), set(values)


def _settled(name: str, quiet_s: float = 12.0, timeout: float = 120.0, **labels: str) -> float:
    """The exported sum of ``name`` once it has stopped moving for ``quiet_s`` (longer than Ray's ~10 s export
    period): requests a test before this one made (under another test order) may still be on their way."""
    deadline, last, since = time.time() + timeout, None, time.time()
    while time.time() < deadline:
        value = _exported(name, **labels)[0]
        if value != last:
            last, since = value, time.time()
        elif time.time() - since >= quiet_s:
            return value
        time.sleep(1.0)
    raise AssertionError(f"{name} {labels} kept moving for {timeout} s with no requests sent")


def _export_answers() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{EXPORT['port']}/metrics", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def test_exported_request_totals_add_up_across_two_ingress_replicas(server: tuple[str, ServeConfig]) -> None:
    """Ray's metrics export carries every ingress replica's counters (labelled by replica): after N requests the
    exported total has grown by exactly N, whichever replicas answered; GET /metrics is one replica's view."""
    wait_for(lambda: _running("Ingress", app="mgdspr") == 2, 120, "2 ingress replicas")
    wait_for(_export_answers, 120, "Ray's metrics agent to export on its port")  # it starts after the node
    series = "ray_mgdspr_requests_total"
    before = _settled(series, endpoint="retrieve", code="200")  # what earlier tests' requests add has arrived
    by_replica = _by_replica(series, endpoint="retrieve", code="200")
    n = 40
    with httpx.Client(base_url=server[0], timeout=60) as c:
        for i in range(n):
            assert c.post("/v1/retrieve", json={"query": "red dress", "k": 5, "user_id": i}).status_code == 200
    wait_for(lambda: _exported(series, endpoint="retrieve", code="200")[0] == before + n, 90,
             f"the exported total to grow by {n}")
    # the replicas whose exported count grew (a replica an earlier test killed may still be exported, unchanged)
    after = _by_replica(series, endpoint="retrieve", code="200")
    replicas = {r for r, v in after.items() if v > by_replica.get(r, 0.0)}
    assert len(replicas) == 2, (by_replica, after)  # both ingress replicas answered some and both are exported
    assert _exported("ray_mgdspr_stage_seconds_count", stage="total")[0] >= n
    # the encoder's and shards' batch sizes: every request was in one batch of each, so the exported sum of
    # sizes grows by n per stage (exactly: sizes sit at bucket midpoints, see serve/metrics.py BATCH_BUCKETS)
    wait_for(lambda: min(_exported("ray_mgdspr_batch_size_sum", stage=s)[0] for s in ("encoder", "shard")) >= n,
             90, "the batch sizes of the encoder and the shards")
    sizes, count = (_exported(f"ray_mgdspr_batch_size_{x}", stage="encoder")[0] for x in ("sum", "count"))
    assert 1 <= sizes / count <= 32


def _replicas(stage: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if "mgdspr-v1#" in a["name"] and f"#{stage}#" in a["name"]]


def _running(stage: str, app: str = "mgdspr-v1") -> int:
    return serve.status().applications[app].deployments[stage].replica_states.get("RUNNING", 0)


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


def test_acknowledged_events_survive_a_killed_ingress(server: tuple[str, ServeConfig]) -> None:
    """Events answered 200 are committed (SQLite, WAL, synchronous=FULL) before the answer: killing the ingress
    replica that wrote them loses none; its replacement and the encoder read them back."""
    base, cfg = server
    user, ts = 987_654, 4_000_000_000_000
    clicks = [{"user_id": user, "item_id": item, "action": "click", "ts": ts - 1000 * n}
              for n, item in enumerate([11, 22, 33, 44, 55], 1)]

    def ask() -> list[float]:
        r = httpx.post(f"{base}/v1/retrieve", json={"query": "dress", "user_id": user, "ts": ts, "k": 10,
                                                    "filter": False}, timeout=60)
        assert r.status_code == 200, r.text
        return [i["scores"]["embedding"] for i in r.json()["data"]]

    before = ask()
    r = httpx.post(f"{base}/v1/events", json={"behaviours": clicks}, headers={"authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    assert r.status_code == 200 and r.json()["appended"]["behaviours"] == 5, r.text
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"]]
    for a in ingress:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    old = {a["name"] for a in ingress}
    wait_for(lambda: any("#Ingress#" in a["name"] and a["name"] not in old
                         for a in ray.util.list_named_actors(all_namespaces=True)), 180, "a new ingress replica")
    wait_for(lambda: httpx.get(f"{base}/healthz", timeout=30).status_code == 200, 120, "the endpoint to answer")
    rows, _ = SqliteStore(cfg.store, FeatureConfig()).histories([user], [ts])
    assert sorted(rows["item_id"].to_pylist()) == [11, 22, 33, 44, 55]
    assert ask() != before  # the served encoder reads them too
