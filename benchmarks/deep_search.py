"""What a filtered request's deep shard search costs: the index search at the request's depth, then the verdicts.

Data: SYNTHETIC (a simulator world kept by ``bench_scale.py --work``, or any run's config). No Ray, no HTTP. With
the relevance filter on and key terms in the query, every shard is searched ``serve.filter_depth`` deep (9,600, the
paper's) and its hits are checked down to its ``need``-th passing one (``ShardSearcher.search``). Per held-out
test-day search of the configuration's version (its real H_qu and key terms), in this process:

1. **index**: the shards' index search at the request's depth, two ways in ABBA order: Faiss's own
   ``index.search`` (a k-heap per query) and ``Shard.search`` as shipped (an IVF index asked for at least what its
   probed lists hold ranks all of them from one ``range_search``); the hits must be the same, ties in item-id order
   (the heap's are put in that order before comparing);
2. **verdicts**: ``ShardSearcher.hits`` over those top lists (lookups, the filter's verdicts, the passing hits'
   titles) with the passing prefix grown x2 or x``engine.PREFIX_GROWTH`` per chunk, in ABBA rounds; the merged
   pages must be the same.

    python benchmarks/deep_search.py --config /tmp/scale/work/large/config-IVF1024_Flat-s4-inline-latency.yaml

Results: ``benchmarks/results/deep-search.{md,json}`` (``--name``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import record
from bench_serve import held_out_requests  # the same held-out search bodies the endpoint benchmarks send


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": float(np.mean(ms))}


def heap_search(shard: Any, query: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Faiss's own search of ``shard`` (its k-heap), padded as ``Shard.search`` pads."""
    scores, ids = shard.faiss_index.search(query, depth)
    scores[ids < 0] = -np.inf
    return scores, ids


def same_hits(heap: tuple[np.ndarray, np.ndarray], shipped: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether both give the same hits, the heap's put in score-then-id order first."""
    from ray_mgdspr.index.search import top_order

    (hs, hi), (ss, si) = heap, shipped
    order = top_order(hs, hi, hs.shape[1])
    return bool(np.array_equal(np.take_along_axis(hi, order, 1), si)
                and np.array_equal(np.take_along_axis(hs, order, 1), ss))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="a project config whose serve section to open")
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--name", default="deep-search")
    ap.add_argument("--results", type=Path, default=record.RESULTS)
    args = ap.parse_args()

    from ray_mgdspr.config import load_config
    from ray_mgdspr.serve import engine

    project = load_config(args.config)
    cfg = project.serve.resolved(project)
    load_start = os.getloadavg()[0]
    retriever = engine.Retriever.open(cfg)
    searchers = retriever.shards
    bodies = held_out_requests(Path(cfg.world), args.k, args.queries)
    cases = []  # (H_qu (1, d), key terms, depth): the requests whose embedding search goes deep
    for body in bodies:
        enc = retriever.stages.encoder.encode([body["query"]], [body.get("user_id")], [body.get("ts") or 0])[0]
        depth = engine.embedding_depth(args.k, True, enc.terms, cfg.filter_depth)
        if depth > args.k:
            cases.append((enc.embedding[None, :], enc.terms, depth))

    index_ms: dict[str, list[float]] = {"heap": [], "shipped": []}
    same_index = 0
    tops = []
    for i, (query, _terms, depth) in enumerate(cases):
        got = {}
        for side in ("heap", "shipped") if i % 2 == 0 else ("shipped", "heap"):
            t = time.perf_counter()
            got[side] = [heap_search(s.shard, query, depth) if side == "heap" else s.shard.search(query, depth)
                         for s in searchers]
            index_ms[side].append((time.perf_counter() - t) * 1000)
        same_index += all(same_hits(h, s) for h, s in zip(got["heap"], got["shipped"], strict=True))
        tops.append(got["shipped"])

    growths = (2, engine.PREFIX_GROWTH)
    verdict_ms: dict[int, list[float]] = {g: [] for g in growths}
    pages: dict[int, list[Any]] = {g: [] for g in growths}
    shipped_growth = engine.PREFIX_GROWTH
    try:
        for rnd in range(2):  # A B, then B A: the verdict cache warms over the first
            for growth in growths if rnd == 0 else growths[::-1]:
                engine.PREFIX_GROWTH = growth
                for (_query, terms, depth), top in zip(cases, tops, strict=True):
                    t = time.perf_counter()
                    hits = [s.hits(*st, [depth], [terms], [args.k])[0] for s, st in zip(searchers, top, strict=True)]
                    verdict_ms[growth].append((time.perf_counter() - t) * 1000)
                    merged = engine.merge_hits(hits, depth)
                    if rnd == 0:
                        pages[growth].append((merged.item_ids.tolist(), merged.passes.tolist(), merged.titles))
    finally:
        engine.PREFIX_GROWTH = shipped_growth
    same_pages = sum(a == b for a, b in zip(*pages.values(), strict=True))

    result = {
        "name": args.name, "date": dt.date.today().isoformat(), "data": "SYNTHETIC",
        "command": "python benchmarks/deep_search.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "config": str(args.config), "version": retriever.release.version,
        "items": sum(s.rows for s in searchers), "shards": len(searchers),
        "factory": retriever.release.index.factory, "nprobe": cfg.nprobe, "k": args.k,
        "searches": len(bodies), "deep": len(cases), "depth": cfg.filter_depth,
        "index_ms": {side: summary(v) for side, v in index_ms.items()}, "same_index_hits": same_index,
        "verdict_ms": {str(g): summary(v) for g, v in verdict_ms.items()}, "same_pages": same_pages,
        "load_start": load_start, "load_end": os.getloadavg()[0],
    }
    record.save(args.name, result, report(result), args.results)


def report(r: dict[str, Any]) -> str:
    def row(label: str, s: dict[str, float]) -> str:
        return f"| {label} | {s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} |"

    growth = [g for g in r["verdict_ms"] if g != "2"] or ["2"]
    return "\n".join([
        f"# A filtered request's deep shard search: {r['name']} ({r['date']})", "",
        f"Data: SYNTHETIC. Machine: {r['machine']}; load average (1 min) {r['load_start']:.2f} at start, "
        f"{r['load_end']:.2f} at end. Command: `{r['command']}`.", "",
        f"- version {r['version']}: {r['items']:,} items in {r['shards']} shards ({r['factory']}, nprobe "
        f"{r['nprobe']}); k {r['k']}, filter on",
        f"- {r['deep']} of {r['searches']} held-out test-day searches have key terms, so each shard is searched "
        f"{r['depth']:,} deep; each is measured below, one at a time in this process", "",
        "All the shards of one request, ms:", "",
        "| | p50 | p99 | mean |", "|---|---:|---:|---:|",
        row("index search: Faiss's k-heap (`index.search`)", r["index_ms"]["heap"]),
        row("index search as shipped (`Shard.search`: every probed vector from `range_search`)",
            r["index_ms"]["shipped"]),
        row("verdicts and titles, passing prefix grown x2 per chunk", r["verdict_ms"]["2"]),
        row(f"verdicts and titles as shipped (x{growth[0]})", r["verdict_ms"][growth[0]]), "",
        f"The same hits from both index searches (ties in item-id order) for {r['same_index_hits']} of {r['deep']} "
        f"requests; the same merged pages (ids, verdicts, titles) from both prefix growths for {r['same_pages']} of "
        f"{r['deep']}.", "",
    ])


if __name__ == "__main__":
    main()
