"""Ray training throughput against a plain single-process PyTorch loop, in one run.

What it measures (data: SYNTHETIC, the `demo` world of the simulator; the demo preset's model):

1. Baseline: ``fit_local``, a plain PyTorch loop in this process that featurizes each batch itself and
   steps the same model (no Ray): rows/s.
2. Ray, 1 worker: ``train`` with Ray Data featurizing in an actor pool and Ray Train running the step:
   rows/s per worker, and how much of the worker's time went to waiting for data (``data_wait_s``) against
   computing (``compute_s``): starvation shows as a large wait share. Twice: featurized once for the run
   (``data.materialize``, the default) and streamed through the featurizer again every epoch.
3. Ray, 2 workers (DDP over gloo): rows/s per worker and in total; scaling = total / 1-worker rows/s.

Ratios: Ray 1 worker / plain loop (goal >= 0.9x), Ray 2 workers total / Ray 1 worker. On a 2-core
machine two workers and the featurizer share two cores, so scaling there says little about a cluster.
Ray Train's fixed start-up (about 10 s per fit) is excluded: rows/s count only the epochs' time.

Threads: the plain loop runs torch with its default threads (the machine's cores); a Ray worker runs as many as
its CPUs (Ray sets ``OMP_NUM_THREADS``): the preset's ``train.resources_per_worker`` (0.5 CPU: 1 thread, the other
core feeding it), or ``--worker-cpus``. On 2 cores a worker of 2 CPUs (2 threads) was slower than one of 0.5 (1146
against 1423 rows/s, demo preset, 2026-12-06): its iterator thread then competes with both torch threads. A plain
loop on one thread is ``--plain-threads 1``. Each run's torch threads are in the results.

    python benchmarks/bench_train.py            # ~5 min on 2 cores
    python benchmarks/bench_train.py --epochs 1
    python benchmarks/bench_train.py --preset small --max-steps-per-epoch 60

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


def plain_loop(cfg, world: Path, steps: int, threads: int | None = None) -> dict:
    import torch

    from ray_mgdspr.data.features import Featurizer
    from ray_mgdspr.data.vocab import build_vocab_from_world
    from ray_mgdspr.data.world import read_manifest
    from ray_mgdspr.train.loop import fit_local

    if threads:
        torch.set_num_threads(threads)
    vocab = build_vocab_from_world(world, cfg.vocab)
    featurizer = Featurizer(world, vocab, cfg.features)
    marks: list[float] = []
    run = fit_local(featurizer, vocab, world, read_manifest(world).train_days, cfg.model, cfg.loss, cfg.optim,
                    steps=steps, batch_size=cfg.train.batch_size,
                    on_step=lambda i, m: marks.append(time.perf_counter()))
    timed = marks[-1] - marks[0]  # from the end of step 1: excludes set-up and the first step's warm-up
    return {"rows_per_s": cfg.train.batch_size * (len(marks) - 1) / timed, "steps": len(marks),
            "seconds": run.seconds, "torch_threads": torch.get_num_threads()}


def ray_run(cfg, world: Path, storage: Path, workers: int, epochs: int, materialize: bool,
            max_steps: int | None, worker_cpus: float) -> dict:
    from ray_mgdspr.train.trainer import train

    update = {"world": str(world), "storage_path": str(storage), "epochs": epochs, "max_steps_per_epoch": max_steps,
              "run_name": f"w{workers}-{'once' if materialize else 'stream'}", "num_workers": workers,
              "resources_per_worker": {**cfg.train.resources_per_worker, "CPU": worker_cpus}}
    data = cfg.data.model_copy(update={"materialize": materialize})
    result = train(cfg.model_copy(update={"train": cfg.train.model_copy(update=update), "data": data}))
    history = result.metrics
    compute = sum(h["compute_s"] for h in history)
    wait = sum(h["data_wait_s"] for h in history)
    steps = history[-1]["step"]
    rows_per_worker = cfg.train.batch_size * steps / (compute + wait)
    return {"workers": workers, "materialize": materialize, "steps_per_worker": steps,
            "rows_per_s_per_worker": rows_per_worker, "rows_per_s_total": rows_per_worker * workers,
            "compute_s": compute, "data_wait_s": wait, "data_wait_share": wait / (compute + wait),
            "worker_cpus": worker_cpus, "torch_threads": history[-1].get("torch_threads"),
            "wall_s": result.seconds, "rows_per_wall_s": cfg.train.batch_size * steps * workers / result.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--preset", default="demo", help="packaged preset: world and model (default: demo)")
    ap.add_argument("--max-steps-per-epoch", type=int, default=None,
                    help="cap each epoch's steps (train.max_steps_per_epoch), for the larger presets")
    ap.add_argument("--worker-cpus", type=float, default=None,
                    help="CPUs of each Ray worker, and so its torch threads (default: the preset's "
                    "train.resources_per_worker)")
    ap.add_argument("--cpus-per-run", type=float, default=None,
                    help="CPUs of each Ray run, split among its workers (2: 1 worker of 2 CPUs, 2 workers of 1): the "
                    "plain loop's threads in all; overrides --worker-cpus")
    ap.add_argument("--plain-threads", type=int, default=None, help="torch threads of the plain loop (default: "
                    "torch's, the machine's cores)")
    ap.add_argument("--skip-streamed", action="store_true", help="leave out the streamed-every-epoch run")
    ap.add_argument("--name", default="train-cpu", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

    from ray_mgdspr.config import load_preset
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.runtime import connect_ray

    cfg = load_preset(args.preset)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        print(f"simulate the {args.preset} world (synthetic) ...", flush=True)
        simulate(cfg.simulate, world)
        connect_ray(cfg.ray)
        runs = {}
        for name, workers, once in (("ray_1_worker", 1, True), ("ray_1_worker_streamed", 1, False),
                                    ("ray_2_workers", 2, True)):
            if args.skip_streamed and not once:
                continue
            print(f"Ray, {workers} worker(s), {'featurized once' if once else 'streamed every epoch'} ...",
                  flush=True)
            cpus = (args.cpus_per_run / workers if args.cpus_per_run else
                    args.worker_cpus or cfg.train.resources_per_worker.get("CPU", 1.0))
            runs[name] = ray_run(cfg, world, Path(tmp) / "train", workers, args.epochs, once,
                                 args.max_steps_per_epoch, cpus)
        one = runs["ray_1_worker"]
        print("baseline: plain single-process loop ...", flush=True)
        plain = plain_loop(cfg, world, steps=one["steps_per_worker"], threads=args.plain_threads)
    m, t, lo = cfg.model, cfg.train, cfg.loss
    command = f"python benchmarks/bench_train.py --epochs {args.epochs} --preset {args.preset}" + (
        f" --max-steps-per-epoch {args.max_steps_per_epoch}" if args.max_steps_per_epoch else "") + (
        f" --worker-cpus {args.worker_cpus:g}" if args.worker_cpus else "") + (
        f" --plain-threads {args.plain_threads}" if args.plain_threads else "") + (
        f" --cpus-per-run {args.cpus_per_run:g}" if args.cpus_per_run else "") + (
        " --skip-streamed" if args.skip_streamed else "") + (f" --name {args.name}" if args.name != "train-cpu" else "")
    result = {
        "data": f"SYNTHETIC (simulated {args.preset} world)",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}, device cpu",
        "command": command,
        "config": f"{args.preset} preset (d {m.d}, batch {t.batch_size}, pool {lo.pool_size}, N {lo.n_hard}); Ray: "
                  f"{cfg.data.featurize_actors} featurizer actor(s) of {cfg.data.featurize_cpus:g} CPU, "
                  f"{cfg.data.prefetch_batches} batches prefetched per worker",
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "plain_loop": plain,
        **runs,
        "ratio_ray1_vs_plain": round(one["rows_per_s_per_worker"] / plain["rows_per_s"], 3),
        "ratio_ray1_streamed_vs_plain": (round(runs["ray_1_worker_streamed"]["rows_per_s_per_worker"]
                                               / plain["rows_per_s"], 3) if "ray_1_worker_streamed" in runs else None),
        "ratio_ray2_total_vs_plain": round(runs["ray_2_workers"]["rows_per_s_total"] / plain["rows_per_s"], 3),
        "scaling_2_vs_1_workers": round(runs["ray_2_workers"]["rows_per_s_total"] / one["rows_per_s_total"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Training throughput ({result['date']}, {result['machine']})",
        "",
        f"Data: SYNTHETIC. Command: `{command}`. {result['config']}. Load average (1 min) "
        f"{load_start:.2f} at start, {result['load_average']['end']:.2f} at end.",
        "",
        "| run | CPUs per worker (torch threads) | rows/s per worker | rows/s total | data wait share | wall s "
        "(whole `train`) | rows per wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| plain PyTorch loop (baseline) | ({plain.get('torch_threads', '?')}) | {plain['rows_per_s']:.0f} | "
        f"{plain['rows_per_s']:.0f} | (in-loop) | {plain['seconds']:.1f} | |",
    ]
    for name, r in (("Ray, 1 worker, featurized once (default)", one),
                    ("Ray, 1 worker, streamed every epoch", runs.get("ray_1_worker_streamed")),
                    ("Ray, 2 workers, featurized once", runs["ray_2_workers"])):
        if r is None:
            continue
        md.append(f"| {name} | {r.get('worker_cpus', '?'):g} ({r.get('torch_threads', '?')}) | "
                  f"{r['rows_per_s_per_worker']:.0f} | {r['rows_per_s_total']:.0f} "
                  f"| {r['data_wait_share']:.0%} | {r['wall_s']:.1f} | {r['rows_per_wall_s']:.0f} |")
    md += ["",
           "- rows/s count the epochs' compute and data wait only (Ray Train's start-up, the featurize-once pass "
           "and checkpoints are outside them); *rows per wall s* divides the rows trained by the whole `train` "
           "call's time, everything included.",
           f"- Ray 1 worker / plain loop: **{result['ratio_ray1_vs_plain']}x** featurized once" + (
               f", {result['ratio_ray1_streamed_vs_plain']}x streamed" if result["ratio_ray1_streamed_vs_plain"]
               else "") + " (goal >= 0.9x); torch threads: plain loop "
           f"{plain.get('torch_threads')}, Ray worker {one.get('torch_threads')}",
           f"- 2 workers / 1 worker (total rows/s): **{result['scaling_2_vs_1_workers']}x**; 2 workers / plain loop: "
           f"{result['ratio_ray2_total_vs_plain']}x"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
