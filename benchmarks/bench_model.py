"""MGDSPR training and inference speed, parameters and peak memory, against the DNN baseline in the same run.

What it measures (data: SYNTHETIC, the `demo` world of the simulator, featurized for real):

1. ``mgdspr``: one full training step at the paper's sizes (d 128, 8 heads, R/S/L lengths 50/100/100,
   batch 256, shared pool 1024, N = 684 mixed hard negatives, Adagrad, clipping): examples/s.
2. Baseline, same run: the same step for the DNN two-tower baseline with the hinge loss. The ratio
   mgdspr / dnn says what the attention-heavy query tower costs.
3. ``mgdspr-query``: query tower forward only (serving), examples/s at batch 256.
4. ``featurize``: the featurizer (numpy), examples/s at batch 256: is data preparation a bottleneck?

Each measurement runs in a fresh subprocess so its peak memory (RSS, or CUDA allocator peak) is its own.
Warm-up steps first, then the mean ± std of timed steps.

    python benchmarks/bench_model.py                 # cpu, or cuda when available; ~3 min on 2 cores
    python benchmarks/bench_model.py --device cpu --steps 5

Results go to ``benchmarks/results/model-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BATCH = 256
VARIANTS = ("featurize", "mgdspr", "dnn", "mgdspr-query")


def _peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, world: str, device: str, steps: int, warmup: int) -> dict:
    """One variant in this process; returns timings, parameter count and peak memory."""
    import numpy as np
    import torch

    from ray_mgdspr.config import FeatureConfig, LossConfig, ModelConfig, OptimConfig, VocabConfig
    from ray_mgdspr.data.features import Featurizer
    from ray_mgdspr.data.vocab import KINDS, build_vocab_from_world
    from ray_mgdspr.data.world import read_manifest, read_table
    from ray_mgdspr.model.layers import as_tensors
    from ray_mgdspr.model.mgdspr import build_model
    from ray_mgdspr.model.optim import make_optimizer
    from ray_mgdspr.model.retrieval import CatalogueFeatures
    from ray_mgdspr.model.tables import resolve_buckets, world_max_ids
    from ray_mgdspr.train.loop import extra_negatives, train_step

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vocab = build_vocab_from_world(world, VocabConfig())
    featurizer = Featurizer(world, vocab, FeatureConfig())
    examples = featurizer.examples(read_manifest(world).train_days)
    rows = [examples.take(rng.integers(0, examples.num_rows, BATCH)) for _ in range(steps + warmup)]
    times = []
    if variant == "featurize":
        for i, r in enumerate(rows):
            t = time.perf_counter()
            featurizer(r)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return {"variant": variant, "times": times, "parameters": 0, "peak_mib": _peak_mib("cpu")}

    kind = "dnn" if variant == "dnn" else "mgdspr"
    model_cfg = resolve_buckets(ModelConfig(kind=kind, sparse_ids=device == "cpu"), world_max_ids(world))
    loss_cfg = LossConfig(kind="hinge" if kind == "dnn" else "softmax")
    model = build_model(model_cfg, {k: vocab.num_ids(k) for k in KINDS}).to(device)
    optimizer = make_optimizer(model.parameters(), OptimConfig(kind="adagrad"))  # the paper's step
    items = read_table(world, "items", columns=["item_id"])["item_id"]
    catalogue = CatalogueFeatures.from_featurizer(featurizer, items)
    batches = [as_tensors(featurizer(r), device) for r in rows]
    for i, b in enumerate(batches):
        negatives = as_tensors(catalogue.sample(extra_negatives(loss_cfg, BATCH), rng), device)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if variant == "mgdspr-query":
            with torch.inference_mode():
                model.eval().query_tower(b)
        else:
            train_step(model, optimizer, b, negatives, loss_cfg, 3.0)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    tower = model.query_tower if variant == "mgdspr-query" else model
    return {"variant": variant, "times": times, "parameters": sum(p.numel() for p in tower.parameters()),
            "peak_mib": _peak_mib(device)}


def child(variant: str, world: str, device: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--world", world, "--device", device,
           "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(r: dict) -> dict:
    mean, std = statistics.mean(r["times"]), statistics.stdev(r["times"]) if len(r["times"]) > 1 else 0.0
    return {**r, "step_s": round(mean, 4), "step_s_std": round(std, 4), "examples_per_s": round(BATCH / mean)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--world", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(measure(args.child, args.world, args.device, args.steps, args.warmup)))
        return

    from ray_mgdspr.config import load_preset
    from ray_mgdspr.data.simulator.simulate import simulate

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("simulate the demo world (synthetic) ...", flush=True)
        simulate(load_preset("demo").simulate, f"{tmp}/world")
        for v in VARIANTS:
            print(f"{v} on {args.device} ...", flush=True)
            results[v] = summarise(child(v, f"{tmp}/world", args.device, args.steps, args.warmup))
            r = results[v]
            print(f"  {r['examples_per_s']:,} examples/s ({r['step_s'] * 1000:.0f} ± {r['step_s_std'] * 1000:.0f} ms "
                  f"per batch of {BATCH}), {r['parameters']:,} parameters, peak {r['peak_mib']:.0f} MiB", flush=True)
    ratio = results["mgdspr"]["examples_per_s"] / results["dnn"]["examples_per_s"]
    result = {
        "data": "SYNTHETIC (simulated demo world, featurized)",
        "date": dt.date.today().isoformat(),
        "device": args.device,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "batch": BATCH,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "times"} for k, v in results.items()},
        "ratio_mgdspr_vs_dnn_train_speed": round(ratio, 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"model-{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Model benchmark on {args.device} ({result['date']}, {result['machine']})",
        "",
        f"Data: SYNTHETIC. Command: `python benchmarks/bench_model.py --device {args.device}`. Batch {BATCH}; "
        "paper sizes (d 128, 8 heads, sequences 50/100/100, pool 1024, N 684).",
        "",
        "| run | examples/s | ms per batch | parameters | peak MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, r in results.items():
        md.append(f"| {k} | {r['examples_per_s']:,} | {r['step_s'] * 1000:.0f} ± {r['step_s_std'] * 1000:.0f} "
                  f"| {r['parameters']:,} | {r['peak_mib']:.0f} |")
    md += ["", f"- MGDSPR training speed / DNN baseline: **{ratio:.3f}x**"]
    (RESULTS / f"model-{args.device}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
