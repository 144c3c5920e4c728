"""Ray training throughput against a plain single-process PyTorch loop, in one run.

What it measures (data: SYNTHETIC, the `demo` world of the simulator; the demo preset's model):

1. Baseline: ``fit_local``, a plain PyTorch loop in this process that featurizes each batch itself and
   steps the same model (no Ray): rows/s.
2. Ray, 1 worker: ``train`` with Ray Data streaming and featurizing in an actor pool and Ray Train
   running the step: rows/s per worker, and how much of the worker's time went to waiting for data
   (``data_wait_s``) against computing (``compute_s``): starvation shows as a large wait share.
3. Ray, 2 workers (DDP over gloo): rows/s per worker and in total; scaling = total / 1-worker rows/s.

Ratios: Ray 1 worker / plain loop (goal >= 0.9x), Ray 2 workers total / Ray 1 worker. On a 2-core
machine two workers and the featurizer share two cores, so scaling there says little about a cluster.
Ray Train's fixed start-up (about 10 s per fit) is excluded: rows/s count only the epochs' time.

    python benchmarks/bench_train.py            # ~4 min on 2 cores
    python benchmarks/bench_train.py --epochs 1

Results go to ``benchmarks/results/train-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def plain_loop(cfg, world: Path, steps: int) -> dict:
    from ray_mgdspr.data.features import Featurizer
    from ray_mgdspr.data.vocab import build_vocab_from_world
    from ray_mgdspr.data.world import read_manifest
    from ray_mgdspr.train.loop import fit_local

    vocab = build_vocab_from_world(world, cfg.vocab)
    featurizer = Featurizer(world, vocab, cfg.features)
    marks: list[float] = []
    run = fit_local(featurizer, vocab, world, read_manifest(world).train_days, cfg.model, cfg.loss, cfg.optim,
                    steps=steps, batch_size=cfg.train.batch_size,
                    on_step=lambda i, m: marks.append(time.perf_counter()))
    timed = marks[-1] - marks[0]  # from the end of step 1: excludes set-up and the first step's warm-up
    return {"rows_per_s": cfg.train.batch_size * (len(marks) - 1) / timed, "steps": len(marks),
            "seconds": run.seconds}


def ray_run(cfg, world: Path, storage: Path, workers: int, epochs: int) -> dict:
    from ray_mgdspr.train.trainer import train

    update = {"world": str(world), "storage_path": str(storage), "run_name": f"w{workers}", "num_workers": workers,
              "epochs": epochs}
    result = train(cfg.model_copy(update={"train": cfg.train.model_copy(update=update)}))
    history = result.metrics
    compute = sum(h["compute_s"] for h in history)
    wait = sum(h["data_wait_s"] for h in history)
    steps = history[-1]["step"]
    rows_per_worker = cfg.train.batch_size * steps / (compute + wait)
    return {"workers": workers, "steps_per_worker": steps, "rows_per_s_per_worker": rows_per_worker,
            "rows_per_s_total": rows_per_worker * workers, "compute_s": compute, "data_wait_s": wait,
            "data_wait_share": wait / (compute + wait), "wall_s": result.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

    from ray_mgdspr.config import load_preset
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.runtime import connect_ray

    cfg = load_preset("demo")
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        print("simulate the demo world (synthetic) ...", flush=True)
        simulate(cfg.simulate, world)
        connect_ray(cfg.ray)
        print("Ray, 1 worker ...", flush=True)
        one = ray_run(cfg, world, Path(tmp) / "train", 1, args.epochs)
        print("Ray, 2 workers ...", flush=True)
        two = ray_run(cfg, world, Path(tmp) / "train", 2, args.epochs)
        print("baseline: plain single-process loop ...", flush=True)
        plain = plain_loop(cfg, world, steps=one["steps_per_worker"])
    result = {
        "data": "SYNTHETIC (simulated demo world)",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}, device cpu",
        "config": "demo preset (d 32, batch 64, pool 256, N 64); Ray: 0.5 CPU per worker, 1 featurizer actor",
        "plain_loop": plain,
        "ray_1_worker": one,
        "ray_2_workers": two,
        "ratio_ray1_vs_plain": round(one["rows_per_s_per_worker"] / plain["rows_per_s"], 3),
        "scaling_2_vs_1_workers": round(two["rows_per_s_total"] / one["rows_per_s_total"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Training throughput ({result['date']}, {result['machine']})",
        "",
        f"Data: SYNTHETIC. Command: `python benchmarks/bench_train.py --epochs {args.epochs}`. {result['config']}.",
        "",
        "| run | rows/s per worker | rows/s total | data wait share |",
        "|---|---:|---:|---:|",
        f"| plain PyTorch loop (baseline) | {plain['rows_per_s']:.0f} | {plain['rows_per_s']:.0f} | (in-loop) |",
    ]
    for name, r in (("Ray, 1 worker", one), ("Ray, 2 workers", two)):
        md.append(f"| {name} | {r['rows_per_s_per_worker']:.0f} | {r['rows_per_s_total']:.0f} "
                  f"| {r['data_wait_share']:.0%} |")
    md += ["", f"- Ray 1 worker / plain loop: **{result['ratio_ray1_vs_plain']}x** (goal >= 0.9x)",
           f"- 2 workers / 1 worker (total rows/s): **{result['scaling_2_vs_1_workers']}x**"]
    (RESULTS / "train-cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
