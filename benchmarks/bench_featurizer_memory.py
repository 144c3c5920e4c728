"""Featurizer memory against the number of featurizer actors (issue 17; SYNTHETIC data).

    .venv/bin/python benchmarks/bench_featurizer_memory.py                    # small preset, 1 and 2 actors
    .venv/bin/python benchmarks/bench_featurizer_memory.py --preset medium --actors 1 2 3

For each number of actors, a fresh local Ray featurizes the preset world's training days once
(``training_dataset(...).materialize()``, as ``train`` does with ``data.materialize``; the preset's data config
but for the number of actors, and ``--blocks-per-actor`` to give every actor work) while every process of the tree
is sampled (``proctree``): per
featurizer actor (``MapWorker(...FeaturizeBatch)``, Ray fuses the explode step into it) the peak RSS, USS
(its private pages) and PSS (its share of the pages it maps, shared ones divided among their mappers). Two ways:

* **shared** (the code's): one Ray task loads the featurizer; each actor maps its arrays from the object store;
* **per actor** (what it replaced, rebuilt here as a baseline): each actor loads its own featurizer.

"History + catalogue arrays" is the size of the featurizer's numpy arrays, loaded once in this process. Results:
``benchmarks/results/featurizer-memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from proctree import label, tree

RESULTS = Path(__file__).parent / "results"


class Sampler(threading.Thread):
    """Peak RSS / USS / PSS (bytes) of every featurizer actor of this process's tree, sampled every ``every`` s."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.peaks: dict[int, dict[str, float]] = defaultdict(lambda: {"rss": 0.0, "uss": 0.0, "pss": 0.0})

    def run(self) -> None:
        root = psutil.Process()
        while not self.stop.is_set():
            for p in tree(root):
                try:
                    if "FeaturizeBatch" not in label(p):
                        continue
                    m = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                peak = self.peaks[p.pid]
                for k in ("rss", "uss", "pss"):
                    peak[k] = max(peak[k], getattr(m, k))
            self.stop.wait(self.every)


def array_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the numpy arrays reachable from ``obj`` (attributes, dicts, lists), each counted once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(array_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(array_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(array_bytes(v, seen) for v in vars(obj).values())
    return 0


def run(world: Path, vocab_path: Path, cfg, actors: int, shared: bool, limit: int | None, blocks: int | None
        ) -> dict:
    import ray

    from ray_mgdspr.data import pipeline
    from ray_mgdspr.data.features import EXPLODE_COLUMNS, explode_positives
    from ray_mgdspr.data.world import read_manifest
    from ray_mgdspr.runtime import connect_ray

    connect_ray(cfg.ray)
    data = cfg.data.model_copy(update={"featurize_actors": actors,
                                       "repartition": blocks * actors if blocks else cfg.data.repartition})
    days = read_manifest(world).train_days
    if shared:
        ds = pipeline.training_dataset(world, days, vocab_path, cfg.features, data)
    else:  # the baseline: training_dataset's stages, with every actor loading its own featurizer
        cpus = {"num_cpus": data.read_cpus}
        ds = ray.data.read_parquet(pipeline.search_event_files(world, days), **cpus)
        ds = ds.select_columns(EXPLODE_COLUMNS)
        if data.repartition is not None:
            ds = ds.repartition(data.repartition)
        ds = ds.map_batches(explode_positives, batch_format="pyarrow", **cpus)
        ds = ds.map_batches(PerActorFeaturizeBatch, fn_constructor_kwargs={
            "args": (str(world), str(vocab_path), cfg.features, None)},
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=data.featurize_cpus,
            batch_size=data.batch_rows, batch_format="pyarrow")
    if limit:
        ds = ds.limit(limit)
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    rows = ds.materialize().count()
    seconds = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    ray.shutdown()
    peaks = list(sampler.peaks.values())
    gib = 2**30
    return {"actors": actors, "mode": "shared" if shared else "per actor", "rows": rows,
            "seconds": round(seconds, 1), "actors_seen": len(peaks),
            "peak_rss_gib": [round(p["rss"] / gib, 3) for p in peaks],
            "peak_uss_gib": [round(p["uss"] / gib, 3) for p in peaks],
            "peak_pss_gib": [round(p["pss"] / gib, 3) for p in peaks],
            "sum_uss_gib": round(sum(p["uss"] for p in peaks) / gib, 3),
            "sum_pss_gib": round(sum(p["pss"] for p in peaks) / gib, 3)}


class PerActorFeaturizeBatch:
    """The baseline's map: each actor loads the featurizer itself (as before ``shared_featurizer``)."""

    def __init__(self, args: tuple) -> None:
        from ray_mgdspr.data.pipeline import load_featurizer

        self.featurizer = load_featurizer(*args)

    def __call__(self, batch: object) -> dict:
        return self.featurizer(batch)


def report(result: dict) -> str:
    lines = [f"# Featurizer memory against featurizer actors ({result['date']}, {result['machine']})", "",
             f"Data: SYNTHETIC ({result['preset']} preset world). Command: `{result['command']}`. Featurizing the "
             f"training days' first {result['rows']:,} examples (`training_dataset(...).limit(n).materialize()`; "
             "an actor loads or maps the histories when it starts); history + catalogue arrays of the "
             f"featurizer: {result['featurizer_array_gib']:.3f} GiB. Per featurizer actor: peak RSS (every page it "
             "maps, shared ones included), USS (its private pages), PSS (its share of the pages it maps). Load "
             f"average {result['load'][0]:.2f} at start, {result['load'][1]:.2f} at end.", "",
             "| featurizer | actors | peak RSS per actor GiB | peak USS per actor GiB | sum of USS GiB | sum of PSS "
             "GiB | seconds |", "|---|---:|---|---|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['mode']} | {r['actors']} | {', '.join(map(str, r['peak_rss_gib']))} | "
                     f"{', '.join(map(str, r['peak_uss_gib']))} | {r['sum_uss_gib']} | {r['sum_pss_gib']} | "
                     f"{r['seconds']} |")
    per = {(r["mode"], r["actors"]): r for r in result["runs"]}
    most = max(r["actors"] for r in result["runs"])
    if ("shared", most) in per and ("per actor", most) in per and most > 1:
        own, mapped = per[("per actor", most)]["sum_uss_gib"], per[("shared", most)]["sum_uss_gib"]
        lines += ["", f"Goal (issue 17): total history memory independent of the number of featurizer actors. With "
                  f"{most} actors the actors' private memory (sum of USS) is {own} GiB when each loads its own "
                  f"featurizer and {mapped} GiB when they map "
                  "the one in the object store (held once per node). What an actor still holds privately is its "
                  "working set: the blocks it explodes and featurizes (a day file is one block unless "
                  "`data.repartition` splits it), Arrow's memory pool, Python and torch; an actor that gets no block "
                  "touches none of the shared pages."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, default=100_000, help="featurize at most this many examples (the memory "
                    "is loaded when an actor starts; 0: all)")
    ap.add_argument("--blocks-per-actor", type=int, default=None, help="split the read into this many blocks per "
                    "actor (data.repartition), so that every actor works (default: the preset's, one per day file)")
    ap.add_argument("--name", default="featurizer-memory", help="results file stem under benchmarks/results/")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()

    from ray_mgdspr.config import load_preset
    from ray_mgdspr.data.pipeline import load_featurizer
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.data.vocab import build_vocab_from_world

    cfg = load_preset(a.preset)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-featurizer-") as tmp:
        world, vocab_path = Path(tmp) / "world", Path(tmp) / "vocab.json"
        print(f"simulate the {a.preset} world (synthetic) ...", flush=True)
        simulate(cfg.simulate, world)
        build_vocab_from_world(world, cfg.vocab).save(vocab_path)
        array_gib = array_bytes(load_featurizer(world, vocab_path, cfg.features)) / 2**30
        runs = []
        for shared in (False, True):
            for n in a.actors:
                print(f"{'shared' if shared else 'per actor'}, {n} actor(s) ...", flush=True)
                runs.append(run(world, vocab_path, cfg, n, shared, a.rows, a.blocks_per_actor))
                print(f"  {runs[-1]}", flush=True)
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpu",
              "command": " ".join(["python", *sys.argv]), "preset": a.preset, "data": "SYNTHETIC",
              "featurizer_array_gib": round(array_gib, 3), "runs": runs, "rows": a.rows,
              "load": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    (a.out / f"{a.name}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
