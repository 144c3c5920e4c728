"""Memory of the featurizer actors: each building its own copy of the histories, or mapping one saved copy.

What it measures (data: SYNTHETIC, a simulated preset world; the preset's features):

For ``n`` in ``--actors`` (default 1, 2, 4) and each way of giving the actors their featurizer:

- ``own``: each actor builds a :class:`~ray_mgdspr.data.features.Featurizer` from the world (reads the items
  table and every user's behaviours and history queries, sorts them): ``data.share_history: false``.
- ``shared``: one task builds and saves it once (``Featurizer.save``), each actor memory-maps the files
  (``Featurizer.load``): ``data.share_history: true``, the default.

the real :class:`~ray_mgdspr.data.pipeline.FeaturizeBatch` runs in ``n`` Ray actors (0.25 CPU each, as the
preset gives them), each featurizes the same examples (every training example of the last train day, so the
histories of most users are read), and then each actor's memory is read from ``/proc``: peak RSS (``VmHWM``),
RSS, USS (pages only it holds) and PSS (each shared page divided among its sharers: the PSS of the actors sums to
what they cost the node together), and the PSS of the mapped ``.npy`` files alone. An actor that only imports the
same modules (``Idle``) gives the floor of any Python process here. Also timed: the actor's start-up
(build or map) and its featurize rate.

    python benchmarks/bench_featurizer_memory.py                       # small preset, ~3 min on 2 cores
    python benchmarks/bench_featurizer_memory.py --preset medium       # ~6 min

Results go to ``benchmarks/results/featurizer-memory-<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import record  # benchmarks/ is on sys.path when run as a script


def memory(pid: int, saved: Path) -> dict[str, float]:
    """MiB: peak RSS, RSS, USS and PSS of a process (``/proc/<pid>/status`` and ``smaps_rollup``), and the PSS of
    its mappings of the saved featurizer's files (``smaps``)."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) / 1024
    mapped, inside = 0.0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line: range perms offset dev inode [path]
            inside = len(head) >= 6 and head[5].startswith(str(saved))
        elif inside and line.startswith("Pss:"):
            mapped += int(line.split()[1]) / 1024
    return {"peak_rss": fields["VmHWM"], "rss": fields["VmRSS"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"], "saved_pss": mapped}


class Idle:
    """The floor: a Ray actor that imports what a featurizer actor imports and holds nothing."""

    def __init__(self) -> None:
        import ray_mgdspr.data.pipeline  # noqa: F401

    def pid(self) -> int:
        return os.getpid()


class Probe:
    """A Ray actor around the pipeline's FeaturizeBatch: timed start-up, a featurize pass, its pid."""

    def __init__(self, **kwargs) -> None:
        from ray_mgdspr.data.pipeline import FeaturizeBatch

        t0 = time.perf_counter()
        self.batch = FeaturizeBatch(**kwargs)
        self.start_s = time.perf_counter() - t0

    def run(self, rows, batch_rows: int = 1024) -> dict:
        t0 = time.perf_counter()
        for i in range(0, rows.num_rows, batch_rows):
            self.batch(rows.slice(i, batch_rows))
        return {"pid": os.getpid(), "start_s": self.start_s, "featurize_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="packaged preset whose world is simulated (default: small)")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4], help="actor counts (default: 1 2 4)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from ray_mgdspr.config import load_preset
    from ray_mgdspr.data.features import Featurizer
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.data.vocab import build_vocab_from_world
    from ray_mgdspr.data.world import read_manifest
    from ray_mgdspr.runtime import connect_ray

    cfg = load_preset(args.preset)
    load_start = os.getloadavg()[0]
    rows_out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        print(f"simulate the {args.preset} world (synthetic) ...", flush=True)
        simulate(cfg.simulate, world)
        vocab_path = build_vocab_from_world(world, cfg.vocab).save(Path(tmp) / "vocab.json")
        m = read_manifest(world)
        print("build and save the featurizer once ...", flush=True)
        t0 = time.perf_counter()
        featurizer = Featurizer(world, build_vocab_from_world(world, cfg.vocab), cfg.features)
        build_s = time.perf_counter() - t0
        rows = featurizer.examples(m.train_days[-1:])
        saved = featurizer.save(Path(tmp) / "featurizer")
        saved_mib = sum(p.stat().st_size for p in saved.iterdir()) / 2**20
        del featurizer
        connect_ray(cfg.ray)
        cpus = cfg.data.featurize_cpus
        idle = [ray.remote(num_cpus=cpus)(Idle).remote() for _ in range(2)]
        floor = sum(memory(p, saved)["pss"] for p in ray.get([a.pid.remote() for a in idle])) / len(idle)
        for a in idle:
            ray.kill(a)
        kwargs = {"own": {"vocab_path": str(vocab_path), "world": str(world), "features": cfg.features},
                  "shared": {"vocab_path": str(vocab_path), "saved": str(saved)}}
        for n in args.actors:
            for mode in ("own", "shared"):
                print(f"{n} actor(s), {mode} ...", flush=True)
                actors = [ray.remote(num_cpus=cpus)(Probe).remote(**kwargs[mode]) for _ in range(n)]
                per_actor = [{**r, **memory(r["pid"], saved)} for r in ray.get([a.run.remote(rows) for a in actors])]
                for a in actors:
                    ray.kill(a)
                time.sleep(1)
                rows_out.append({
                    "actors": n, "mode": mode, "per_actor": per_actor,
                    "sum_pss": sum(r["pss"] for r in per_actor), "sum_uss": sum(r["uss"] for r in per_actor),
                    "history_pss": sum(r["pss"] for r in per_actor) - n * floor,
                    "saved_pss": sum(r["saved_pss"] for r in per_actor),
                    "max_peak_rss": max(r["peak_rss"] for r in per_actor),
                    "start_s": sum(r["start_s"] for r in per_actor) / n,
                    "rows_per_s": rows.num_rows * n / sum(r["featurize_s"] for r in per_actor)})
    ray.shutdown()
    command = (f"python benchmarks/bench_featurizer_memory.py --preset {args.preset} --actors "
               + " ".join(map(str, args.actors)))
    result = {**record.meta(args.preset, command, load_start), "examples": rows.num_rows, "saved_mib": saved_mib,
              "build_s": build_s, "idle_actor_pss_mib": floor, "runs": rows_out}
    record.save(f"featurizer-memory-{args.preset}", result, report(result))


def report(r: dict) -> str:
    lines = [
        *record.header("Featurizer actors' memory: own copies against one mapped copy", r),
        f"Each actor featurizes the {r['examples']:,} training examples of the last train day. The saved featurizer "
        f"is {r['saved_mib']:.0f} MiB of `.npy` files; building it in one process took {r['build_s']:.1f} s. An idle "
        f"actor (the same imports, nothing held) has a PSS of {r['idle_actor_pss_mib']:.0f} MiB; \"sum PSS - floor\" "
        "is what the actors hold beyond that: the histories and catalogue, the vocabulary and each actor's batch "
        "working set. \"Of which the saved arrays\": the PSS of the mapped `.npy` files, summed over the actors "
        "(each shared page counted once in all). MiB throughout.", "",
        "| actors | featurizer | sum PSS - floor | of which the saved arrays | sum PSS | sum USS | "
        "peak RSS (largest) | start-up s per actor | examples/s per actor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["runs"]:
        lines.append(f"| {row['actors']} | {row['mode']} | {row['history_pss']:,.0f} | {row['saved_pss']:,.0f} | "
                     f"{row['sum_pss']:,.0f} | "
                     f"{row['sum_uss']:,.0f} | {row['max_peak_rss']:,.0f} | {row['start_s']:.2f} | "
                     f"{row['rows_per_s']:,.0f} |")
    lines += ["", "`own`: each actor builds its featurizer from the world (`data.share_history: false`); `shared`: "
              "one task saves it, each actor memory-maps the files (`data.share_history: true`, the default). Peak "
              "RSS counts mapped pages too, shared or not; PSS divides them among the processes that map them.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
