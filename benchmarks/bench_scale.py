"""The whole pipeline at each preset on this box: time and peak memory per stage, then the served endpoint.

Data: SYNTHETIC (the simulator's worlds). For each preset (``demo``, ``small``, ``medium``, ``large``):

1. ``mgdspr pipeline --simulate`` in a subprocess, with a bounded training budget (1 epoch of ``--steps`` steps
   per worker; everything else is the preset's): simulate -> validate -> train (Ray Train) -> embed (Ray Data)
   -> index build + verify -> CURRENT. Each stage's time comes from the run's own ``pipeline.json``.
2. ``mgdspr serve -c <run>/config.yaml`` in a subprocess: start-up (the behaviour store is built from the logs,
   the version's replicas loaded) until ``GET /healthz`` answers, then ``--queries`` held-out test-day searches, one at
   a time (k 50, filter on), after 5 warm-up requests: p50 / p99 and errors (the first request's latency, which
   loads the replicas' lazy parts, is reported apart).

Memory: the RSS of every process of each subprocess's tree is sampled twice a second (``proctree.PeakMemory``)
and kept per stage and role (the driver, ``RayTrainWorker``, ``MapWorker(FeaturizeBatch)``, Serve replicas, ...):
the largest process per role, and the tree's summed RSS (an upper bound: shared object-store pages count in
every process that maps them).

Growth: for each stage, the exponent ``b`` of ``seconds ~ size^b`` between consecutive presets, ``size`` being
what the stage reads (log rows for logs and the store, items for embedding and the index). ``b`` near 1 is
linear; a stage with ``b`` well above 1 is named in the report.

    python benchmarks/bench_scale.py                       # demo, small, medium, large (~1 h on 2 cores)
    python benchmarks/bench_scale.py --preset demo --preset small --steps 20 --queries 50   # a few minutes

Results merge by preset into ``benchmarks/results/scale.{json,md,svg}`` (a later run of one preset replaces
that preset's row only, so the presets may be run one at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import proctree  # benchmarks/ is on sys.path when run as a script
import psutil
import record
from bench_serve import held_out_requests  # the same held-out search bodies bench_serve sends

RESULTS = Path(__file__).parent / "results"
PRESETS = ["demo", "small", "medium", "large"]
MGDSPR = [str(Path(sys.executable).parent / "mgdspr")]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
# what each stage's cost should grow with: the rows it reads, or the catalogue
LOG_TABLES = ("behaviours", "query_history", "search_events")
WARMUP = 5  # requests sent before the measured ones (the first one's latency is kept apart)
SIZE_OF = {"logs": "log_rows", "train": "log_rows", "embed": "items", "index": "items", "serve_start": "log_rows"}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def write_config(preset: str, work: Path, steps: int) -> Path:
    from ray_mgdspr.config import config_to_yaml, load_preset

    cfg = load_preset(preset)
    train = cfg.train.model_copy(update={"world": str(work / "world"), "storage_path": str(work / "train"),
                                         "run_name": "scale", "epochs": 1, "max_steps_per_epoch": steps})
    cfg = cfg.model_copy(update={
        "train": train,
        "embed": cfg.embed.model_copy(update={"out": str(work / "embeddings")}),
        "index": cfg.index.model_copy(update={"out": str(work / "index")}),
    })
    path = work / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    return path


def follow(proc: subprocess.Popen, sampler: proctree.PeakMemory, phases: dict[str, str], prefix: str,
           tail: list[str]) -> None:
    """Echo ``proc``'s output and move the sampler's phase when a line starts a stage."""
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        del tail[:-40]
        for marker, phase in phases.items():
            if marker in line:
                sampler.phase = phase
        if line.startswith("[pipeline]") or "Error" in line or "error:" in line:
            log(f"{prefix} {line[:300]}")


def run_pipeline(preset: str, work: Path, steps: int) -> dict[str, Any]:
    config = write_config(preset, work, steps)
    out = work / "pipeline"
    cmd = [*MGDSPR, "pipeline", "--config", str(config), "--simulate", "--out", str(out)]
    log(f"{preset}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    sampler = proctree.PeakMemory(proc.pid)
    sampler.start()
    stages = ["check", "logs", "ray", "train", "embed", "index", "serve-config", "promote"]
    tail: list[str] = []
    follow(proc, sampler, {f"[pipeline] {s}: started": s for s in stages}, preset, tail)
    code = proc.wait()
    wall = time.perf_counter() - t0
    memory = sampler.stop()
    report = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").is_file() else {}
    if code != 0:
        raise RuntimeError(f"{preset}: pipeline exit {code}: {report.get('error')}\n" + "\n".join(tail[-20:]))
    return {"wall_s": round(wall, 1), "report": report, "memory": memory, "config": str(config)}


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGINT (the CLI shuts Serve down), then whatever of the tree is left is killed."""
    descendants = proctree.tree(psutil.Process(proc.pid))
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in descendants:
        with contextlib.suppress(psutil.Error):
            p.kill()


def run_serve(work: Path, queries: int, start_timeout: float, config: Path | None = None, k: int = 50
              ) -> dict[str, Any]:
    import httpx

    from ray_mgdspr.runtime import free_port

    port = free_port()
    config = config or work / "pipeline" / "config.yaml"
    cmd = [*MGDSPR, "serve", "--config", str(config), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    requests = held_out_requests(work / "world", k, queries)
    log(f"serve: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    sampler = proctree.PeakMemory(proc.pid)
    sampler.phase = "serve_start"
    sampler.start()
    tail: list[str] = []
    threading.Thread(target=follow, args=(proc, sampler, {}, "serve", tail), daemon=True).start()
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited {proc.returncode}:\n" + "\n".join(tail[-20:]))
                if time.perf_counter() - t0 > start_timeout:
                    raise RuntimeError(f"serve did not answer in {start_timeout:.0f} s:\n" + "\n".join(tail[-20:]))
                try:  # ready: /healthz answers once the ingress has a loaded version (/v1/version answers before)
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            started = time.perf_counter() - t0
            t = time.perf_counter()
            first = http.post("/v1/retrieve", json=requests[0])  # replicas load lazily: the first request pays
            first_ms = (time.perf_counter() - t) * 1000
            for body in requests[1:WARMUP]:
                http.post("/v1/retrieve", json=body)
            log(f"serve: answering after {started:.1f} s (first request {first.status_code} in {first_ms:.0f} ms); "
                f"{len(requests)} queries, 1 client")
            sampler.phase = "serve_queries"
            latencies, server, search, errors, empty = [], [], [], [], 0
            stages: dict[str, list[float]] = {}
            for body in requests:
                t = time.perf_counter()
                r = http.post("/v1/retrieve", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                payload = r.json()
                server.append(payload["latency_ms"]["total"])
                search.append(payload["latency_ms"]["search"])
                for stage, ms in payload["latency_ms"].items():  # stages that did not run count as 0
                    stages.setdefault(stage, [0.0] * (len(server) - 1)).append(ms)
                for values in stages.values():
                    values.extend([0.0] * (len(server) - len(values)))
                empty += payload["count"] == 0
            time.sleep(2)  # recall canary samples finish in the background and report to the manager
            version = http.get("/v1/version").json()
    finally:
        stop_tree(proc)
        memory = sampler.stop()
    lat = np.array(latencies)
    return {"start_s": round(started, 1), "first_request_ms": round(first_ms, 1), "queries": len(requests),
            "errors": len(errors),
            "error_examples": errors[:3], "empty_pages": int(empty),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "server_p50_ms": round(float(np.percentile(server, 50)), 1) if server else None,
            "search_p50_ms": round(float(np.percentile(search, 50)), 1) if search else None,
            "search_p99_ms": round(float(np.percentile(search, 99)), 1) if search else None,
            "stages_p50_ms": {k: round(float(np.percentile(v, 50)), 1) for k, v in stages.items()},
            "stages_p99_ms": {k: round(float(np.percentile(v, 99)), 1) for k, v in stages.items()},
            "version": version.get("version"), "canary": (version.get("canary") or {}).get(version.get("version")),
            "memory": memory}


def serve_again(row: dict[str, Any], root: Path, queries: int, start_timeout: float) -> dict[str, Any]:
    """``row`` with its serving part measured again on the run kept in ``root`` (``--serve-only``)."""
    shutil.rmtree(root / row["preset"] / "pipeline" / "store", ignore_errors=True)  # built at start, as the first time
    served = run_serve(root / row["preset"], queries, start_timeout)
    memory = {k: v for k, v in row["memory"].items() if not k.startswith("serve")} | served.pop("memory")
    return row | {"seconds": row["seconds"] | {"serve_start": served["start_s"]}, "memory": memory,
                  "serve": served, "serve_load": [os.getloadavg()[0]]}


FRONTS = {"local": {}, "ray": {"http_proxy": "ray", "serve_throughput_optimized": False}}
"""``--ray-front``: the ``ray:`` fields of the served config. ``local``: a local Ray's defaults (HAProxy,
Serve's throughput-optimised mode); ``ray``: Ray's own defaults, as the cluster specs run it (its Python proxy)."""


def serve_layout(row: dict[str, Any], root: Path, factory: str, shards: int, queries: int,
                 start_timeout: float, placement: str = "colocated", k: int = 50, front: str = "local",
                 settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``row`` with a serving measurement of another index layout of the same embeddings (``--index``): the kept
    run's embedding set built again as ``factory`` x ``shards`` (`mgdspr index build`), served twice from the same
    store: once for latency (canary off; requests of depth ``k``), once with every request sampled by the recall
    canary (its recall@50 against the exhaustive search of the same index: exact for IVF-Flat), whose latency is
    not kept. ``settings``: serve fields changed for both (``--serve-set``), kept as a row of their own."""
    from ray_mgdspr.config import config_to_yaml, load_config

    work = root / row["preset"]
    slug = f"{factory.replace(',', '_')}-s{shards}-{placement}"
    cfg = load_config(work / "pipeline" / "config.yaml")
    index_root = work / f"index-{slug}"
    shutil.rmtree(index_root, ignore_errors=True)
    cfg = cfg.model_copy(update={"index": cfg.index.model_copy(update={"factory": factory, "shards": shards,
                                                                     "out": str(index_root)})})
    report = json.loads((work / "pipeline" / "pipeline.json").read_text())
    embeddings = next(s["detail"]["path"] for s in report["stages"] if s["name"] == "embed")
    build_config = work / f"config-{slug}.yaml"
    build_config.write_text(config_to_yaml(cfg))
    log(f"{row['preset']}: index build {factory} x {shards}")
    t = time.perf_counter()
    subprocess.run([*MGDSPR, "index", "build", "--embeddings", embeddings, "--config", str(build_config)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)
    build_s = time.perf_counter() - t
    runs = {}
    # a run with --serve-set writes configs of its own: the plain ones (which profile_core.py reads) keep the defaults
    suffix = "".join(f"-{field}={value}" for field, value in (settings or {}).items())
    for name, share in (("latency", 0.0), ("canary", 1.0)):
        serve_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
            "index_root": str(index_root), "canary_share": share, "canary_k": 50, "canary_window": 100_000,
            "placement": placement, **(settings or {})}), "ray": cfg.ray.model_copy(update=FRONTS[front])})
        path = work / f"config-{slug}{suffix}-{name}.yaml"
        path.write_text(config_to_yaml(serve_cfg))
        runs[name] = run_serve(work, queries, start_timeout, config=path, k=k if name == "latency" else 50)
    latency, canary = runs["latency"], runs["canary"]
    layout = {"factory": factory, "shards": shards, "placement": placement, "k": k, "front": front,
              "settings": settings or {},
              "nprobe": cfg.serve.nprobe or cfg.index.nprobe,
              "build_s": round(build_s, 1), "load": os.getloadavg()[0], "canary": canary["canary"],
              "memory": latency.pop("memory")} | {k: v for k, v in latency.items() if k != "canary"}
    key = slug + ("" if k == 50 else f"-k{k}") + ("" if front == "local" else f"-{front}-front") + suffix
    return row | {"layouts": {**row.get("layouts", {}), key: layout}}


def disk_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1) if path.exists() else 0.0


def run_preset(preset: str, root: Path, steps: int, queries: int, start_timeout: float) -> dict[str, Any]:
    from ray_mgdspr.data.world import read_manifest

    work = root / preset
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_start = os.getloadavg()[0]
    pipe = run_pipeline(preset, work, steps)
    manifest = read_manifest(work / "world")
    served = run_serve(work, queries, start_timeout)
    stages = {s["name"]: s for s in pipe["report"]["stages"]}
    train = stages["train"]["detail"]
    tables = manifest.tables
    return {
        "preset": preset, "label": manifest.label, "load_start": load_start, "load_end": os.getloadavg()[0],
        "items": tables.get("items", 0), "users": tables.get("users", 0),
        "log_rows": sum(tables.get(k, 0) for k in LOG_TABLES), "days": len(manifest.all_days),
        "tables": tables, "steps": train.get("steps"), "recall": {k: v for k, v in train.items()
                                                                  if k.startswith("recall@")},
        "seconds": {name: s["seconds"] for name, s in stages.items()} | {"serve_start": served["start_s"]},
        "pipeline_wall_s": pipe["wall_s"], "memory": pipe["memory"] | served.pop("memory"), "serve": served,
        "disk_mib": {d: disk_mib(work / d) for d in ("world", "train", "embeddings", "index", "pipeline")},
    }


def growth(rows: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per stage, ``b`` in ``seconds ~ size^b`` between each pair of consecutive presets."""
    out: dict[str, list[float | None]] = {}
    for stage, size in SIZE_OF.items():
        bs: list[float | None] = []
        for a, b in itertools.pairwise(rows):
            ta, tb, sa, sb = a["seconds"].get(stage), b["seconds"].get(stage), a[size], b[size]
            ok = ta and tb and sa and sb and sb != sa
            bs.append(round(math.log(tb / ta) / math.log(sb / sa), 2) if ok else None)
        out[stage] = bs
    return out


def simulate_fit(rows: list[dict[str, Any]]) -> tuple[float, float, list[float]] | None:
    """Least squares ``logs seconds = a * log rows + b * user-days`` over the presets but demo (whose fixed costs
    dominate): the simulator steps every user every day, so its cost has a per-user-day term beside the
    per-row one. Returns (a, b) in microseconds and each row's fitted / measured."""
    fit = [r for r in rows if r["preset"] != "demo" and r.get("days")]
    if len(fit) < 2:
        return None
    x = np.array([[r["log_rows"], r["users"] * r["days"]] for r in fit], float)
    y = np.array([r["seconds"]["logs"] for r in fit])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return a * 1e6, b * 1e6, [round(float(v), 2) for v in (x @ [a, b]) / y]


def by_stage(served: dict[str, Any]) -> str:
    """The server's stages at p99, slowest first (``total`` left out)."""
    p99 = {k: v for k, v in (served.get("stages_p99_ms") or {}).items() if k != "total"}
    return ", ".join(f"{k} {v}" for k, v in sorted(p99.items(), key=lambda kv: -kv[1])) or "-"


def biggest(memory: dict[str, dict], phase: str) -> tuple[str, float]:
    largest = memory.get(phase, {}).get("largest_mib", {})
    return max(largest.items(), key=lambda kv: kv[1]) if largest else ("-", 0.0)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage, size in SIZE_OF.items():
        pts = [(r[size], r["seconds"][stage]) for r in rows if r["seconds"].get(stage)]
        axes[0].plot(*zip(*pts, strict=True), marker="o", label=f"{stage} (vs {size.replace('_', ' ')})")
    axes[0].set(xscale="log", yscale="log", xlabel="rows or items (SYNTHETIC worlds)", ylabel="seconds",
                title="time per stage")
    for phase in ("logs", "train", "embed", "index", "serve_queries"):
        pts = [(r["items"], biggest(r["memory"], phase)[1]) for r in rows if phase in r["memory"]]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=phase)
    axes[1].set(xscale="log", yscale="log", xlabel="catalogue items", ylabel="largest process RSS, MiB",
                title="peak RSS of the largest process")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    g = growth(rows)
    lines = [f"# The pipeline end to end per preset ({result['date']}, {result['machine']})", "",
             "Data: **SYNTHETIC** (the simulator's worlds). Command: `python benchmarks/bench_scale.py "
             + " ".join(f"--preset {r['preset']}" for r in rows) + f" --steps {result['steps']}`; training is "
             f"bounded to 1 epoch of {result['steps']} steps per worker (the preset's model, batch and workers).",
             "", "## Time per stage (seconds)", "",
             "| preset | items | users | log rows | logs (simulate + validate) | ray | train | embed | index "
             "| serve start | pipeline wall | load avg |", "|---|" + "---:|" * 11]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['preset']} | {r['items']:,} | {r['users']:,} | {r['log_rows']:,} | {s.get('logs', 0):.1f} "
                     f"| {s.get('ray', 0):.1f} | {s.get('train', 0):.1f} | {s.get('embed', 0):.1f} "
                     f"| {s.get('index', 0):.1f} | {s.get('serve_start', 0):.1f} | {r['pipeline_wall_s']:.0f} "
                     f"| {r['load_start']:.1f} -> {r['load_end']:.1f} |")
    lines += ["", "Growth exponent `b` of `seconds ~ size^b` between consecutive presets (1 = linear; fixed "
              "start-up costs pull it below 1 at small sizes):", "",
              "| stage | size | " + " | ".join(f"{a['preset']} -> {b['preset']}" for a, b in
                                            itertools.pairwise(rows)) + " |",
              "|---|---|" + "---:|" * max(1, len(rows) - 1)]
    for stage, bs in g.items():
        lines.append(f"| {stage} | {SIZE_OF[stage]} | " + " | ".join("-" if b is None else f"{b:.2f}" for b in bs)
                     + " |")
    fit = simulate_fit(rows)
    if fit:
        a, b, ratios = fit
        lines += ["", f"The logs stage (the simulator) steps every user every day: `seconds = {a:.1f} us x log rows + "
                  f"{b:.1f} us x user-days` fits " + ", ".join(f"{r['preset']} (fitted / measured {q})" for r, q in
                                                          zip([r for r in rows if r['preset'] != 'demo'], ratios,
                                                              strict=True))
                  + ": linear in what it simulates. Measured against log rows alone its exponent exceeds 1 "
                  "because `large` has 4x `medium`'s users but fewer searches and browses per user-day."]
    lines += ["", "## Peak RSS per stage (MiB): the largest process, and the tree's sum", "",
              "A Ray worker process between tasks (`ray::IDLE`) keeps the label of what it last ran, so a role can "
              "appear in a later stage while its process waits, idle, to be reused or reaped.", "",
              "| preset | stage | largest process | its RSS | driver | tree sum (upper bound) | processes |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for phase in ("logs", "train", "embed", "index", "serve_start", "serve_queries"):
            m = r["memory"].get(phase)
            if not m:
                continue
            name, rss = biggest(r["memory"], phase)
            driver = m["largest_mib"].get("driver", 0.0)
            lines.append(f"| {r['preset']} | {phase} | {name} | {rss:,.0f} | {driver:,.0f} | {m['total_mib']:,.0f} "
                         f"| {sum(m['processes'].values())} |")
    lines += ["", "## Serving the built version (1 client, k 50, filter on, held-out test-day searches)", "",
              "| preset | ready after s | queries | errors | empty pages | first request ms | p50 ms | p99 ms "
              "| server p50 ms | training recall |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        v = r["serve"]
        rec = ", ".join(f"{k} {x:.3f}" for k, x in r["recall"].items())
        lines.append(f"| {r['preset']} | {v['start_s']} | {v['queries']} | {v['errors']} | {v['empty_pages']} "
                     f"| {v['first_request_ms']} | {v['p50_ms']} | {v['p99_ms']} | {v['server_p50_ms']} "
                     f"| {rec} (after {r['steps']} steps) |")
    again = [f"{r['preset']} (load {r['serve_load'][0]:.1f})" for r in rows if r.get("serve_load")]
    if again:
        lines += ["", "Serving measured again on the kept runs with `--serve-only`: " + ", ".join(again) + "."]
    layouts = [(r, v) for r in rows for v in r.get("layouts", {}).values()]
    if layouts:
        lines += ["", "## Other index layouts of the same embeddings (`--serve-only --index FACTORY --shards S`)", "",
                  "Each served twice from the run's store: for latency (canary off; 1 client, k as listed, filter "
                  "on), and "
                  "with the recall canary sampling every request (recall@50 of the served top 50, unfiltered, "
                  "against the exhaustive search of the same index: exact for IVF-Flat). Rows measured before "
                  "2026-12-06 10:00 ran behind Ray's Python proxy; later ones behind HAProxy in Serve's "
                  "throughput-optimised mode (a local Ray's defaults) unless they say Ray's Python proxy "
                  "(`--ray-front ray`).", "",
                  "| preset | factory | shards | placement | nprobe | k | build s | ready after s | p50 ms | p99 ms "
                  "| search p50 / p99 ms | p99 by stage (ms; a stage that did not run counts 0) | errors "
                  "| recall@50 vs exhaustive (samples) | load |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|"]
        for r, v in layouts:
            c = v.get("canary") or {}
            recall = f"{c['recall']:.3f} ({c.get('samples')})" if c.get("recall") is not None else "-"
            front = " (Ray's Python proxy)" if v.get("front") == "ray" else ""
            front += f" ({record.settings_label(v['settings'])})" if v.get("settings") else ""
            lines.append(f"| {r['preset']} | {v['factory']} | {v['shards']} | {v.get('placement', 'per_stage')}{front} "
                         f"| {v['nprobe']} | {v.get('k', 50)} | {v['build_s']} "
                         f"| {v['start_s']} | {v['p50_ms']} | {v['p99_ms']} | {v['search_p50_ms']} / "
                         f"{v['search_p99_ms']} | {by_stage(v)} | {v['errors']} | {recall} | {v['load']:.1f} |")
    lines += ["", "## Disk (MiB)", "", "| preset | world | train | embeddings | index |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        d = r["disk_mib"]
        lines.append(f"| {r['preset']} | {d['world']:,} | {d['train']:,} | {d['embeddings']:,} | {d['index']:,} |")
    lines += ["", "![time and memory against size](scale.svg)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", choices=PRESETS, help="repeatable (default: all four)")
    ap.add_argument("--steps", type=int, default=100, help="training steps per worker (1 epoch)")
    ap.add_argument("--queries", type=int, default=200, help="held-out searches sent to the endpoint")
    ap.add_argument("--start-timeout", type=float, default=1800, help="seconds for serve to answer")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, deleted)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--index", metavar="FACTORY", help="with --serve-only: serve the kept run's embeddings "
                    "built as this index.factory in --shards shards instead (e.g. IVF4096,Flat), and read the "
                    "recall canary")
    ap.add_argument("--shards", type=int, default=4, help="with --index: index.shards")
    ap.add_argument("--placement", choices=("colocated", "per_stage", "inline"), default="colocated",
                    help="with --index: serve.placement")
    ap.add_argument("--k", type=int, default=50, help="with --index: the k of the latency run's requests")
    ap.add_argument("--ray-front", choices=tuple(FRONTS), default="local", help="with --index: Serve's HTTP front "
                    "and mode: local (HAProxy, throughput-optimised: a local Ray's defaults) or ray (Ray's Python "
                    "proxy, as the cluster specs run it)")
    ap.add_argument("--serve-set", nargs="+", metavar="FIELD=VALUE", help="with --index: serve settings of "
                    "this measurement (e.g. early_fallback=0), a row of its own beside the defaults' row")
    ap.add_argument("--serve-only", action="store_true", help="measure serving again on the runs kept in --work "
                    "(their pipeline rows are kept)")
    args = ap.parse_args()
    if args.serve_set and not args.index:
        ap.error("--serve-set needs --index (a layout to serve with those settings)")
    if (args.serve_only or args.index) and not args.work:
        ap.error("--serve-only and --index need --work, the directory of an earlier run")
    presets = args.preset or PRESETS
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    path = args.results / "scale.json"
    previous = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = {r["preset"]: r for r in previous["rows"] if previous.get("steps") == args.steps}
    try:
        for preset in presets:
            if (args.index or args.serve_only) and preset not in rows:
                ap.error(f"{path} has no row for preset {preset} run with --steps {args.steps}: pass the --steps "
                         "of the run kept in --work")
            if args.index:
                rows[preset] = serve_layout(rows[preset], root, args.index, args.shards, args.queries,
                                            args.start_timeout, args.placement, args.k, args.ray_front,
                                            record.serve_settings(args.serve_set))
            elif args.serve_only:
                rows[preset] = serve_again(rows[preset], root, args.queries, args.start_timeout)
            else:
                rows[preset] = run_preset(preset, root, args.steps, args.queries, args.start_timeout)
            log(f"{preset}: done: " + json.dumps(rows[preset]["seconds"]))
            memory = psutil.virtual_memory().total / 2**30
            result = {"date": dt.date.today().isoformat(), "steps": args.steps,
                      "machine": f"{platform.machine()} {os.cpu_count()} cpu, {memory:.0f} GiB, python "
                                 f"{platform.python_version()}",
                      "rows": sorted(rows.values(), key=lambda r: PRESETS.index(r["preset"]))}
            args.results.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))
            plot(result["rows"], args.results / "scale.svg")
            (args.results / "scale.md").write_text(report(result))
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print((args.results / "scale.md").read_text())


if __name__ == "__main__":
    main()
