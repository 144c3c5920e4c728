"""Larger training batches at a fixed example budget: examples/s and the Recall they reach, with the learning rate
scaled to the batch (``optim.lr_scaling``) or not.

What it measures (data: SYNTHETIC, a simulated preset world; the preset's model and loss):

For each (global batch, lr scaling) in ``--runs``, ``fit_local`` (the Ray-free training loop the Ray Train
workers run, in this process) trains a fresh model on the same examples for the same number of **examples**
(``--epochs`` passes over the training days' examples), so a larger batch takes fewer steps. Then Recall@50 of
the held-out test-day searches by exact search over the whole catalogue (``trainer.evaluate``, what each epoch
reports). Runs with a scaled rate warm up over ``--warmup-frac`` of their steps (Goyal et al. 2017); the
reference run (batch ``optim.lr_reference_batch``) does not. A faster step on a GPU is only worth having if its
batch reaches the same Recall in the same examples: this is the part of that question a CPU can answer; the
examples/s here are this machine's, not a GPU's (``benchmarks/gpu_check.py`` times the step on a GPU).

    python benchmarks/bench_batch.py                          # demo preset, 5 runs, ~8 min on 2 cores
    python benchmarks/bench_batch.py --runs 256:none 4096:sqrt --epochs 4

Results go to ``benchmarks/results/batch-<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import record  # benchmarks/ is on sys.path when run as a script

RUNS = ["256:none", "1024:none", "1024:sqrt", "4096:none", "4096:sqrt"]
K = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="packaged preset: world, model and loss (default: demo)")
    ap.add_argument("--runs", nargs="+", default=RUNS, help="BATCH:SCALING pairs, SCALING one of none, sqrt, "
                    f"linear (default: {' '.join(RUNS)})")
    ap.add_argument("--epochs", type=float, default=16.0, help="example budget, in passes over the training "
                    "examples (default: 16)")
    ap.add_argument("--warmup-frac", type=float, default=0.05, help="warm-up share of a scaled run's steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from ray_mgdspr.config import load_preset
    from ray_mgdspr.data.features import Featurizer
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.data.vocab import build_vocab_from_world
    from ray_mgdspr.data.world import read_manifest
    from ray_mgdspr.train.loop import fit_local
    from ray_mgdspr.train.trainer import catalogue_features, eval_features, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_preset(args.preset)
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        print(f"simulate the {args.preset} world (synthetic) ...", flush=True)
        simulate(cfg.simulate, world)
        m = read_manifest(world)
        vocab = build_vocab_from_world(world, cfg.vocab)
        vocab_path = vocab.save(Path(tmp) / "vocab.json")
        featurizer = Featurizer(world, vocab, cfg.features)
        n_examples = featurizer.examples(m.train_days).num_rows
        catalogue = catalogue_features(str(world), str(vocab_path), cfg)
        held_out = eval_features(str(world), str(vocab_path), cfg, m.test_days)
        budget = int(args.epochs * n_examples)
        for spec in args.runs:
            batch_text, scaling = spec.split(":")
            batch = int(batch_text)
            steps = max(1, budget // batch)
            optim = cfg.optim.model_copy(update={"lr_scaling": scaling})
            scaled = optim.scaled_learning_rate(batch)
            if scaled > optim.learning_rate:
                optim = optim.model_copy(update={"warmup_steps": max(1, round(args.warmup_frac * steps))})
            print(f"batch {batch}, lr scaling {scaling}: {steps} steps, lr {scaled:.2e} ...", flush=True)
            marks: list[float] = []
            run = fit_local(featurizer, vocab, world, m.train_days, cfg.model, cfg.loss, optim, steps=steps,
                            batch_size=batch, on_step=lambda i, _, marks=marks: marks.append(time.perf_counter()))
            timed = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
            recall = evaluate(run.model, catalogue, held_out["features"], held_out["targets"], K,
                              torch.device("cpu"))
            rows.append({"batch": batch, "lr_scaling": scaling, "lr": scaled, "warmup_steps": optim.warmup_steps,
                         "steps": steps, "examples": steps * batch, f"recall@{K}": recall,
                         "examples_per_s": batch / timed if len(marks) > 1 else None,
                         "final_loss": run.history[-1]["loss"], "seconds": run.seconds})
            print(f"  Recall@{K} {recall:.3f}, {rows[-1]['examples_per_s'] or 0:,.0f} examples/s", flush=True)
    command = (f"python benchmarks/bench_batch.py --preset {args.preset} --runs {' '.join(args.runs)} "
               f"--epochs {args.epochs:g} --warmup-frac {args.warmup_frac:g}"
               + (f" --threads {args.threads}" if args.threads else ""))
    result = {**record.meta(args.preset, command, load_start,
                            f", torch {torch.__version__} ({torch.get_num_threads()} threads)"),
              "train_examples": n_examples, "budget": budget, "eval_events": len(held_out["targets"]),
              "base_lr": cfg.optim.learning_rate, "reference_batch": cfg.optim.lr_reference_batch, "runs": rows}
    record.save(f"batch-{args.preset}", result, report(result))


def report(r: dict) -> str:
    lines = [
        *record.header("Larger batches at a fixed example budget", r),
        f"Every run trains a fresh model on {r['budget']:,} examples ({r['train_examples']:,} per pass) with "
        f"`fit_local`; Recall@{K} of {r['eval_events']:,} held-out test-day searches, exact search over the "
        f"catalogue. Base lr {r['base_lr']:g} at batch {r['reference_batch']} (Adam, cosine decay); `sqrt`: lr x "
        "sqrt(batch / reference), `linear`: lr x batch / reference, both with a linear warm-up. examples/s: this "
        "CPU, not a GPU.", "",
        f"| batch | lr scaling | lr | warm-up steps | steps | Recall@{K} | final loss | examples/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["runs"]:
        eps = f"{row['examples_per_s']:,.0f}" if row["examples_per_s"] else "-"
        lines.append(f"| {row['batch']} | {row['lr_scaling']} | {row['lr']:.2e} | {row['warmup_steps']} | "
                     f"{row['steps']} | {row[f'recall@{K}']:.3f} | {row['final_loss']:.3f} | {eps} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
