"""What the query tower costs per request as each ``serve.query_tower`` kind runs it: module, TorchScript, ONNX Runtime.

Data: SYNTHETIC (a simulator world kept by ``bench_scale.py --work``, or any run's config). No Ray, no HTTP. The
configuration's version is opened once (``engine.QueryEncoder``, the module); its held-out test-day searches are
featurized as served (behaviour store, featurizer, tensors); then each kind is made from the same module
(``model/trace.py``, timed: what a replica pays at load) and the same batches of 1, 4 and 16 requests are run
through every kind, the kinds in a rotating order per batch (so none always runs first), with the configuration's
torch threads (ONNX Runtime gets as many). Each kind's H_qu must equal the module's within 1e-5.

    python benchmarks/query_tower.py --config /tmp/scale/work/large/config-IVF1024_Flat-s4-inline-latency.yaml

Results: ``benchmarks/results/query-tower.{md,json}`` (``--name``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import record
from bench_serve import held_out_requests  # the same held-out search bodies the endpoint benchmarks send
from deep_search import summary

KINDS = ("module", "torchscript", "onnx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="a project config whose serve section to open")
    ap.add_argument("--queries", type=int, default=480, help="held-out searches (cut to a multiple of 16)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the batches")
    ap.add_argument("--name", default="query-tower")
    ap.add_argument("--results", type=Path, default=record.RESULTS)
    args = ap.parse_args()

    import torch

    from ray_mgdspr.config import load_config
    from ray_mgdspr.index.versions import current_version
    from ray_mgdspr.serve.engine import QueryEncoder, verify_release
    from ray_mgdspr.serve.store import open_store

    project = load_config(args.config)
    cfg = project.serve.resolved(project)
    load_start = os.getloadavg()[0]
    release = verify_release(cfg.index_root, cfg.version or current_version(cfg.index_root))
    encoder = QueryEncoder(release.bundle_path, cfg.world, open_store(cfg.store, release.bundle.features),
                           threads=cfg.torch_threads, tower="module")
    bodies = held_out_requests(Path(cfg.world), 50, args.queries - args.queries % 16 or 16)
    requests = [(b["query"], b.get("user_id") or -1, b["ts"]) for b in bodies]  # (query, user, ts)
    make_s: dict[str, float] = {}
    towers: dict[str, Any] = {}
    for kind in KINDS:  # each made as the encoder makes it, the same module underneath
        t = time.perf_counter()
        made, towers[kind] = encoder._compiled(kind, cfg.torch_threads)
        make_s[kind] = time.perf_counter() - t
        if made != kind:
            raise SystemExit(f"the {kind} tower could not be made (see the log above)")

    ms: dict[str, dict[str, list[float]]] = {}
    worst: dict[str, float] = {kind: 0.0 for kind in KINDS[1:]}
    with torch.inference_mode():
        for size in (1, 4, 16):
            batches = [encoder._features(*map(list, zip(*requests[i:i + size], strict=True)))
                       for i in range(0, len(requests), size)]
            want = [towers["module"](b) for b in batches]  # and a warm-up of the module
            for kind in KINDS[1:]:
                worst[kind] = max([worst[kind]] + [float((towers[kind](b) - w).abs().max())
                                                   for b, w in zip(batches, want, strict=True)])
            per = ms[str(size)] = {kind: [] for kind in KINDS}
            for rnd in range(args.rounds):
                for j, b in enumerate(batches):
                    shift = (rnd * len(batches) + j) % len(KINDS)
                    for kind in KINDS[shift:] + KINDS[:shift]:
                        t = time.perf_counter()
                        towers[kind](b)
                        per[kind].append((time.perf_counter() - t) * 1000 / size)

    result = {
        "name": args.name, **record.meta(Path(cfg.world).parent.name,  # the world's run: large, demo, ...
                                         "python benchmarks/query_tower.py " + " ".join(sys.argv[1:]), load_start),
        "config": str(args.config), "version": release.version, "d": release.bundle.model.d,
        "torch_threads": cfg.torch_threads, "searches": len(requests), "rounds": args.rounds,
        "make_s": make_s, "max_abs_diff": worst,
        "ms_per_request": {size: {kind: summary(v) for kind, v in per.items()} for size, per in ms.items()},
    }
    record.save(args.name, result, report(result), args.results)


def report(r: dict[str, Any]) -> str:
    lines = record.header(f"The query tower per request, by serve.query_tower: {r['name']}", r)
    lines += [f"Version {r['version']} (d {r['d']}), {r['searches']} held-out searches featurized as served, "
              f"{r['rounds']} passes, torch / ONNX Runtime threads {r['torch_threads']}. Made at load: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in r["make_s"].items()) + ". Largest |H_qu - module's|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items()) + ".", "",
              "| batch | kind | p50 ms / request | p99 | mean |", "|---:|---|---:|---:|---:|"]
    for size, per in r["ms_per_request"].items():
        for kind, s in per.items():
            lines.append(f"| {size} | {kind} | {s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
