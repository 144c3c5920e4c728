"""The GPU paths of the Ray-free core, in one run on a GPU machine (which has no Ray: see shared/notes/RAY.md).

1. ``ddp``: the training step of ``train.loop`` under DistributedDataParallel with the **nccl** backend (one
   process per visible GPU; the shared positive pool goes through the autograd all-gather), fp32 and bf16
   autocast, examples/s per GPU at the paper's sizes (d 128, 8 heads, R/S/L 50/100/100, batch 256,
   pool 1024, 684 mixed hard negatives). Dense tables: NCCL has no sparse all-reduce (as the trainer does).
2. ``item_tower``: catalogue embedding (item tower inference), items/s at batch 8192, bf16 and fp32.
3. ``search``: the serving shard search core (``serve.engine.ShardSearcher``, backend ``torch``: exact
   matmul + top-k on the GPU) over N items in S shards at k = 1000, one query at a time as a request
   arrives: p50/p99 of searching every shard and merging (shards searched one after another in one
   process, so an upper bound of the Serve fan-out, where shard replicas run concurrently). The same
   shards searched by faiss-cpu (IndexFlatIP, all cores of the machine) in the same run are the baseline;
   results of both are checked equal. Vectors: SYNTHETIC (clustered Gaussian), d = 64.

    python benchmarks/gpu_check.py --out DIR [--items 1000000] [--shards 4]

Writes ``DIR/gpu-check.json`` and ``DIR/gpu-check.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_mgdspr.config import FeatureConfig, IndexConfig, LossConfig, ModelConfig, OptimConfig
from ray_mgdspr.model.batch import random_batch
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.model.mgdspr import build_model
from ray_mgdspr.model.optim import make_optimizer
from ray_mgdspr.runtime import free_port
from ray_mgdspr.train.loop import extra_negatives, train_step

PAPER = dict(d=128, heads=8, sparse_ids=False, item_buckets=1_000_000, shop_buckets=100_000,
             brand_buckets=50_000, category_buckets=20_000)
FEATURES = FeatureConfig(realtime_len=50, short_len=100, long_len=100)
VOCAB = 100_000
BATCH = 256


def _timed(fn: Callable[[], object], steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def _ddp_worker(rank: int, world: int, port: int, steps: int, result: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    torch.manual_seed(rank)
    model = build_model(ModelConfig(**PAPER), {"words": VOCAB, "chars": VOCAB, "bigrams": VOCAB}).to(device)
    ddp = DistributedDataParallel(model, device_ids=[rank])
    optimizer = make_optimizer(ddp.parameters(), OptimConfig(kind="adagrad"))  # the paper's step
    loss_cfg = LossConfig(gather_positives=True)
    batch = as_tensors(random_batch(BATCH, FEATURES, VOCAB, 1_000_000, seed=rank), device)
    m = extra_negatives(loss_cfg, BATCH * world)  # the pool: every rank's positives + m sampled items
    negatives = {"item_id": torch.randint(0, 1_000_000, (m,), device=device),
                 "item_title": torch.randint(1, VOCAB, (m, FEATURES.title_words_kept), device=device)}
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        def step(bf16: bool = bf16) -> dict:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                return train_step(ddp, optimizer, batch, negatives, loss_cfg, 3.0)

        median = statistics.median(_timed(step, steps))
        metrics = step()
        out[name] = {"examples_per_s": BATCH / median, "step_ms_median": 1000 * median, "loss": metrics["loss"],
                     "pool": metrics["pool"]}
    if rank == 0:
        result.update(out, world_size=world, backend=dist.get_backend(),
                      peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
    dist.destroy_process_group()


def check_ddp(steps: int) -> dict:
    world = torch.cuda.device_count()
    port = free_port()
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_ddp_worker, args=(world, port, steps, result), nprocs=world, join=True)
    return dict(result)


@torch.inference_mode()
def check_item_tower(n: int = 1_000_000, batch: int = 8192) -> dict:
    model = build_model(ModelConfig(**PAPER), {"words": VOCAB, "chars": VOCAB, "bigrams": VOCAB}).cuda().eval()
    items = as_tensors({k: v for k, v in random_batch(batch, FEATURES, VOCAB, 1_000_000).items()
                        if k.startswith("item_")}, "cuda")
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        def run(bf16: bool = bf16) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                model.embed_items(items)

        rate = batch / statistics.median(_timed(run, 20))
        out[name] = {"items_per_s": rate, "catalogue_s_at_1M": n / rate}
    return out


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1024, d)).astype(np.float32)
    x = centres[rng.integers(0, 1024, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _search_all(searchers: list, query: np.ndarray, k: int) -> object:
    """One request's shard fan-out (one after another here) and merge, as the ingress does it."""
    from ray_mgdspr.serve.engine import merge_hits

    return merge_hits([s.search(query, k, [()])[0] for s in searchers], k)


def check_search(items: int, shards: int, k: int, queries: int, root: Path) -> dict:
    import pyarrow as pa

    from ray_mgdspr.index.shards import build_index_version, split_by_shard
    from ray_mgdspr.serve.engine import ShardSearcher

    d = 64
    vectors, ids = clustered(items, d, 0), np.arange(items, dtype=np.int64) * 7 + 3
    meta = pa.table({"item_id": ids, "leaf_id": pa.array(np.zeros(items, np.int32)),
                     "cate1_id": pa.array(np.zeros(items, np.int32)), "brand_id": pa.array(np.zeros(items, np.int32)),
                     "attr_value_ids": pa.array([[]] * items, pa.list_(pa.int32())),
                     "title_words": pa.array([[]] * items, pa.list_(pa.string())),
                     "title": pa.array([""] * items)})
    t = time.perf_counter()
    version = f"gpu-{items}"
    build_index_version(root, version, split_by_shard(vectors, ids, meta, shards), IndexConfig(shards=shards),
                        version, "synthetic", d)
    build_s = time.perf_counter() - t
    q = clustered(queries, d, 1)
    out: dict = {"items": items, "shards": shards, "k": k, "queries": queries, "build_s": build_s}
    answers = {}
    for backend, threads in (("torch", 1), ("faiss-cpu", os.cpu_count() or 1)):
        searchers = [ShardSearcher(root / version, s, backend, faiss_threads=threads) for s in range(shards)]
        no_terms: list = [()]
        for i in range(5):
            _search_all(searchers, q[i:i + 1], k)
        lat, got = [], []
        for i in range(queries):
            t = time.perf_counter()
            got.append(_search_all(searchers, q[i:i + 1], k).item_ids)
            lat.append(time.perf_counter() - t)
        lat_ms = np.array(lat) * 1000
        batch = q[:256]
        batch_t = time.perf_counter()
        for s in searchers:
            s.search(batch, k, no_terms * len(batch))
        batched_qps = len(batch) / (time.perf_counter() - batch_t)
        out[backend] = {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
                        "qps_one_at_a_time": float(queries / lat_ms.sum() * 1000), "qps_batch_256": batched_qps,
                        "threads": threads}
        answers[backend] = got
        del searchers
        torch.cuda.empty_cache()
    same = np.mean([len(np.intersect1d(a, b)) / k
                    for a, b in zip(answers["torch"], answers["faiss-cpu"], strict=True)])
    out["torch_vs_faiss_overlap_at_k"] = float(same)
    out["p99_ratio_torch_over_faiss"] = out["torch"]["p99_ms"] / out["faiss-cpu"]["p99_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this script checks the GPU paths")
    report = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(0),
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cpus": os.cpu_count(), "python": platform.python_version(), "data": "SYNTHETIC"}
    t = time.perf_counter()
    report["ddp"] = check_ddp(args.steps)
    print("ddp", json.dumps(report["ddp"]), f"{time.perf_counter() - t:.0f}s", flush=True)
    report["item_tower"] = check_item_tower()
    print("item_tower", json.dumps(report["item_tower"]), flush=True)
    report["search"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.items:
            r = check_search(n, args.shards, args.k, args.queries, Path(tmp) / "index")
            print("search", json.dumps(r), flush=True)
            report["search"].append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU paths of the Ray-free core ({report['gpu']}, torch {report['torch']}, {report['when']})", "",
             "Data: SYNTHETIC (random batches at the paper's sizes; clustered Gaussian vectors).", "",
             "| check | fp32 | bf16 |", "|---|---|---|",
             f"| DDP step, nccl, world {report['ddp']['world_size']}: examples/s per GPU | "
             f"{report['ddp']['fp32']['examples_per_s']:.0f} | {report['ddp']['bf16']['examples_per_s']:.0f} |",
             f"| item tower inference: items/s | {report['item_tower']['fp32']['items_per_s']:.0f} | "
             f"{report['item_tower']['bf16']['items_per_s']:.0f} |", "",
             "| items | shards | k | torch-GPU p50 / p99 ms | faiss-cpu p50 / p99 ms | p99 ratio | overlap@k |",
             "|---|---|---|---|---|---|---|"]
    for r in report["search"]:
        lines.append(f"| {r['items']:,} | {r['shards']} | {r['k']} | {r['torch']['p50_ms']:.2f} / "
                     f"{r['torch']['p99_ms']:.2f} | {r['faiss-cpu']['p50_ms']:.2f} / {r['faiss-cpu']['p99_ms']:.2f} "
                     f"| {r['p99_ratio_torch_over_faiss']:.3f} | {r['torch_vs_faiss_overlap_at_k']:.4f} |")
    (args.out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
