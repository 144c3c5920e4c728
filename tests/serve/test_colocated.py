"""The endpoint with ``serve.placement: colocated`` (each replica of a version holds the whole version) on real
Serve over HTTP: the same answers as the Ray-free core, one at a time and in concurrent batches; promotion under
load without failures or mixing, to a version with another shard count; the recall canary; users' behaviours."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
from helpers import (
    Load,
    canary_recall,
    free_port,
    listener,
    page,
    promote_under_load,
    retrieve,
    running_endpoint,
    same_as_core,
    wait_for,
)
from ray import serve

from ray_mgdspr.config import ServeConfig
from ray_mgdspr.serve.engine import Retriever

pytestmark = pytest.mark.slow
TOKEN = "colocated-token-7"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TS = 4_000_000_000_000
QUERIES = [("red dress", 3), ("running shoes", None), ("portable car cover", 17), ("dress", 999_999),
           ("wireless headphones", 5), ("beige", 8)]


@pytest.fixture(scope="module")
def server(deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServeConfig]]:
    overrides = {"port": free_port(), **deployment.private_copy(tmp_path_factory.mktemp("colocated")),
                 "version": "v1", "token": TOKEN, "drain_s": 1.0,
                 "watch_current_s": 0, "placement": "colocated", "filter_depth": 200, "canary_share": 1.0,
                 "batch_wait_ms": 20.0,  # concurrent requests of the tests below share batches
                 "retriever": {"min_replicas": 1, "max_replicas": 1}}
    # Ray's Serve as clusters run it by default (its Python proxy, no throughput-optimised mode); the other modules
    # run the defaults of a local Ray (HAProxy, throughput-optimised)
    with running_endpoint(overrides, ray_cfg={"http_proxy": "ray", "serve_throughput_optimized": False}) as endpoint:
        yield endpoint


CHANNEL_MIX = ((20, False, ["embedding"]), (5, True, ["embedding"]), (50, True, ["embedding"]),
               (10, True, ["embedding", "lexical"]))
BODIES = [{"query": q, "user_id": u, "k": k, "filter": f, "ts": TS, "channels": channels}
          for q, u in QUERIES for k, f, channels in CHANNEL_MIX]


def promote(client: httpx.Client, version: str) -> None:
    if client.get("/v1/version").json()["version"] != version:
        r = client.post("/v1/admin/promote", json={"version": version}, headers=AUTH, timeout=300)
        assert r.status_code == 200, r.text
    wait_for(lambda: not [a for a in serve.status().applications if a.startswith("mgdspr-")
                          and a != f"mgdspr-{version}"], 60, "the other versions' applications to be deleted")


def test_one_deployment_per_version_and_the_answers_of_the_ray_free_core(server: tuple[str, ServeConfig],
                                                                          client: httpx.Client) -> None:
    promote(client, "v1")
    deployments = set(serve.status().applications["mgdspr-v1"].deployments)
    assert deployments == {"version"}
    assert "ProxyActor" in listener(server[1].port).name()  # this module's front: Ray's Python proxy
    core = Retriever.open(server[1], "v1")
    bodies = BODIES
    want = [core.retrieve(b["query"], b["user_id"], b["k"], b["filter"], tuple(b["channels"]), b["ts"])
            for b in bodies]
    alone = [retrieve(client, **b) for b in bodies]
    with ThreadPoolExecutor(12) as pool:  # concurrent: answered in shared batches
        together = list(pool.map(lambda b: retrieve(client, **b), bodies))
    for body, w, a, t in zip(bodies, want, alone, together, strict=True):
        for got in (a, t):
            assert got["version"] == "v1"
            assert page(got) == page(w), body
            assert {f: got[f] for f in ("count", "filtered", "fallback", "fallback_added", "key_terms")} == \
                {f: w[f] for f in ("count", "filtered", "fallback", "fallback_added", "key_terms")}, body
            if "embedding" in body["channels"]:
                np.testing.assert_allclose([i["scores"].get("embedding", 0) for i in got["data"]],
                                           [i["scores"].get("embedding", 0) for i in w["data"]], rtol=1e-5,
                                           atol=1e-6)
                assert {"encode", "search", "merge", "filter", "total"} <= set(got["latency_ms"])
    assert any(w["fallback"] for w in want)  # the lexical fallback ran inside the replica too


def test_promotion_under_load_has_no_failures_and_no_mixing(server: tuple[str, ServeConfig],
                                                           client: httpx.Client) -> None:
    promote(client, "v1")
    promote_under_load(client, "v2", TOKEN)
    same_as_core(client, server[1], "v2", BODIES[:8])  # 3 shards


def test_the_recall_canary_samples_the_colocated_version(client: httpx.Client) -> None:
    promote(client, "v1")
    assert canary_recall(client, "v1", QUERIES, TS) == pytest.approx(1.0)  # Flat shards: the ANN is exact


def test_user_behaviours_come_from_the_colocated_version(server: tuple[str, ServeConfig],
                                                         client: httpx.Client) -> None:
    promote(client, "v1")
    r = client.get("/v1/users/3/behaviours", params={"ts": TS, "limit": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == Retriever.open(server[1], "v1").behaviours(3, limit=5, ts=TS)
    assert r.json()["count"] > 0


def test_a_delta_version_with_segments_serves_the_changed_catalogue(server: tuple[str, ServeConfig],
                                                                   client: httpx.Client) -> None:
    """A day's catalogue delta written as segments beside v1's shard files (index/update.py), promoted under load:
    no failed request, and the endpoint serves the changed catalogue: removed items are gone from both channels,
    and answers equal the Ray-free core's over the delta version."""
    from ray_mgdspr.config import IndexConfig
    from ray_mgdspr.data.simulator.churn import daily_churn
    from ray_mgdspr.data.world import read_table
    from ray_mgdspr.index.manifest import read_manifest
    from ray_mgdspr.index.update import CATALOGUE_COLUMNS, update_index

    cfg = server[1]
    root = Path(cfg.index_root)
    base = read_manifest(root / "v1")
    before = read_table(cfg.world, "items", columns=CATALOGUE_COLUMNS)
    after = daily_churn(before, share=0.04, seed=21)
    if not (root / "v1.d1").exists():
        r = update_index(after, base.bundle, IndexConfig(out=str(root), shards=len(base.shards)), base="v1",
                         version="v1.d1", make_current=False)
        assert r.delta.shards_touched and not r.delta.shards_compacted  # segments, not rewrites
    gone = np.setdiff1d(before["item_id"].to_numpy(), after["item_id"].to_numpy())
    titles = before.filter(pa.array(np.isin(before["item_id"].to_numpy(), gone)))["title"].to_pylist()[:12]
    bodies = [{"query": t, "k": 50, "filter": False, "ts": TS, "channels": ["embedding", "lexical"]} for t in titles]

    def found(version: str) -> set[int]:
        pages = [retrieve(client, **b) for b in bodies]
        assert {p["version"] for p in pages} == {version}
        return {i["item_id"] for p in pages for i in p["data"]}

    promote(client, "v1")
    assert found("v1") & set(gone.tolist())  # their own titles find them in the base
    with Load(server[0], clients=3) as load:
        time.sleep(0.5)
        promote(client, "v1.d1")
        time.sleep(1.0)
    assert load.all and all(status == 200 for status, *_ in load.all), Counter(r[:3] for r in load.all)
    assert not found("v1.d1") & set(gone.tolist())
    same_as_core(client, cfg, "v1.d1", [*bodies[:3], *BODIES[:6]])
