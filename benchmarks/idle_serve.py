"""What the endpoint costs with no requests: CPU and memory of `mgdspr serve`'s whole process tree, per process,
per setting.

For each ``--loops`` value of ``ray.serve_control_loop_s`` (``RAY_SERVE_CONTROL_LOOP_INTERVAL_S``) and each
``--dashboard`` value of ``ray.dashboard`` (Ray's dashboard in the local Ray: ``on``, ``off``), in turn:
start ``mgdspr serve -c CONFIG`` in a subprocess (a local Ray of its own, with the config's other ``ray:``
settings: HAProxy, throughput mode), wait for ``/healthz``, let it settle ``--settle`` s, then read the CPU
seconds of every process of its tree from ``/proc`` (psutil) at the start and end of a ``--window`` s window
with no requests, and the memory each process holds at the window's end: resident (RSS, shared libraries
counted in every process that maps them) and unique (USS, what stopping that process alone would free). Then stop
it with SIGINT (Ctrl-C). Processes are labelled by what they run (``bench_serve.cpu_snapshot``,
``proctree.label``). The settings are measured in ABBA order when ``--rounds`` > 1.

The endpoint serves CONFIG's index (by default the demo's: run ``make demo`` first). Data: SYNTHETIC.
Issue 16's goal: the idle Ray tree at most 0.05 cores.

    python benchmarks/idle_serve.py                         # ~3 min: loops 0.1 and 0.5, 1 round
    python benchmarks/idle_serve.py --loops 0.1,0.5,1 --rounds 2
    python benchmarks/idle_serve.py --loops 0.5 --dashboard on,off --rounds 2
    python benchmarks/idle_serve.py --loops 0.5 --name serve-memory   # the shipped settings, results of their own

Results: ``benchmarks/results/serve-idle.{md,json}`` (or ``--name``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_serve as bench  # its CPU snapshots of this process's descendants, labelled by proctree
import httpx
import proctree
import psutil
import yaml

from ray_mgdspr.runtime import free_port

ROOT = Path(__file__).resolve().parent.parent
GOAL_CORES = 0.05


def memory_by_label() -> dict[str, dict[str, float]]:
    """MiB resident (``rss``) and unique (``uss``) per process label, summed over this process's descendants of
    that label (``n``: how many)."""
    out: dict[str, dict[str, float]] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            label, mem = proctree.label(p), p.memory_full_info()
        except psutil.Error:
            continue
        row = out.setdefault(label, {"n": 0, "rss": 0.0, "uss": 0.0})
        row["n"] += 1
        row["rss"] += mem.rss / 2**20
        row["uss"] += mem.uss / 2**20
    return {k: {"n": v["n"], "rss": round(v["rss"], 1), "uss": round(v["uss"], 1)}
            for k, v in sorted(out.items(), key=lambda kv: -kv[1]["rss"])}


def measure(config: Path, loop_s: float, dashboard: bool, settle: float, window: float, workdir: Path) -> dict:
    """Start the endpoint with this control loop and dashboard setting, measure its idle window, stop it."""
    port = free_port()
    cfg = yaml.safe_load(config.read_text()) or {}
    cfg.setdefault("ray", {}).update(serve_control_loop_s=loop_s, dashboard=dashboard)
    name = f"idle-{loop_s:g}-{'dash' if dashboard else 'nodash'}"
    run_config = workdir / f"{name}.yaml"
    run_config.write_text(yaml.safe_dump(cfg))
    log = (workdir / f"{name}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/mgdspr"), "serve", "-c", str(run_config), "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mgdspr serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"no /healthz within 300 s; see {log.name}")
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        time.sleep(settle)
        a = bench.cpu_snapshot(None)  # this process's descendants: `mgdspr serve` and its Ray
        time.sleep(window)
        b = bench.cpu_snapshot(None)
        memory = memory_by_label()
        delta = bench.cpu_delta(a, b)
        wall = delta["wall_s"]
        return {"control_loop_s": loop_s, "dashboard": dashboard, "ready_s": round(ready_s, 1), "window_s": wall,
                "cores": delta["ray_cores"], "processes": len(b["procs"]),
                "by_label": {k: round(v / wall, 4) for k, v in delta["ray_cpu_s_by_process"].items()},
                "memory_mib": memory, "load": round(os.getloadavg()[0], 2)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def setting(run: dict) -> tuple[float, bool]:
    return run["control_loop_s"], run.get("dashboard", True)


def setting_label(s: tuple[float, bool]) -> str:
    return f"loop {s[0]:g} s, dashboard {'on' if s[1] else 'off'}"


def render(result: dict) -> str:
    runs = result["runs"]
    settings = sorted({setting(r) for r in runs}, key=lambda s: (s[0], not s[1]))
    mean = {s: sum(r["cores"] for r in runs if setting(r) == s) / sum(1 for r in runs if setting(r) == s)
            for s in settings}
    labels = sorted({k for r in runs for k in r["by_label"]},
                    key=lambda k: -max(r["by_label"].get(k, 0) for r in runs))
    md = [f"# The idle endpoint ({result['date']}, {result['machine']})", "",
          f"Data: SYNTHETIC. Command: `{result['command']}`. Endpoint: `mgdspr serve -c {result['config']}` "
          f"(its own local Ray), no requests; CPU of its whole process tree from `/proc` over a {result['window']:g} s "
          f"window after {result['settle']:g} s of settling, per `ray.serve_control_loop_s` and `ray.dashboard`. "
          f"Load average (1 min) "
          f"{result['load_start']:.2f} at start, {result['load_end']:.2f} at end.", "",
          "| control loop s | dashboard | idle cores (mean) | rounds | goal (issue 16: <= 0.05) |",
          "|---:|---|---:|---:|---|"]
    for s in settings:
        n = sum(1 for r in runs if setting(r) == s)
        md.append(f"| {s[0]:g} | {'on' if s[1] else 'off'} | {mean[s]:.3f} | {n} | "
                  f"{'met' if mean[s] <= GOAL_CORES else 'not met'} |")
    md += ["", "Per process (cores, each run in order):", "",
           "| process | " + " | ".join(setting_label(setting(r)) for r in runs) + " |",
           "|---|" + "---:|" * len(runs)]
    for k in labels:
        md.append(f"| {k} | " + " | ".join(f"{r['by_label'].get(k, 0):.4f}" for r in runs) + " |")
    md.append("| **all** | " + " | ".join(f"**{r['cores']:.3f}**" for r in runs) + " |")
    if all("memory_mib" in r for r in runs):  # runs before 2026-12-07 did not record it
        mem_labels = sorted({k for r in runs for k in r["memory_mib"]},
                            key=lambda k: -max(r["memory_mib"].get(k, {}).get("rss", 0) for r in runs))
        md += ["", "Memory at the window's end, MiB resident (RSS) / unique (USS) per process label (summed over "
               "its processes; RSS counts shared libraries in every process that maps them, USS is what stopping "
               "that process alone would free):", "",
               "| process | " + " | ".join(setting_label(setting(r)) for r in runs) + " |",
               "|---|" + "---:|" * len(runs)]
        for k in mem_labels:
            cells = []
            for r in runs:
                m = r["memory_mib"].get(k)
                cells.append("" if m is None else f"{m['rss']:,.0f} / {m['uss']:,.0f}"
                             + (f" ({m['n']} processes)" if m["n"] > 1 else ""))
            md.append(f"| {k} | " + " | ".join(cells) + " |")
        md.append("| **all** | " + " | ".join(
            f"**{sum(m['rss'] for m in r['memory_mib'].values()):,.0f} / "
            f"{sum(m['uss'] for m in r['memory_mib'].values()):,.0f}**" for r in runs) + " |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("runs/demo/config.yaml"),
                    help="the endpoint's config (default: the demo's; run `make demo` first)")
    ap.add_argument("--loops", default="0.1,0.5", help="serve_control_loop_s values, comma-separated")
    ap.add_argument("--dashboard", default="on", help="ray.dashboard values, comma-separated: on, off")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--name", default="serve-idle", help="results go to results/NAME.{md,json} (default %(default)s)")
    args = ap.parse_args()
    config = (ROOT / args.config) if not args.config.is_absolute() else args.config
    if not config.is_file():
        sys.exit(f"{config}: no such config; run `make demo` first or pass --config")
    loops = [float(x) for x in args.loops.split(",")]
    dashboards = [{"on": True, "off": False}[x.strip()] for x in args.dashboard.split(",")]
    settings = [(s, d) for s in loops for d in dashboards]
    out = ROOT / "benchmarks/results"
    workdir = Path(tempfile.mkdtemp(prefix="idle-serve-"))  # each run's config and `mgdspr serve` log
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpu, "
              f"python {platform.python_version()}", "data": "SYNTHETIC",
              "command": "python benchmarks/idle_serve.py" + " ".join(["", *sys.argv[1:]]).rstrip(),
              "config": str(args.config), "settle": args.settle, "window": args.window,
              "load_start": os.getloadavg()[0], "runs": []}
    for r in range(args.rounds):
        for s in (settings if r % 2 == 0 else settings[::-1]):
            run = measure(config, *s, args.settle, args.window, workdir)
            print(f"{setting_label(s)}: {run['cores']:.3f} cores idle ({run['processes']} processes, "
                  f"ready in {run['ready_s']:.0f} s, load {run['load']:.2f})", flush=True)
            result["runs"].append(run)
    result["load_end"] = os.getloadavg()[0]
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
