"""The endpoint with ``serve.placement: inline`` (every ingress replica holds the whole version: no hop) on real
Serve over HTTP, two ingress replicas behind the default front (HAProxy): the same answers as the Ray-free core;
promotion under load loads the new version in both replicas before the switch (no failure, no mixing); a version
that a replica cannot load is refused and the old one keeps serving; the recall canary and users' behaviours; a
restarted version manager adopts the version the replicas serve."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from helpers import (
    Load,
    canary_recall,
    free_port,
    page,
    promote_under_load,
    retrieve,
    running_endpoint,
    same_as_core,
    wait_for,
)
from ray import serve

from ray_mgdspr.config import ServeConfig
from ray_mgdspr.index.versions import current_version
from ray_mgdspr.serve.engine import Retriever
from ray_mgdspr.serve.versions import adopted_version

pytestmark = pytest.mark.slow
TOKEN = "inline-token-3"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TS = 4_000_000_000_000
QUERIES = [("red dress", 3), ("running shoes", None), ("portable car cover", 17), ("wireless headphones", 5)]
BODIES = [{"query": q, "user_id": u, "k": k, "filter": f, "ts": TS, "channels": channels}
          for q, u in QUERIES for k, f, channels in ((20, False, ["embedding"]), (5, True, ["embedding"]),
                                                     (10, True, ["embedding", "lexical"]))]


@pytest.fixture(scope="module")
def server(deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServeConfig]]:
    overrides = {"port": free_port(), **deployment.private_copy(tmp_path_factory.mktemp("inline")),
                 "version": "v1", "token": TOKEN, "watch_current_s": 0,
                 "version_refresh_s": 12.0,  # after a failed poll: a restarted manager hears from the replicas late
                 "placement": "inline", "filter_depth": 200, "canary_share": 1.0, "batch_wait_ms": 20.0,
                 "ingress": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5}}
    with running_endpoint(overrides) as endpoint:
        yield endpoint


def promote(client: httpx.Client, version: str) -> None:
    if client.get("/v1/version").json()["version"] != version:
        r = client.post("/v1/admin/promote", json={"version": version}, headers=AUTH, timeout=300)
        assert r.status_code == 200, r.text


def test_no_version_application_and_the_answers_of_the_ray_free_core(server: tuple[str, ServeConfig],
                                                                     client: httpx.Client) -> None:
    promote(client, "v1")
    apps = serve.status().applications
    assert set(apps) == {"mgdspr"}  # no hop: the version lives in the ingress replicas
    assert apps["mgdspr"].deployments["Ingress"].replica_states.get("RUNNING") == 2
    same_as_core(client, server[1], "v1", BODIES)
    with ThreadPoolExecutor(8) as pool:  # concurrent: answered in shared batches, in both replicas
        together = list(pool.map(lambda b: retrieve(client, **b), BODIES * 2))
    alone = [retrieve(client, **b) for b in BODIES]
    assert [page(t) for t in together] == [page(a) for a in alone] * 2
    assert {"encode", "search", "merge", "filter", "total"} <= set(together[0]["latency_ms"])


def test_promotion_loads_the_version_in_every_ingress_replica_then_switches_under_load(
        server: tuple[str, ServeConfig], client: httpx.Client) -> None:
    promote(client, "v1")
    info, load = promote_under_load(client, "v2", TOKEN)
    assert info["version"] == "v2" and info["previous"] == "v1" and info["draining"] == []
    assert {r[1] for r in load.all} == {"v1", "v2"}
    assert current_version(server[1].index_root) == "v2"  # a restart serves what serves now
    same_as_core(client, server[1], "v2", BODIES[:6])  # 3 shards


def test_a_version_an_ingress_replica_cannot_load_is_refused_and_the_old_keeps_serving(
        server: tuple[str, ServeConfig], client: httpx.Client) -> None:
    """v3 passes the manager's checks (its bundle's checksums were rewritten to match) but its query tower is not
    a torch file: the replicas' loading fails, the promotion is refused with their error, and v2 serves
    throughout."""
    promote(client, "v2")
    root = Path(server[1].index_root)
    broken = root / "v3"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(root / "v2", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    bundle = root.parent / "bundle-v3"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(manifest["bundle"], bundle)
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    garbage = b"not a torch file" * 64
    (bundle / "query_tower.pt").write_bytes(garbage)
    bundle_manifest["files"]["query_tower.pt"] = hashlib.sha256(garbage).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(bundle_manifest))
    manifest.update(version="v3", bundle=str(bundle))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with Load(server[0], clients=2) as load:
        r = client.post("/v1/admin/promote", json={"version": "v3"}, headers=AUTH, timeout=300)
        time.sleep(0.5)
    assert r.status_code == 409 and "serving version is unchanged" in r.json()["error"], r.text
    assert "ingress replicas could not load it" in r.json()["error"]
    for leak in ("Traceback", str(root.parent), "pid=", "actor_id", "ray::"):
        assert leak not in r.text
    info = client.get("/v1/version").json()
    assert info["version"] == "v2" and info["loading"] is None and "v3" in info["last_error"]
    assert load.all and all(s == 200 and v == "v2" for s, v, *_ in load.all), Counter(r[:3] for r in load.all)
    assert current_version(root) == "v2"


def test_the_recall_canary_and_user_behaviours_come_from_the_version_in_the_replica(
        server: tuple[str, ServeConfig], client: httpx.Client) -> None:
    promote(client, "v2")
    assert canary_recall(client, "v2", QUERIES, TS) == pytest.approx(1.0)  # Flat shards: the ANN is exact
    r = client.get("/v1/users/3/behaviours", params={"ts": TS, "limit": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == Retriever.open(server[1], "v2").behaviours(3, limit=5, ts=TS)
    assert r.json()["count"] > 0 and r.json()["version"] == "v2"


@pytest.mark.parametrize("first_call", ["long poll", "promotion"])
def test_a_restarted_version_manager_adopts_the_version_the_ingress_replicas_serve(
        server: tuple[str, ServeConfig], client: httpx.Client, first_call: str) -> None:
    """v2, not serve.version (v1): the new manager takes over what the replicas serve, without a switch, whether
    its first call is a replica's long poll (which says what that replica serves) or a promotion (which does not:
    the manager asks the replicas). The replicas' polls fail with the old manager and ask again only after
    ``version_refresh_s`` (12 s here), so the promotion, sent as soon as the new manager's actor exists, reaches it
    first. The promoted version does not exist: refused, and v2 keeps serving (choosing v1 first would have rolled
    every replica back to it)."""
    promote(client, "v2")
    (manager,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "VersionManager" in a["name"]]
    with Load(server[0], clients=2) as load:
        time.sleep(1.0)
        killed = time.monotonic()
        ray.kill(ray.get_actor(manager["name"], namespace=manager["namespace"]), no_restart=True)
        wait_for(lambda: any("VersionManager" in a["name"] and a["name"] != manager["name"]
                             for a in ray.util.list_named_actors(all_namespaces=True)), 120,
                 "a new version manager replica")
        if first_call == "promotion":
            r = client.post("/v1/admin/promote", json={"version": "v9"}, headers=AUTH, timeout=300)
            assert r.status_code == 409 and "serving version is unchanged" in r.json()["error"], r.text
        wait_for(lambda: client.get("/v1/version").json()["version"] == "v2", 60,
                 "the new manager to report the serving version")
        # the replicas' long polls run again before the next test promotes (else a switch reaches them late)
        time.sleep(max(1.0, killed + server[1].version_refresh_s + 1.0 - time.monotonic()))
    assert load.all and all(r[0] == 200 and r[1] == "v2" for r in load.all), \
        [r for r in load.all if r[0] != 200 or r[1] != "v2"][:3]
    info = client.get("/v1/version").json()
    assert info["loading"] is None and info["switched_at"] is None  # adopted
    assert info["last_error"] is None if first_call == "long poll" else "v9" in info["last_error"]
    assert current_version(Path(server[1].index_root)) == "v2"


def test_a_restarted_manager_adopts_what_current_names_of_the_versions_reported() -> None:
    """Ray-free: the choice among the versions the ingress replicas report (a restart during a switch reports two)."""
    assert adopted_version({"v1", "v2"}, "v2") == "v2"
    assert adopted_version({"v2"}, "v3") == "v2"  # CURRENT moved by hand while the manager was down: what serves
    assert adopted_version({"v2"}, None) == "v2"
    assert adopted_version({"v1", "v2"}, "v3") is None  # no way to tell: as at a start
    assert adopted_version(set(), "v2") is None
