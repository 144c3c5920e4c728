"""Where each millisecond of CPU per request goes: py-spy on every Serve process and on the monolith, under load.

The same setup as ``bench_serve.py`` (its ``prepare``: a SYNTHETIC simulated world, the demo preset's model
trained briefly, a Flat index version of 2 shards, the SQLite behaviour store, the test day's searches as
requests; k 50, filter on, channels ["embedding"]). Then, for each system in turn (the Ray Serve app with the
shipped deployment defaults, and the single-process FastAPI + Faiss monolith of ``bench_serve.py``):

1. ``--clients`` httpx threads post requests back to back for ``--warmup`` + ``--seconds`` s;
2. over the measured window, the CPU seconds of every server process (``/proc``) and one
   ``py-spy record --nonblocking --rate R --format raw`` per process (idle threads are not sampled, so a
   process's samples are its busy time);
3. per process: CPU ms per answered request, and the frames that hold most of its samples, by self time (the
   innermost frame) and by inclusive time (any frame of the stack), both as a share of the process's samples
   and as CPU ms per request (share x the process's CPU ms per request).

py-spy's sampling costs CPU on the same 2 cores, so the absolute rates are lower than ``bench_serve.py``'s;
the shares are what this is for. Results: ``benchmarks/results/serve-profile.{md,json}`` (``--placement
colocated``, the default) and ``serve-profile-per-stage.{md,json}`` (``--placement per_stage``).

    python benchmarks/profile_serve.py              # ~5 min on 2 cores
    python benchmarks/profile_serve.py --quick      # small world (3,000 items)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil

sys.path.insert(0, str(Path(__file__).parent))
import bench_serve as bench  # the benchmark's setup, monolith and clients
import proctree

from ray_mgdspr.config import RayConfig
from ray_mgdspr.runtime import free_port, serve_environment

RESULTS = Path(__file__).parent / "results"
TOP = 12
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # the venv's, when not on PATH


def _frame(raw: str) -> str:
    """``function (path/file.py:123)`` -> ``function (file.py)``: lines of one function are one row."""
    name, _, where = raw.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(file).parts[-2:])})" if file else name


def parse_raw(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """py-spy's raw (collapsed) output -> (self samples per frame, inclusive samples per frame, all samples)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")[1:]]  # the first entry is the thread
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return own, inclusive, total


def server_processes(monolith_pid: int | None) -> dict[int, str]:
    """pid -> label of the processes that answer requests: Serve's replicas and proxy, or the monolith."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            label = "monolith" if p.pid == monolith_pid else proctree.label(p)
        except psutil.Error:
            continue
        if label == "monolith" or label.startswith("ServeReplica:") or label == "ProxyActor":
            found[p.pid] = label
    return found


def profile_window(base: str, setup: bench.Setup, pids: dict[int, str], clients: int, warmup: float,
                   seconds: float, rate: int, out: Path) -> dict[str, Any]:
    """Load ``base`` with ``clients`` clients; py-spy and CPU times of ``pids`` over the measured window."""
    import threading

    result: dict[str, Any] = {}

    def load() -> None:
        result["measure"] = bench.measure(base, setup.requests, clients, warmup, seconds + 1.0, 0, None)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(warmup + 0.5)
    cpu0 = {pid: bench._cpu(psutil.Process(pid)) for pid in pids}
    spies = {pid: subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                    "--rate", str(rate), "--nonblocking", "--format", "raw",
                                    "--output", str(out / f"{pid}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for pid in pids}
    for spy in spies.values():
        spy.wait(timeout=seconds + 60)
    cpu1 = {pid: bench._cpu(psutil.Process(pid)) for pid in pids}
    loader.join()
    m = result["measure"]
    answered = max(1, m["ok"])
    window = m["duration_s"]
    per_process = {}
    for pid, label in pids.items():
        raw = out / f"{pid}.txt"
        if spies[pid].returncode != 0 or not raw.is_file():
            per_process[f"{label} [{pid}]"] = {"error": (spies[pid].stderr.read() if spies[pid].stderr else "")[-500:]}
            continue
        own, inclusive, total = parse_raw(raw)
        # the requests answered while py-spy ran: the window's rate times py-spy's duration
        requests = answered / window * seconds
        cpu_ms = (cpu1[pid] - cpu0[pid]) * 1e3 / max(requests, 1)
        per_process[f"{label} [{pid}]"] = {
            "label": label, "cpu_ms_per_request": cpu_ms, "samples": total,
            "self": [(f, n / total, n / total * cpu_ms) for f, n in own.most_common(TOP)] if total else [],
            "inclusive": [(f, n / total, n / total * cpu_ms) for f, n in inclusive.most_common(3 * TOP)] if total
            else [],
        }
    return {"qps": m["qps"], "answered": m["ok"], "errors": m["errors"], "processes": per_process}


OLD_FRONT = "behind Ray's Python proxy"  # results from before the local defaults changed (2026-12-06)


def report(result: dict[str, Any]) -> str:
    lines = [f"# Where Serve's CPU goes: py-spy under load ({result['date']}, {result['machine']})", "",
             f"Data: SYNTHETIC. Command: `{result['command']}`. Serve placement "
             f"`{result.get('placement', 'per_stage')}`, {result.get('front', OLD_FRONT)}. "
             f"{result['clients']} clients, "
             f"{result['seconds']:g} s sampled at {result['rate']} Hz per process after {result['warmup']:g} s of "
             f"warm-up. Load average (1 min) {result['load_start']:.2f} at start, {result['load_end']:.2f} at end.",
             "", f"Setup: {result['setup']['world']}; {result['setup']['model']}; {result['setup']['index']}.", "",
             "py-spy samples only busy threads, so a frame's share of a process's samples is its share of that "
             "process's CPU; *ms/req* = share x the process's CPU ms per answered request (py-spy's own cost "
             "runs on the same cores, so rates are lower than in `serve.md`, and more so for Serve, sampled in each "
             "of its processes, than for the monolith, sampled in 1: compare the systems' QPS in `serve.md`, "
             "not here). "
             "Inclusive rows list any frame on "
             "the stack, so they overlap.", ""]
    for system in ("serve", "monolith"):
        s = result[system]
        lines += [f"## {system}: {s['qps']:.1f} QPS, {s['answered']} answered, {s['errors']} errors", ""]
        procs = sorted(s["processes"].items(), key=lambda kv: -kv[1].get("cpu_ms_per_request", 0))
        lines += ["| process | CPU ms / request | samples |", "|---|---:|---:|"]
        lines += [f"| {name} | {p.get('cpu_ms_per_request', float('nan')):.1f} | {p.get('samples', 0)} |"
                  for name, p in procs]
        lines.append(f"| all | {sum(p.get('cpu_ms_per_request', 0) for _, p in procs):.1f} | |")
        for name, p in procs:
            if "error" in p:
                lines += ["", f"### {name}: py-spy failed: {p['error']}"]
                continue
            lines += ["", f"### {name}: {p['cpu_ms_per_request']:.1f} CPU ms / request", "",
                      "| self (innermost frame) | share | ms/req |", "|---|---:|---:|"]
            lines += [f"| `{f}` | {share:.1%} | {ms:.2f} |" for f, share, ms in p["self"]]
            lines += ["", "| inclusive (on the stack) | share | ms/req |", "|---|---:|---:|"]
            lines += [f"| `{f}` | {share:.1%} | {ms:.2f} |" for f, share, ms in p["inclusive"]
                      if not f.startswith(("<module>", "_bootstrap", "run (threading", "_run_once", "run_forever",
                                           "_run (asyncio", "run (asyncio"))][: 2 * TOP]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bench_serve's small setup (3,000 items)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="sampled seconds per system")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--placement", choices=("colocated", "per_stage"), default="colocated",
                    help="serve.placement of the Serve app (results: serve-profile.md for colocated, "
                    "serve-profile-per-stage.md for per_stage)")
    args = ap.parse_args()
    name = "serve-profile" if args.placement == "colocated" else "serve-profile-per-stage"

    import ray
    from ray import serve

    from ray_mgdspr.serve.app import AppArgs, start

    command = "python benchmarks/profile_serve.py" + " ".join(["", *sys.argv[1:]]).rstrip()
    load_start = os.getloadavg()[0]
    mono = None
    with tempfile.TemporaryDirectory(prefix="profile-serve-") as tmp_name:
        tmp = Path(tmp_name)
        setup = bench.prepare(tmp, args.quick)
        try:
            serve_environment(RayConfig())  # Serve as a local Ray of the project runs it: HAProxy, throughput mode
            ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
            cfg = start(AppArgs(serve={**bench.serve_overrides(setup), "placement": args.placement,
                                       "port": free_port()}))
            base = f"http://127.0.0.1:{cfg.port}"
            print("serve: profiling under load ...", flush=True)
            (tmp / "serve").mkdir()
            served = profile_window(base, setup, server_processes(None), args.clients, args.warmup, args.seconds,
                                    args.rate, tmp / "serve")
            serve.shutdown()
            ray.shutdown()
            port = free_port()
            mono = bench.start_monolith(setup, port)
            print("monolith: profiling under load ...", flush=True)
            (tmp / "mono").mkdir()
            monolith = profile_window(f"http://127.0.0.1:{port}", setup, server_processes(mono.pid), args.clients,
                                      args.warmup, args.seconds, args.rate, tmp / "mono")
        finally:
            if mono is not None:
                mono.terminate()
                mono.wait(30)
            if ray.is_initialized():
                ray.shutdown()
    result = {"date": dt.date.today().isoformat(), "data": "SYNTHETIC",
              "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
              "command": command, "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
              "rate": args.rate, "placement": args.placement,
              "front": "behind Ray's bundled HAProxy in Serve's throughput-optimised mode (a local Ray's defaults)",
              "setup": setup.describe, "load_start": load_start,
              "load_end": os.getloadavg()[0], "serve": served, "monolith": monolith}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
