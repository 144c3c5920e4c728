"""What Python's garbage collector costs while a version loads, and what that load does to requests served beside it.

Data: SYNTHETIC (a simulator world kept by ``bench_scale.py --work``, or any run's config). No Ray, no HTTP: the
Ray-free ``engine.Retriever`` a replica loads (``serve/collector.py`` pauses the automatic collections while it
loads), in a fresh process per side, sides in the order A B (B A ... with ``--rounds 2``):

- ``paused``: as shipped;
- ``collector on``: the same code with the pause made a no-op (the collector runs as it did before).

Each process:

1. opens the configuration's version (``Retriever.open``, what a replica pays at start and at each promotion):
   seconds, the automatic collections during it by generation (count, total and longest pause, from
   ``gc.callbacks``), and the process's peak RSS once it is open;
2. answers ``--warmup`` held-out test-day searches (k 50, filter on), then opens the version a second time in a
   thread, as an ingress replica stages a new version beside the one it serves (``serve.placement: inline``),
   while this thread answers held-out searches one after another: their latency while the load runs, and the
   same number of requests after it, on the same process.

    python benchmarks/load_gc.py --config /tmp/scale/work/large/config-IVF1024_Flat-s4-inline-latency.yaml

Results: ``benchmarks/results/load-gc.{md,json}`` (``--name``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import record
from bench_serve import held_out_requests

SIDES = {"paused": "as shipped: automatic collections paused while the version loads",
         "collector on": "the pause a no-op: the collector runs during the load as it did before"}


class Pauses:
    """The automatic collections of this process while it is ``on``: (generation, ms) each."""

    def __init__(self) -> None:
        self.on, self.seen, self._start = False, [], 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seen.append((info["generation"], (time.perf_counter() - self._start) * 1000))

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"gen{g}": {"count": len(ms), "total_s": sum(ms) / 1000, "max_ms": max(ms, default=0.0)}
                for g in (0, 1, 2) for ms in [[m for gg, m in self.seen if gg == g]]}


def latencies(retriever: Any, requests: list[Any]) -> list[float]:
    out = []
    for req in requests:
        t = time.perf_counter()
        retriever.request(req)
        out.append((time.perf_counter() - t) * 1000)
    return out


def child(config: Path, side: str, warmup: int) -> dict[str, Any]:
    from ray_mgdspr.config import load_config
    from ray_mgdspr.serve import collector
    from ray_mgdspr.serve.engine import Retriever
    from ray_mgdspr.serve.schemas import RetrieveRequest

    if side == "collector on":
        collector.gc = types.SimpleNamespace(isenabled=gc.isenabled, disable=lambda: None, enable=gc.enable)
    project = load_config(config)
    cfg = project.serve.resolved(project)
    pauses = Pauses()
    pauses.on, t = True, time.perf_counter()
    retriever = Retriever.open(cfg)
    open_s, pauses.on = time.perf_counter() - t, False
    out: dict[str, Any] = {"open_s": open_s, "open_gc": pauses.summary(), "tracked_objects": len(gc.get_objects()),
                           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "version": retriever.release.version, "items": sum(s.rows for s in retriever.shards)}
    bodies = held_out_requests(Path(cfg.world), 50, 5000)
    requests = [RetrieveRequest(**b) for b in bodies]
    latencies(retriever, requests[:warmup])
    loaded: list[Any] = []
    pauses.seen.clear()
    loader = threading.Thread(target=lambda: loaded.append(Retriever.open(cfg)), name="stage the next version")
    pauses.on, t = True, time.perf_counter()
    loader.start()
    during: list[float] = []
    i = warmup
    while loader.is_alive():
        during += latencies(retriever, [requests[i % len(requests)]])
        i += 1
    out["second_open_s"], pauses.on = time.perf_counter() - t, False
    out["beside_gc"] = pauses.summary()
    del loaded[:]
    after = latencies(retriever, [requests[(i + j) % len(requests)] for j in range(len(during))])
    out["during"], out["after"] = during, after
    return out


def stats(ms: list[float]) -> str:
    return (f"{np.percentile(ms, 50):.1f} / {np.percentile(ms, 99):.1f} / {max(ms):.1f}" if ms else "-")


def report(r: dict) -> str:
    lines = record.header("Loading a version: Python's garbage collector, and requests served beside the load", r)
    lines += [f"Version {r['runs'][0]['version']}: {r['runs'][0]['items']:,} items (`{r['config']}`). One fresh "
              "process per run, in the order listed. Sides: " + "; ".join(f"**{k}**: {v}" for k, v in SIDES.items())
              + ".", "",
              "| run | side | open s | full collections (gen 2) during open: n / total s / longest ms | gen 1 | "
              "gen 0 | tracked objects after | peak RSS MiB |", "|---:|---|---:|---|---|---|---:|---:|"]
    for n, run in enumerate(r["runs"], 1):
        g = run["open_gc"]
        cells = [f"{g[k]['count']} / {g[k]['total_s']:.1f} / {g[k]['max_ms']:.0f}" for k in ("gen2", "gen1", "gen0")]
        lines.append(f"| {n} | {run['side']} | {run['open_s']:.1f} | " + " | ".join(cells)
                     + f" | {run['tracked_objects']:,} | {run['peak_rss_mib']:,.0f} |")
    lines += ["", "Requests answered one after another while a second copy of the version loads in a thread of the "
              "same process (what an inline ingress replica does while it stages a promotion), then as many after "
              "it (ms, p50 / p99 / max):", "",
              "| run | side | second open s | requests during | during the load | after it | collections during "
              "(gen 2 / 1 / 0) | their total s | the longest ms |", "|---:|---|---:|---:|---|---|---|---:|---:|"]
    for n, run in enumerate(r["runs"], 1):
        g = run["beside_gc"]
        lines.append(f"| {n} | {run['side']} | {run['second_open_s']:.1f} | {len(run['during'])} | "
                     f"{stats(run['during'])} | {stats(run['after'])} | "
                     + " / ".join(str(g[k]["count"]) for k in ("gen2", "gen1", "gen0"))
                     + f" | {sum(v['total_s'] for v in g.values()):.1f} | {max(v['max_ms'] for v in g.values()):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="a project config whose serve section to open")
    ap.add_argument("--rounds", type=int, default=1, help="A B per round, in ABBA order over rounds")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--name", default="load-gc")
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        json.dump(child(args.config, args.child, args.warmup), sys.stdout)
        return
    load_start = os.getloadavg()[0]
    order = [s for n in range(args.rounds) for s in (list(SIDES) if n % 2 == 0 else list(SIDES)[::-1])]
    runs = []
    for side in order:
        print(f"{side}: opening {args.config} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--config", str(args.config), "--child", side,
                               "--warmup", str(args.warmup)], check=True, capture_output=True, text=True)
        runs.append({"side": side} | json.loads(done.stdout))
        print(f"{side}: open {runs[-1]['open_s']:.1f} s", file=sys.stderr, flush=True)
    world = f"{runs[0]['items']:,}-item"  # the version's catalogue: the world it was built from
    result = record.meta(world, "python benchmarks/load_gc.py " + " ".join(sys.argv[1:]), load_start)
    result |= {"config": str(args.config), "runs": runs}
    record.save(args.name, result, report(result))


if __name__ == "__main__":
    main()
