"""Where a request's own compute goes: the Ray-free request path (``engine.Retriever``) of a served configuration.

Data: SYNTHETIC (a simulator world kept by ``bench_scale.py --work``, or any run's config). No Ray, no HTTP: the
request path every placement runs inside its replicas (encode: behaviour store + features + query tower; search:
every shard's Faiss search and relevance verdicts; merge; filter; the lexical fallback and relaxed fill), one
request at a time in this process, with the configuration's threads (``serve.faiss_threads`` /
``serve.torch_threads``). What Serve adds on top is ``bench_serve.py``'s "overhead" and ``bench_scale.py``'s
through-HTTP figures.

1. ``Retriever.open`` of the configuration's current version (timed: what a replica pays to load it);
2. ``--warmup`` held-out test-day searches (``bench_serve.held_out_requests``: query, user, logged ts; k ``--k``,
   filter on), then ``--queries`` measured ones: p50 / p99 / mean of the whole request and of each stage (the
   response's own ``latency_ms``; a stage that did not run is left out of its row, and the share of requests
   that ran it is given);
3. with ``--profile``, the same requests again under cProfile: the functions with the most cumulative time, in
   ms per request (cProfile's overhead inflates them; the shares are what this is for).

    python benchmarks/profile_core.py --config /tmp/scale/work/large/config-IVF1024_Flat-s4-colocated-latency.yaml \
        --name large-ivf-s4 --profile
    python benchmarks/profile_core.py --config ... --k 1000 --name large-ivf-s4-k1000
    python benchmarks/profile_core.py --config ... --name large-ivf-s4-early --ab early_fallback=0

With ``--ab FIELD=VALUE ...`` it is an A/B of serve settings in this one process instead: each request is answered
by the configuration as loaded (A) and with those fields changed (B), in ABBA order, the lexical channel's kept
BM25 results dropped before each answer (so neither side reuses the other's); per side the latency, the stages,
the process CPU per request (every thread's, the early-fallback thread's included) and whether the pages match.
A field the request path does not read per request (any but ``Retriever.ANSWERED_WITH``: ``query_tower``,
``torch_threads``, ``nprobe``, ...) makes B open the version a second time in this process, with B's settings.

Results: ``benchmarks/results/core-<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import os
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import record
from bench_serve import held_out_requests  # the same held-out search bodies the endpoint benchmarks send

RESULTS = Path(__file__).parent / "results"
TOP = 25


def stage_table(latencies: list[float], stages: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """p50 / p99 / mean ms of the whole request (``client``: measured around the call) and of each stage."""
    rows = {"client": latencies, **stages}
    return {name: {"runs": len(v), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                   "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v))} for name, v in rows.items() if v}


def measure(retriever: Any, requests: list[Any]) -> tuple[list[float], dict[str, list[float]]]:
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    for req in requests:
        t = time.perf_counter()
        body = retriever.request(req)
        latencies.append((time.perf_counter() - t) * 1000)
        for stage, ms in body["latency_ms"].items():
            stages.setdefault(stage, []).append(ms)
    return latencies, stages


def measure_ab(sides: dict[str, Any], requests: list[Any]) -> dict[str, Any]:
    """A against B (``sides``: a ``Retriever`` each, or one of the same version with B's request-time settings),
    request by request in ABBA order: latency, stages, process CPU per request and identical pages."""
    latencies: dict[str, list[float]] = {"A": [], "B": []}
    stages: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    same = 0
    for i, req in enumerate(requests):
        pages = {}
        for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
            retriever, cfg = sides[side]
            retriever.cfg = cfg
            retriever.lexical._top.cache_clear()
            c, t = time.process_time(), time.perf_counter()
            body = retriever.request(req)
            latencies[side].append((time.perf_counter() - t) * 1000)
            retriever.stages.idle()  # the early fallback's thread done: its CPU is this request's
            cpu[side].append((time.process_time() - c) * 1000)
            for stage, ms in body["latency_ms"].items():
                stages[side].setdefault(stage, []).append(ms)
            pages[side] = [(d["item_id"], d["channels"]) for d in body["data"]]
        same += pages["A"] == pages["B"]
    retriever, cfg = sides["A"]
    retriever.cfg = cfg
    return {side: {"stages": stage_table(latencies[side], stages[side]), "cpu_ms": float(np.mean(cpu[side]))}
            for side in ("A", "B")} | {"same_pages": same}


def ab_sides(retriever: Any, b_settings: dict[str, Any]) -> dict[str, Any]:
    """(retriever, config) of A and B: B shares A's ``Retriever`` when it changes only settings read per request
    (``Retriever.ANSWERED_WITH``); else (the query tower, threads, nprobe, ...) B opens its own."""
    a_cfg = retriever.cfg
    b_cfg = a_cfg.model_copy(update=b_settings)
    shared = set(b_settings) <= retriever.ANSWERED_WITH
    b = retriever if shared else type(retriever).open(b_cfg, retriever.release.version)
    return {"A": (retriever, a_cfg), "B": (b, b_cfg)}


def profile(retriever: Any, requests: list[Any]) -> list[dict[str, Any]]:
    """cProfile's top functions by cumulative time over ``requests``, in ms per request."""
    prof = cProfile.Profile()
    prof.enable()
    for req in requests:
        retriever.request(req)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = [{"function": f"{name} ({'/'.join(Path(file).parts[-2:])}:{line})", "calls": nc,
             "cum_ms_per_request": ct * 1000 / len(requests), "self_ms_per_request": tt * 1000 / len(requests)}
            for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.items()]
    return sorted(rows, key=lambda r: -r["cum_ms_per_request"])[:TOP]


def report(result: dict[str, Any]) -> str:
    lines = [f"# Ray-free request path: {result['name']} ({result['date']})", "",
             f"Data: SYNTHETIC. Machine: {result['machine']}; load average (1 min) {result['load_start']:.2f} at "
             f"start, {result['load_end']:.2f} at end. Command: `{result['command']}`.", "",
             f"- configuration: `{result['config']}`; version {result['version']}: {result['items']:,} items in "
             f"{result['shards']} shards ({result['factory']}, nprobe {result['nprobe']}), model d {result['d']}; "
             f"faiss / torch threads {result['threads']}; query tower: {result.get('tower', 'module')}",
             f"- requests: {result['queries']} held-out test-day searches (after {result['warmup']} warm-up), "
             f"k {result['k']}, filter on, channels ['embedding'], one at a time in this process",
             f"- `Retriever.open`: {result['open_s']:.1f} s", "",
             "| stage | ran in | p50 ms | p99 ms | mean ms |", "|---|---:|---:|---:|---:|"]
    for name, s in result["stages"].items():
        lines.append(f"| {name} | {s['runs'] / result['queries']:.0%} | {s['p50']:.2f} | {s['p99']:.2f} | "
                     f"{s['mean']:.2f} |")
    lines += ["", "`client` is measured around `Retriever.request`; the other rows are the response's `latency_ms` "
              "(`total` from the request's start to its answer)."]
    if result.get("ab"):
        ab = result["ab"]
        lines += ["", f"## A/B: B is the same configuration with {result['ab_settings']}", "",
                  ("B opened the version again with its settings (read at open). " if result.get("ab_reopened")
                   else "") +
                  f"Each request answered by both, in ABBA order, in this process; the same pages for "
                  f"{ab['same_pages']} of {result['queries']} requests. Process CPU per request (all threads): "
                  f"A {ab['A']['cpu_ms']:.2f} ms, B {ab['B']['cpu_ms']:.2f} ms.", "",
                  "| stage | A ran in | A p50 | A p90 | A p99 | A mean | B ran in | B p50 | B p90 | B p99 | B mean |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ab["A"]["stages"]:
            a, b = ab["A"]["stages"][name], ab["B"]["stages"].get(name)
            cells = [f"{a['runs'] / result['queries']:.0%}", *(f"{a[q]:.2f}" for q in ("p50", "p90", "p99", "mean"))]
            cells += ([f"{b['runs'] / result['queries']:.0%}", *(f"{b[q]:.2f}" for q in ("p50", "p90", "p99",
                                                                                          "mean"))]
                      if b else ["-"] * 5)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("profile"):
        lines += ["", f"## cProfile, top {TOP} by cumulative time (ms per request, under the profiler)", "",
                  "| function | calls | cumulative | self |", "|---|---:|---:|---:|"]
        lines += [f"| `{r['function']}` | {r['calls']:,} | {r['cum_ms_per_request']:.2f} | "
                  f"{r['self_ms_per_request']:.2f} |" for r in result["profile"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="a project config whose serve section to open")
    ap.add_argument("--name", required=True, help="results go to results/core-NAME.{md,json}")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="also run the requests under cProfile")
    ap.add_argument("--tower", choices=["onnx", "torchscript", "module"], default=None,
                    help="serve.query_tower (default: the configuration's; docs/serving.md, 'The query tower')")
    ap.add_argument("--ab", nargs="+", metavar="FIELD=VALUE", help="A/B in this process: the configuration "
                    "against the same with these serve fields changed (e.g. early_fallback=0)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    from ray_mgdspr.config import load_config
    from ray_mgdspr.serve.engine import Retriever
    from ray_mgdspr.serve.schemas import RetrieveRequest

    project = load_config(args.config)
    cfg = project.serve.resolved(project)
    if args.tower:
        cfg = cfg.model_copy(update={"query_tower": args.tower})
    load_start = os.getloadavg()[0]
    t = time.perf_counter()
    retriever = Retriever.open(cfg)
    open_s = time.perf_counter() - t
    bodies = held_out_requests(Path(cfg.world), args.k, args.warmup + args.queries)
    requests = [RetrieveRequest(**b) for b in bodies]
    measure(retriever, requests[:args.warmup])
    b_settings = record.serve_settings(args.ab)
    sides = ab_sides(retriever, b_settings) if args.ab else None
    ab = measure_ab(sides, requests[args.warmup:]) if sides else None
    latencies, stages = measure(retriever, requests[args.warmup:])
    result = {
        "name": args.name, "date": dt.date.today().isoformat(), "data": "SYNTHETIC",
        "command": "python benchmarks/profile_core.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "config": str(args.config), "version": retriever.release.version,
        "items": sum(s.rows for s in retriever.shards),
        "shards": len(retriever.shards), "factory": retriever.release.index.factory, "nprobe": cfg.nprobe,
        "d": retriever.release.bundle.model.d, "tower": retriever.encoder.tower_kind,
        "threads": f"{cfg.faiss_threads} / {cfg.torch_threads}",
        "k": args.k, "queries": len(latencies), "warmup": args.warmup, "open_s": open_s,
        "stages": stage_table(latencies, stages),
        "profile": profile(retriever, requests[args.warmup:]) if args.profile else None,
        "ab": ab, "ab_settings": b_settings or None,
        "ab_reopened": bool(sides) and sides["B"][0] is not retriever,
        "load_start": load_start, "load_end": os.getloadavg()[0],
    }
    record.save(f"core-{args.name}", result, report(result), args.results)


if __name__ == "__main__":
    main()
