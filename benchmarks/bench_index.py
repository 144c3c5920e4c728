"""Sharded Faiss index (build, memory, search speed, recall) and catalogue embedding, against baselines in the same run.

What it measures (data: SYNTHETIC):

1. ``factories``: N = 1M structured vectors (seeded: 1,000 Gaussian clusters of log-normal sizes and varying
   spread in d = 64, unit-normalised, inner product; 1,000 queries drawn from the same distribution),
   S = 2 shards built as the project builds them (``split_by_shard`` + ``build_index_version``), for
   ``Flat`` (the baseline: exact), ``IVF1024,Flat``, ``HNSW32`` and ``IVF1024,PQ16np``: build time, index
   bytes (the written ``.faiss`` files), peak RSS growth of the build and of the loaded ``IndexReader``,
   batch QPS (1,000 queries in one call, all cores, warm-up then mean ± std), single-query latency p50 / p99
   (1 faiss thread, as a Serve replica below 2 CPUs runs; also p50 with all cores, which on a busy 2-core
   machine is far slower: OpenMP waits for a descheduled thread), and recall@100 against the exact Flat
   top-100 of the same run. Flat itself is checked against a numpy
   matmul + top-k. ANN factories are swept over nprobe / efSearch (search-time settings, one build).
   Goal: recall@100 >= 0.95 at >= 10x the Flat QPS.
2. ``growth``: 100k, 300k and 1M items (prefixes of the same data) for ``Flat`` and ``IVF1024,Flat``:
   build time, index size, single-query p50; table plus ``index-growth.svg`` (hand-written SVG, no
   matplotlib needed). The largest size is the run of part 1.
3. ``embedding``: the bundle's item tower (seeded, untrained, paper sizes d = 128) over a simulated
   catalogue: ``embed_catalogue`` (Ray Data actor pool, ``ray.init(num_cpus=4)``) against the baseline, a
   plain in-process loop ``ItemEmbedder(bundle, context)(batch)`` that reads and writes the same Parquet, in
   items/s; the outputs are compared. The loop and the pools run in the same Ray session, in ABBA rounds after a
   warm-up of each (``--repeats`` - 1 rounds, at least 1). Goal (issue 17): actor pool >= 0.9x the loop.

4. ``--per-shard SIZES``: one shard of each size (e.g. 1M and 4M vectors) at d = 128 for ``Flat``, ``SQfp16``,
   ``IVF4096,Flat``, ``IVF4096,SQ8`` and ``IVF4096,PQ32np``: build time, bytes per vector, the loaded reader's
   RSS, single-query p50 / p99 on one faiss thread and recall@100 against exact: what sizing a 100M catalogue
   rests on (docs/operations.md). Alone; writes ``index-shard.{json,md}``.

Every index build and every search session runs in a fresh subprocess, so its peak memory is its own.

    python benchmarks/bench_index.py                  # 1M vectors, 200k items: ~5 min on 2 idle cores, ~11 busy
    python benchmarks/bench_index.py --quick          # ~2 min: 50k/100k vectors, 20k items
    python benchmarks/bench_index.py --sizes 100000,300000,1000000 --embed-items 1000000
    python benchmarks/bench_index.py --skip-index --embed-items 1000000   # part 3 alone, ~6 min
    python benchmarks/bench_index.py --per-shard 1000000,4000000         # part 4 alone

Results go to ``benchmarks/results/index-cpu.{json,md}`` and ``benchmarks/results/index-growth.svg``
(``--quick`` writes ``index-cpu-quick.*``, ``--skip-index`` ``index-embed-<items>.*`` instead).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

RESULTS = Path(__file__).parent / "results"
# part 4 (--per-shard) runs one shard at the paper's d with fewer queries; its children read the same from here
DIM = int(os.environ.get("BENCH_INDEX_DIM", 64))
SHARDS = int(os.environ.get("BENCH_INDEX_SHARDS", 2))
N_QUERIES = int(os.environ.get("BENCH_INDEX_QUERIES", 1000))
CLUSTERS, K = 1000, 100
FLAT = "Flat"
# factory -> search settings swept (the first is the IndexConfig default: nprobe 16, efSearch 128)
FACTORIES: dict[str, list[dict]] = {
    FLAT: [{}],
    "IVF1024,Flat": [{"nprobe": 16}, {"nprobe": 8}, {"nprobe": 32}, {"nprobe": 64}],
    "HNSW32": [{"ef_search": 128}, {"ef_search": 256}, {"ef_search": 512}],
    "IVF1024,PQ16np": [{"nprobe": 16}, {"nprobe": 64}],
}
GROWTH_FACTORIES = (FLAT, "IVF1024,Flat")
# part 4: one shard of 1M-10M vectors at d 128, the factories a 100M catalogue would choose between
SHARD_DIM, SHARD_QUERIES = 128, 200
SHARD_FACTORIES: dict[str, list[dict]] = {
    FLAT: [{}],
    "SQfp16": [{}],
    "IVF4096,Flat": [{"nprobe": 16}, {"nprobe": 64}],
    "IVF4096,SQ8": [{"nprobe": 16}, {"nprobe": 64}],
    "IVF4096,PQ32np": [{"nprobe": 16}, {"nprobe": 64}],
}
GOAL_RECALL, GOAL_SPEEDUP, GOAL_EMBED = 0.95, 10.0, 0.9
SINGLE_THREADS = 1  # faiss threads for single queries; batches use every core


# --------------------------------------------------------------------------------------------------
# data


def make_data(n: int, n_queries: int, seed: int = 0) -> tuple:
    """Seeded clustered vectors: (vectors (n, d), cluster of each (n,), queries (q, d)), float32, unit norm.

    Cluster sizes are log-normal (a few big, many small), each cluster has its own spread; rows are iid,
    so any prefix is a sample of the same distribution. Queries come from the same mixture.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, CLUSTERS)
    weights /= weights.sum()
    spread = rng.uniform(0.5, 1.0, CLUSTERS)

    def draw(m: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out, cl = np.empty((m, DIM), np.float32), r.choice(CLUSTERS, size=m, p=weights)
        for lo in range(0, m, 200_000):
            c = cl[lo:lo + 200_000]
            x = centres[c] + spread[c, None] * r.standard_normal((len(c), DIM)) / np.sqrt(DIM)
            out[lo:lo + 200_000] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out, cl

    vectors, clusters = draw(n, rng)
    queries, _ = draw(n_queries, np.random.default_rng(seed + 1))
    return vectors, clusters.astype(np.int32), queries


def metadata_table(item_ids, clusters):
    """The per-item columns a shard stores (``METADATA_SCHEMA``; shop and price left out, as they may be): leaf =
    cluster, empty titles."""
    import numpy as np
    import pyarrow as pa

    n = len(item_ids)
    empty_offsets = pa.array(np.zeros(n + 1, np.int32))
    return pa.table({
        "item_id": pa.array(item_ids, pa.int64()),
        "leaf_id": pa.array(clusters, pa.int32()),
        "cate1_id": pa.array(clusters // 50, pa.int32()),
        "brand_id": pa.array((item_ids % 997).astype(np.int32), pa.int32()),
        "attr_value_ids": pa.ListArray.from_arrays(empty_offsets, pa.array([], pa.int32())),
        "title_words": pa.ListArray.from_arrays(empty_offsets, pa.array([], pa.string())),
        "title": pa.repeat(pa.scalar("", pa.string()), n),
    })


# --------------------------------------------------------------------------------------------------
# memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def _peak_mib() -> float:
    return (_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# --------------------------------------------------------------------------------------------------
# children: one build, one search session


def child_build(data: str, n: int, factory: str, root: str) -> dict:
    """Build an S-shard version of the first n vectors into ``root`` the way the project does."""
    import faiss
    import numpy as np

    from ray_mgdspr.config import IndexConfig
    from ray_mgdspr.index.shards import build_index_version, split_by_shard

    vectors = np.load(f"{data}/vectors.npy")[:n].copy()
    clusters = np.load(f"{data}/clusters.npy")[:n]
    ids = np.arange(n, dtype=np.int64)
    meta = metadata_table(ids, clusters)
    exact_peak = _reset_peak()
    rss0 = _rss_mib()
    t = time.perf_counter()
    shards = split_by_shard(vectors, ids, meta, SHARDS)
    manifest = build_index_version(root, "v-bench", shards, IndexConfig(factory=factory, shards=SHARDS),
                                   "v-bench", "0" * 64, DIM)
    seconds = time.perf_counter() - t
    path = Path(root) / "v-bench"
    return {
        "factory": factory, "n": n, "build_s": round(seconds, 3), "faiss_and_write_s": manifest.build_seconds,
        "index_bytes": sum(p.stat().st_size for p in path.glob("*.faiss")),
        "metadata_bytes": sum(p.stat().st_size for p in path.glob("*.parquet")),
        "vectors_bytes": int(vectors.nbytes),
        "build_peak_rss_growth_mib": round(_peak_mib() - rss0, 1), "peak_is_exact": exact_peak,
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def recall_at_k(found, truth) -> float:
    """Mean over queries of |found ∩ truth| / k (rows of item ids; -1 pads never match)."""
    return float(sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
                 / truth.size)


def _single_latencies(reader, queries, singles: int) -> list[float]:
    """Seconds per ``reader.search`` of one query, ``singles`` queries after 5 warm-up ones."""
    lat = []
    for i in range(singles + 5):
        q = queries[i % len(queries):i % len(queries) + 1]
        t = time.perf_counter()
        reader.search(q, K)
        if i >= 5:
            lat.append(time.perf_counter() - t)
    return lat


def child_search(data: str, n: int, factory: str, root: str, settings: list[dict], gt: str, singles: int,
                 repeats: int) -> dict:
    """Load the version with ``IndexReader`` per setting; time batch and single queries; recall vs ``gt``."""
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    from ray_mgdspr.index.search import IndexReader

    queries = np.load(f"{data}/queries.npy")
    path = Path(root) / "v-bench"
    all_threads = faiss.omp_get_max_threads()
    # touch the Parquet / hashing code once, so the reader's RSS growth is the index's, not library pages
    pq.read_table(path / "shard-00000.parquet", columns=["item_id"])
    hashlib.sha256((path / "shard-00000.parquet").read_bytes()).hexdigest()
    out = []
    for setting in settings:
        exact_peak = _reset_peak()
        rss0 = _rss_mib()
        t = time.perf_counter()
        reader = IndexReader(path, "faiss-cpu", **setting)
        load_s = time.perf_counter() - t
        reader_rss = _peak_mib() - rss0
        reader.search(queries[:10], K)  # warm-up
        times, ids = [], None
        for i in range(repeats + 1):  # first pass: warm-up
            t = time.perf_counter()
            _, ids = reader.search(queries, K)
            if i:
                times.append(time.perf_counter() - t)
        faiss.omp_set_num_threads(SINGLE_THREADS)  # as a serving replica with < 2 CPUs runs it
        lat = _single_latencies(reader, queries, singles)
        # the same with every core (what IndexReader does when nobody sets threads): first setting only
        faiss.omp_set_num_threads(all_threads)
        lat_all = _single_latencies(reader, queries, min(singles, 50)) if not out else []
        r = {"setting": setting, "load_s": round(load_s, 3), "reader_rss_growth_mib": round(reader_rss, 1),
             "peak_is_exact": exact_peak, "batch_s": round(statistics.mean(times), 4),
             "batch_s_std": round(statistics.stdev(times), 4) if len(times) > 1 else 0.0,
             "batch_qps": round(len(queries) / statistics.mean(times), 1),
             "single_p50_ms": round(_percentile(lat, 50) * 1e3, 3),
             "single_p99_ms": round(_percentile(lat, 99) * 1e3, 3),
             "single_mean_ms": round(statistics.mean(lat) * 1e3, 3), "singles": len(lat),
             "faiss_threads": all_threads, "single_threads": SINGLE_THREADS}
        if lat_all:
            r.update({"single_all_threads_p50_ms": round(_percentile(lat_all, 50) * 1e3, 3),
                      "single_all_threads_p99_ms": round(_percentile(lat_all, 99) * 1e3, 3),
                      "single_all_threads_n": len(lat_all)})
        if gt:
            r["recall_at_100"] = round(recall_at_k(ids, np.load(gt)), 4)
        else:  # the exact baseline: keep its result as ground truth, and check it against numpy
            np.save(f"{root}/gt.npy", ids)
            vectors = np.load(f"{data}/vectors.npy", mmap_mode="r")[:n]
            check = queries[:20]
            scores = np.concatenate([check @ vectors[lo:lo + 200_000].T for lo in range(0, n, 200_000)], axis=1)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
            r["recall_at_100"] = 1.0
            r["flat_vs_numpy_recall_20q"] = round(recall_at_k(ids[:20], top), 4)
        out.append(r)
        del reader
    return {"factory": factory, "n": n, "settings": out}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def index_run(data: str, tmp: str, n: int, factory: str, settings: list[dict], singles: int, repeats: int) -> dict:
    root = f"{tmp}/index-{n}-{factory.replace(',', '_')}"
    gt = "" if factory == FLAT else f"{tmp}/index-{n}-{FLAT}/gt.npy"
    print(f"  {factory} at {n:,}: build ...", flush=True)
    build = run_child("build", data, str(n), factory, root)
    print(f"    {build['build_s']:.1f} s, {build['index_bytes'] / 2**20:.0f} MiB, "
          f"peak RSS +{build['build_peak_rss_growth_mib']:.0f} MiB; search ...", flush=True)
    search = run_child("search", data, str(n), factory, root, json.dumps(settings), gt, str(singles), str(repeats))
    for s in search["settings"]:
        print(f"    {s['setting'] or 'exact'}: {s['batch_qps']:,.0f} QPS batch, single p50 {s['single_p50_ms']:.2f} ms "
              f"p99 {s['single_p99_ms']:.2f} ms, recall@100 {s['recall_at_100']:.3f}", flush=True)
    if factory != FLAT:  # keep the Flat index dir: its gt.npy serves the other factories of this size
        subprocess.run(["rm", "-rf", root], check=True)
    return {**build, "search": search["settings"]}


# --------------------------------------------------------------------------------------------------
# embedding


def embedding_bench(tmp: str, n_items: int, repeats: int) -> dict:
    """Ray actor-pool embedding vs an in-process loop over the same item tower, items/s."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ray_mgdspr.config import EmbedConfig, FeatureConfig, LossConfig, ModelConfig, VocabConfig, load_preset
    from ray_mgdspr.data.features import ITEM_COLUMNS, ItemContext
    from ray_mgdspr.data.simulator.simulate import simulate
    from ray_mgdspr.data.vocab import KINDS, build_vocab_from_world
    from ray_mgdspr.index.embed import ItemEmbedder, embed_catalogue, read_embeddings
    from ray_mgdspr.model.bundle import save_bundle
    from ray_mgdspr.model.mgdspr import build_model
    from ray_mgdspr.model.tables import resolve_buckets, world_max_ids

    world, bundle = f"{tmp}/world", f"{tmp}/bundle"
    # the medium preset's catalogue settings at n_items; few users and days: only the items table is embedded
    cfg = load_preset("medium").simulate.model_copy(
        update={"n_items": n_items, "n_users": 500, "warmup_days": 1, "train_days": 1})
    print(f"simulate a {n_items:,}-item catalogue (medium preset, 500 users) ...", flush=True)
    t = time.perf_counter()
    simulate(cfg, world)
    simulate_s = time.perf_counter() - t
    t = time.perf_counter()
    vocab = build_vocab_from_world(world, VocabConfig())
    vocab_s = time.perf_counter() - t
    torch.manual_seed(0)
    model_cfg = resolve_buckets(ModelConfig(), world_max_ids(world))
    model = build_model(model_cfg, {k: vocab.num_ids(k) for k in KINDS})
    save_bundle(bundle, model, vocab, FeatureConfig(), LossConfig(), version="v-bench")
    del model
    print(f"  simulate {simulate_s:.0f} s, vocabulary {vocab_s:.0f} s; bundle d={model_cfg.d}", flush=True)
    batch = EmbedConfig().batch_size

    row_groups = pq.ParquetFile(f"{world}/items.parquet").metadata.num_row_groups
    load_start = os.getloadavg()[0]

    def loop(limit: int | None = None) -> tuple[float, float, np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        items = pq.read_table(f"{world}/items.parquet", columns=ITEM_COLUMNS)
        items = items.slice(0, limit) if limit else items
        embedder = ItemEmbedder(bundle, ItemContext.of_world(world))
        t1 = time.perf_counter()
        parts = [embedder(items.slice(lo, batch)) for lo in range(0, items.num_rows, batch)]
        t2 = time.perf_counter()
        ids = np.concatenate([p["item_id"] for p in parts])
        vec = np.concatenate([p["embedding"] for p in parts])
        pq.write_table(pa.table({"item_id": ids, "embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(vec)}),
                       f"{tmp}/loop.parquet")
        return time.perf_counter() - t0, t2 - t1, ids, vec

    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    @ray.remote(num_cpus=0.5)
    def torch_threads() -> int:
        return torch.get_num_threads()

    default_pool = EmbedConfig().model_dump(include={"actors", "cpus_per_actor"})
    pools = [{"actors": 1, "cpus_per_actor": 0.5}, {"actors": 2, "cpus_per_actor": 1.0},
             {"actors": 1, "cpus_per_actor": 2.0}]
    pools += [] if default_pool in pools else [default_pool]
    loops: list[tuple[float, float, np.ndarray, np.ndarray]] = []
    secs: list[list[float]] = [[] for _ in pools]
    try:
        worker_threads = ray.get(torch_threads.remote())
        print(f"warm-up: the loop (one batch, torch threads {torch.get_num_threads()}) and one actor-pool run "
              f"{pools[1]} ...", flush=True)
        loop(batch)
        embed_catalogue(world, bundle, EmbedConfig(out=f"{tmp}/emb", **pools[1]), overwrite=True)
        # each round: the loop, then every pool, in the reverse order every other round (ABBA), so the machine's
        # drift falls on the loop and the pools alike
        for r in range(repeats):
            order = [None, *range(len(pools))]
            for which in (order if r % 2 == 0 else order[::-1]):
                if which is None:
                    loops.append(loop())
                    print(f"  round {r + 1}: loop {loops[-1][0]:.1f} s", flush=True)
                else:
                    ecfg = EmbedConfig(out=f"{tmp}/emb-{which}", **pools[which])
                    secs[which].append(embed_catalogue(world, bundle, ecfg, overwrite=True).seconds)
                    print(f"  round {r + 1}: actor pool {pools[which]} {secs[which][-1]:.1f} s", flush=True)
        ref_ids, ref_vec = loops[-1][2], loops[-1][3]
        order = np.argsort(ref_ids)
        loop_total = [x[0] for x in loops]
        loop_only = [x[1] for x in loops]
        print(f"  loop: {n_items / statistics.mean(loop_total):,.0f} items/s end to end "
              f"({n_items / statistics.mean(loop_only):,.0f} items/s in the tower loop)", flush=True)
        runs = []
        for i, (pool, pool_secs) in enumerate(zip(pools, secs, strict=True)):
            ids, vec = read_embeddings(f"{tmp}/emb-{i}/v-bench")  # its last round's vectors
            o = np.argsort(ids)
            agree = bool(np.array_equal(ids[o], ref_ids[order]))
            max_diff = float(np.abs(vec[o] - ref_vec[order]).max()) if agree else float("nan")
            r = {**pool, "seconds": round(statistics.mean(pool_secs), 2),
                 "seconds_std": round(statistics.stdev(pool_secs), 2) if len(pool_secs) > 1 else 0.0,
                 "items_per_s": round(n_items / statistics.mean(pool_secs)), "ids_agree": agree,
                 "max_abs_diff_vs_loop": max_diff,
                 "ratio_per_round": [round(lt / ps, 3) for lt, ps in zip(loop_total, pool_secs, strict=True)]}
            r["ratio_vs_loop"] = round(r["items_per_s"] / (n_items / statistics.mean(loop_total)), 3)
            runs.append(r)
            print(f"  {pool}: {r['items_per_s']:,} items/s ({r['seconds']:.1f} ± {r['seconds_std']:.1f} s), "
                  f"{r['ratio_vs_loop']:.2f}x the loop (per round {r['ratio_per_round']}); max |diff| "
                  f"{max_diff:.1e}", flush=True)
    finally:
        ray.shutdown()
    return {
        "n_items": n_items, "simulate_s": round(simulate_s, 1), "vocab_s": round(vocab_s, 1), "d": model_cfg.d,
        "batch_size": batch, "loop_threads": torch.get_num_threads(), "ray_worker_threads_at_half_a_cpu":
            worker_threads, "default_pool": default_pool,
        "loop": {"seconds": round(statistics.mean(loop_total), 2),
                 "seconds_std": round(statistics.stdev(loop_total), 2) if len(loop_total) > 1 else 0.0,
                 "items_per_s": round(n_items / statistics.mean(loop_total)),
                 "tower_only_items_per_s": round(n_items / statistics.mean(loop_only))},
        "actor_pool": runs, "rounds": repeats, "items_row_groups": row_groups, "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------------------------------
# report


def growth_svg(growth: dict[str, list[dict]]) -> str:
    """Three small log-log panels (build s, index MiB, single-query p50 ms vs N), one line per factory."""
    import math

    panels = [("build time (s)", "build_s", 1), ("index size (MiB)", "index_mib", 1),
              ("single-query p50 (ms)", "single_p50_ms", 1)]
    colours = {FLAT: "#1f77b4", "IVF1024,Flat": "#d62728"}
    w, h, pad = 300, 220, 48
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * w}" height="{h + 40}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{3 * w}" height="{h + 40}" fill="white"/>']
    ns = sorted({r["n"] for rows in growth.values() for r in rows})
    for p, (title, key, _) in enumerate(panels):
        x0 = p * w
        values = [r[key] for rows in growth.values() for r in rows if r[key] > 0]
        lo, hi = math.log10(min(values)) - 0.1, math.log10(max(values)) + 0.1
        nlo, nhi = math.log10(ns[0]) - 0.05, math.log10(ns[-1]) + 0.05

        def xy(n: float, v: float, x0: float = x0, lo: float = lo, hi: float = hi, nlo: float = nlo,
               nhi: float = nhi) -> tuple[float, float]:
            return (x0 + pad + (math.log10(n) - nlo) / (nhi - nlo) * (w - pad - 12),
                    20 + (1 - (math.log10(v) - lo) / (hi - lo)) * (h - 40))

        parts.append(f'<text x="{x0 + w / 2}" y="14" text-anchor="middle" font-weight="bold">{title}</text>')
        parts.append(f'<line x1="{x0 + pad}" y1="{h - 20}" x2="{x0 + w - 12}" y2="{h - 20}" stroke="black"/>')
        parts.append(f'<line x1="{x0 + pad}" y1="20" x2="{x0 + pad}" y2="{h - 20}" stroke="black"/>')
        for n in ns:
            x, _ = xy(n, 10 ** lo)
            parts.append(f'<text x="{x:.1f}" y="{h - 6}" text-anchor="middle">{n / 1000:g}k</text>')
        for e in range(math.floor(lo), math.ceil(hi) + 1):
            for m in (1, 3):
                v = m * 10.0 ** e
                if lo <= math.log10(v) <= hi:
                    _, y = xy(ns[0], v)
                    parts.append(f'<text x="{x0 + pad - 4}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
                    parts.append(f'<line x1="{x0 + pad}" y1="{y:.1f}" x2="{x0 + w - 12}" y2="{y:.1f}" '
                                 'stroke="#ddd"/>')
        for factory, rows in growth.items():
            pts = [xy(r["n"], r[key]) for r in rows if r[key] > 0]
            parts.append(f'<polyline fill="none" stroke="{colours.get(factory, "black")}" stroke-width="2" '
                         f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colours.get(factory, "black")}"/>'
                      for x, y in pts]
    for i, factory in enumerate(growth):
        parts.append(f'<text x="{pad + i * 160}" y="{h + 30}" fill="{colours.get(factory, "black")}">'
                     f'&#9632; {factory} (S={SHARDS}, log-log, N items)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def ascii_chart(growth: dict[str, list[dict]], key: str, unit: str) -> list[str]:
    top = max(r[key] for rows in growth.values() for r in rows) or 1
    lines = []
    for factory, rows in growth.items():
        for r in rows:
            bar = "#" * max(1, round(40 * r[key] / top))
            lines.append(f"{factory:>13} {r['n'] / 1000:>6g}k |{bar} {r[key]:g} {unit}")
    return lines


def report(result: dict, command: str) -> str:
    md = [f"# Index and embedding benchmark on cpu ({result['date']}, {result['machine']})", "",
          f"Data: SYNTHETIC. Command: `{command}`."]
    if result["factories"]:
        md += report_index(result)
    if result["embedding"]:
        md += report_embedding(result["embedding"])
    if result.get("per_shard"):
        md += report_per_shard(result)
    return "\n".join(md) + "\n"


def report_index(result: dict) -> list[str]:
    f = result["factories"]
    flat = f[FLAT]["search"][0]
    n = result["n"]
    md = [
        f"Vectors: N = {n:,}, d = {DIM}, {CLUSTERS:,} seeded Gaussian clusters (log-normal sizes, varying spread), "
        f"unit-normalised, inner product; {N_QUERIES:,} queries from the same mixture; top-{K}; S = {SHARDS} shards "
        "(`split_by_shard` + `build_index_version`, searched with `IndexReader`, backend faiss-cpu). "
        f"Batch = all {N_QUERIES:,} queries in one call with {flat['faiss_threads']} faiss threads "
        f"(1 warm-up + {result['repeats']} timed passes, mean ± std); single = {flat['singles']} queries one at a time "
        f"(5 warm-up) with {flat['single_threads']} faiss thread, as a serving replica below 2 CPUs gets; "
        f"\"all thr.\" = the same with {flat['faiss_threads']} threads ({flat.get('single_all_threads_n', 0)} "
        "queries), what `IndexReader` does when nobody sets the thread count. "
        "Recall@100 against the exact Flat top-100 of this run. Index MiB = the written `.faiss` files; build peak "
        "RSS = peak growth over the data already in memory (split + build + write); reader RSS = peak growth while "
        "`IndexReader` verifies and loads the version (index, item-id maps, metadata).",
        "",
        f"## 1. Factories at N = {n:,} (config-default search settings: nprobe 16, efSearch 128)",
        "",
        "| factory | build s | index MiB | build peak RSS +MiB | reader RSS +MiB | batch QPS | vs Flat | "
        "single p50 ms | single p99 ms | single vs Flat | single p50 ms all thr. | recall@100 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for factory, r in f.items():
        s = r["search"][0]
        md.append(f"| {factory} | {r['build_s']:.1f} | {r['index_bytes'] / 2**20:.0f} | "
                  f"{r['build_peak_rss_growth_mib']:.0f} | {s['reader_rss_growth_mib']:.0f} | "
                  f"{s['batch_qps']:,.0f} ± {s['batch_qps'] * s['batch_s_std'] / s['batch_s']:,.0f} | "
                  f"{s['batch_qps'] / flat['batch_qps']:.1f}x | {s['single_p50_ms']:.2f} | {s['single_p99_ms']:.2f} | "
                  f"{flat['single_mean_ms'] / s['single_mean_ms']:.1f}x | "
                  f"{s.get('single_all_threads_p50_ms', float('nan')):.2f} | {s['recall_at_100']:.3f} |")
    md += ["", "Batch QPS ± is the std over timed passes; \"single vs Flat\" compares mean single-query latency.",
           "", "Sweep of search settings (same builds):", "",
           "| factory | setting | batch QPS | vs Flat | single p50 ms | single mean vs Flat | recall@100 | goal met |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    met: dict[str, list[str]] = {"batch": [], "single": []}
    for factory, r in f.items():
        if factory == FLAT:
            continue
        for s in r["search"]:
            speed = s["batch_qps"] / flat["batch_qps"]
            single_speed = flat["single_mean_ms"] / s["single_mean_ms"]
            ok = s["recall_at_100"] >= GOAL_RECALL and speed >= GOAL_SPEEDUP
            ok_single = s["recall_at_100"] >= GOAL_RECALL and single_speed >= GOAL_SPEEDUP
            setting = ", ".join(f"{k} {v}" for k, v in s["setting"].items())
            if ok:
                met["batch"].append(f"{factory} {setting} ({speed:.1f}x, recall {s['recall_at_100']:.3f})")
            if ok_single:
                met["single"].append(f"{factory} {setting} ({single_speed:.1f}x, recall {s['recall_at_100']:.3f})")
            md.append(f"| {factory} | {setting} | {s['batch_qps']:,.0f} | {speed:.1f}x | {s['single_p50_ms']:.2f} | "
                      f"{single_speed:.1f}x | {s['recall_at_100']:.3f} | "
                      f"{'batch' if ok else ''}{' + ' if ok and ok_single else ''}{'single' if ok_single else ''}"
                      f"{'no' if not (ok or ok_single) else ''} |")
    md += ["", f"- Flat check: merged 2-shard Flat top-100 vs numpy matmul + top-k on 20 queries: recall "
               f"{flat['flat_vs_numpy_recall_20q']:.4f}; Flat batch {flat['batch_qps']:,.0f} QPS "
               f"({flat['batch_s']:.2f} ± {flat['batch_s_std']:.2f} s per {N_QUERIES:,} queries), single p50 "
               f"{flat['single_p50_ms']:.1f} ms."]
    for mode, label in (("batch", "batch QPS"), ("single", "single-query QPS (1 / mean latency)")):
        md.append(f"- Goal, recall@100 >= {GOAL_RECALL} at >= {GOAL_SPEEDUP:g}x the Flat {label}: "
                  + (f"**met** by {'; '.join(met[mode])}." if met[mode] else "**not met** by any setting measured."))
    md.append(f"- Machine load average (1 min) at start / end of the index part: {result['load_start']:.1f} / "
              f"{result['load_index_end']:.1f} (on 2 cores; other work on the machine shows up as noise).")
    g = result["growth"]
    md += ["", f"## 2. Growth (S = {SHARDS}; the {n:,} row is the run of part 1)", "",
           "| factory | N | build s | index MiB | single p50 ms | recall@100 |", "|---|---:|---:|---:|---:|---:|"]
    for factory, rows in g.items():
        for r in rows:
            md.append(f"| {factory} | {r['n']:,} | {r['build_s']:.1f} | {r['index_mib']:.0f} | "
                      f"{r['single_p50_ms']:.2f} | {r['recall_at_100']:.3f} |")
    md += ["", "Plot: `index-growth.svg`. Single-query p50 (ms):", "", "```",
           *ascii_chart(g, "single_p50_ms", "ms"), "```"]
    return md


def report_embedding(e: dict) -> list[str]:
    md = ["", f"## 3. Catalogue embedding, {e['n_items']:,} simulated items (item tower d = {e['d']}, untrained, "
               f"batch {e['batch_size']})", "",
           "| run | items/s | seconds | vs loop | vs loop, per round | max abs diff vs loop |",
           "|---|---:|---:|---:|---|---:|",
           f"| baseline: in-process loop ({e['loop_threads']} torch threads), read + embed + write | "
           f"{e['loop']['items_per_s']:,} | {e['loop']['seconds']:.1f} ± {e['loop']['seconds_std']:.1f} "
           "| 1.00x | | |"]
    for r in e["actor_pool"]:
        rounds = ", ".join(f"{x:.2f}" for x in r.get("ratio_per_round", []))
        md.append(f"| `embed_catalogue` actors {r['actors']} x {r['cpus_per_actor']:g} CPU | "
                  f"{r['items_per_s']:,} | {r['seconds']:.1f} ± {r['seconds_std']:.1f} | "
                  f"{r['ratio_vs_loop']:.2f}x | {rounds} | {r['max_abs_diff_vs_loop']:.1e} |")
    default = next(r for r in e["actor_pool"] if {"actors": r["actors"], "cpus_per_actor": r["cpus_per_actor"]}
                   == e.get("default_pool", {"actors": 1, "cpus_per_actor": 0.5}))  # the default before 2026-12-06
    best = max(e["actor_pool"], key=lambda r: r["ratio_vs_loop"])
    md += ["", f"- Tower loop alone (no read / write): {e['loop']['tower_only_items_per_s']:,} items/s. "
               "A Ray worker of 0.5 CPU runs torch with "
               f"{e.get('ray_worker_threads_at_half_a_cpu', e.get('ray_worker_threads_at_default_cpus'))} thread(s).",
           f"- Goal (actor pool >= {GOAL_EMBED}x the loop): default config ({default['actors']} x "
           f"{default['cpus_per_actor']:g} CPU) {default['ratio_vs_loop']:.2f}x "
           f"(**{'met' if default['ratio_vs_loop'] >= GOAL_EMBED else 'not met'}**); best "
           f"{best['actors']} x {best['cpus_per_actor']:g} CPU {best['ratio_vs_loop']:.2f}x "
           f"(**{'met' if best['ratio_vs_loop'] >= GOAL_EMBED else 'not met'}**).",
           f"- Timing: {e.get('rounds', 1)} round(s) in one Ray session after a warm-up of each; every round runs the "
           "loop and each pool once, in reverse order every other round (ABBA), so drift in the machine's load falls "
           "on both; means ± std over rounds.",
           f"- Catalogue preparation (not timed above): simulate {e['simulate_s']:.0f} s, "
           f"vocabulary {e['vocab_s']:.0f} s. `items.parquet`: 1 file, {e['items_row_groups']} row group(s). "
           f"Load average (1 min) at start / end of this part: {e['load_start']:.1f} / {e['load_end']:.1f}."]
    return md


# --------------------------------------------------------------------------------------------------


def write_data(tmp: str, n: int) -> str:
    """``make_data(n)`` saved where the children read it (``<tmp>/data``); returns that directory."""
    import numpy as np

    data = f"{tmp}/data"
    os.makedirs(data)
    print(f"data: {n:,} x {DIM} clustered vectors + {N_QUERIES:,} queries (synthetic, seeded) ...", flush=True)
    vectors, clusters, queries = make_data(n, N_QUERIES)
    for name, array in (("vectors", vectors), ("clusters", clusters), ("queries", queries)):
        np.save(f"{data}/{name}.npy", array)
    return data


def index_parts(tmp: str, sizes: list[int], singles: int, repeats: int) -> tuple[dict, dict[str, list[dict]]]:
    """Parts 1 and 2: every factory at the largest size, then the growth curve."""
    n = sizes[-1]
    data = write_data(tmp, n)
    print(f"1. factories at N = {n:,}", flush=True)
    factories = {f: index_run(data, tmp, n, f, s, singles, repeats) for f, s in FACTORIES.items()}
    print(f"2. growth over {sizes}", flush=True)
    growth: dict[str, list[dict]] = {f: [] for f in GROWTH_FACTORIES}
    for size in sizes:
        for factory in GROWTH_FACTORIES:
            r = factories[factory] if size == n else index_run(data, tmp, size, factory,
                                                               FACTORIES[factory][:1], singles, repeats)
            s = r["search"][0]
            growth[factory].append({"n": size, "build_s": r["build_s"],
                                    "index_mib": round(r["index_bytes"] / 2**20, 1),
                                    "single_p50_ms": s["single_p50_ms"], "batch_qps": s["batch_qps"],
                                    "recall_at_100": s["recall_at_100"]})
    return factories, growth


def per_shard_part(tmp: str, sizes: list[int], singles: int, repeats: int) -> dict[str, list[dict]]:
    """Part 4: one shard of each size (prefixes of the same data) for each of ``SHARD_FACTORIES``."""
    n = sizes[-1]
    data = write_data(tmp, n)
    out: dict[str, list[dict]] = {f: [] for f in SHARD_FACTORIES}
    for size in sizes:
        print(f"4. one shard of {size:,} vectors", flush=True)
        for factory, settings in SHARD_FACTORIES.items():  # Flat first: its result is the others' ground truth
            out[factory].append(index_run(data, tmp, size, factory, settings, singles, repeats))
        subprocess.run(["rm", "-rf", f"{tmp}/index-{size}-{FLAT}"], check=True)
    return out


def report_per_shard(result: dict) -> list[str]:
    md = ["", f"## 4. One shard at d = {DIM} (sizing a 100M catalogue: docs/operations.md)", "",
          f"Vectors: {CLUSTERS:,} seeded Gaussian clusters as in part 1, d = {DIM}, {N_QUERIES} queries, top-{K}, "
          f"S = {SHARDS} (one shard, built by `build_index_version` like every version). Single queries on "
          f"{SINGLE_THREADS} faiss thread, as a shard replica runs them; recall@{K} against the exact Flat top-{K} "
          "of the same shard. Bytes per vector = index file / n (the 8-byte item id map included). Load average "
          f"{result['load_start']:.1f} at the start, {result['load_end']:.1f} at the end.", "",
          "| n | factory | setting | build s | index MiB | bytes / vector | reader RSS MiB | single p50 ms "
          "| single p99 ms | batch QPS | recall@100 |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for factory, runs in result["per_shard"].items():
        for r in runs:
            for i, s in enumerate(r["search"]):  # later settings reload into memory the first one freed
                setting = ", ".join(f"{k} {v}" for k, v in s["setting"].items()) or "exact"
                rss = f"{s['reader_rss_growth_mib']:,.0f}" if i == 0 else ""
                md.append(f"| {r['n']:,} | {factory} | {setting} | {r['build_s']:.1f} "
                          f"| {r['index_bytes'] / 2**20:,.0f} | {r['index_bytes'] / r['n']:.0f} "
                          f"| {rss} | {s['single_p50_ms']:.2f} | {s['single_p99_ms']:.2f} "
                          f"| {s['batch_qps']:,.0f} | {s['recall_at_100']:.3f} |")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="growth sizes, comma-separated; the largest is N of part 1 "
                    "(default 100000,300000,1000000)")
    ap.add_argument("--quick", action="store_true", help="50k/100k vectors, 20k items, fewer repeats")
    ap.add_argument("--embed-items", type=int, default=None, help="catalogue size for part 3 (default 200000)")
    ap.add_argument("--singles", type=int, default=None, help="single queries timed per setting (default 200)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 index, 2 embedding)")
    ap.add_argument("--skip-embed", action="store_true", help="parts 1-2 only")
    ap.add_argument("--skip-index", action="store_true", help="part 3 only; writes index-embed-<items>.{json,md}")
    ap.add_argument("--per-shard", default=None, help="part 4 alone: one shard of each of these sizes "
                    "(comma-separated) at d 128; writes index-shard.{json,md}")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.per_shard:  # before any child starts: they read these from the environment
        global DIM, SHARDS, N_QUERIES
        DIM, SHARDS, N_QUERIES = SHARD_DIM, 1, SHARD_QUERIES
        os.environ.update(BENCH_INDEX_DIM=str(DIM), BENCH_INDEX_SHARDS="1", BENCH_INDEX_QUERIES=str(N_QUERIES))
    if args.child:
        kind, data, n, factory, root, *rest = args.child
        if kind == "build":
            print(json.dumps(child_build(data, int(n), factory, root)))
        else:
            settings, gt, singles, repeats = rest
            print(json.dumps(child_search(data, int(n), factory, root, json.loads(settings), gt, int(singles),
                                          int(repeats))))
        return

    sizes = sorted(int(s) for s in (args.sizes or ("50000,100000" if args.quick else "100000,300000,1000000"))
                   .split(","))
    embed_items = args.embed_items or (20_000 if args.quick else 200_000)
    singles = args.singles or (50 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)
    n = sizes[-1]
    command = "python benchmarks/bench_index.py" + " ".join(["", *sys.argv[1:]]).rstrip()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    factories: dict = {}
    growth: dict[str, list[dict]] = {}
    per_shard: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        if args.per_shard:
            per_shard = per_shard_part(tmp, sorted(int(x) for x in args.per_shard.split(",")),
                                       args.singles or 50, args.repeats or 1)
        elif not args.skip_index:
            factories, growth = index_parts(tmp, sizes, singles, repeats)
        index_s = time.perf_counter() - started
        load_index_end = os.getloadavg()[0]
        skip_embed = args.skip_embed or args.per_shard
        embedding = None if skip_embed else embedding_bench(tmp, embed_items, max(1, repeats - 1))
    result = {
        "data": "SYNTHETIC (clustered vectors; simulated catalogue for embedding)",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "n": n, "dim": DIM, "clusters": CLUSTERS, "queries": N_QUERIES, "k": K, "shards": SHARDS,
        "repeats": repeats, "singles": singles, "sizes": sizes,
        "factories": factories, "growth": growth, "embedding": embedding, "per_shard": per_shard,
        "load_start": load_start, "load_index_end": load_index_end, "load_end": os.getloadavg()[0],
        "index_part_s": round(index_s, 1), "total_s": round(time.perf_counter() - started, 1),
    }
    if factories:
        flat_qps = factories[FLAT]["search"][0]["batch_qps"]
        result["ratios_batch_qps_vs_flat"] = {f"{f} {s['setting']}": round(s["batch_qps"] / flat_qps, 2)
                                              for f, r in factories.items() for s in r["search"]}
    name = "index-cpu-quick" if args.quick else "index-cpu"
    if args.skip_index:
        name = f"index-embed-{embed_items}"
    if args.per_shard:
        name = "index-shard"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result, command)
    (RESULTS / f"{name}.md").write_text(md)
    svg = "index-growth-quick.svg" if args.quick else "index-growth.svg"
    if len(sizes) > 1 and growth:
        (RESULTS / svg).write_text(growth_svg(growth))
    print(md)
    print(f"total {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
