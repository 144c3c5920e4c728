"""How full the pages of the retrieval endpoint are with the relevance filter on (Ray-free; synthetic worlds).

With the filter on, a page can come back short: the embedding channel's candidates may hold fewer than k
items that match every key term of the query. ``page_report`` replays held-out test-day searches of a
simulated world through a ``Retriever`` (the same core the Serve ingress runs) and measures:

* ``short_rate``: share of responses with fewer than min(k, E) items, E = the number of catalogue items the
  simulator's ground truth grades exact (2) for that search's intent: a page is only short when the
  catalogue had enough exactly relevant items to fill it;
* ``empty_rate``: share of responses with no item at all;
* ``p_good``: P_good@k, the share of the k slots holding an item of grade >= 1 (a missing item counts as not
  good, as in ``metrics.p_good_at_k``), with the filter on and with it off;
* ``fallback_rate``: share of responses the lexical fallback ran for, and the latency of the responses.

Every number comes from a synthetic world (the ground truth only exists there).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_mgdspr.config import ProjectConfig, ServeConfig
from ray_mgdspr.data.schema import with_epoch_ms
from ray_mgdspr.data.simulator.relevance import EXACT, RelevanceJudge
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.serve.engine import Encoded, Retriever

SEARCH_COLUMNS = ["event_id", "user_id", "session_id", "ts", "query", "query_words", "is_followup",
                  "intent_leaf_id", "intent_brand_id", "intent_attr_value_ids", "clicked_item_ids",
                  "bought_item_ids"]


def held_out_searches(world: str | Path, max_searches: int | None = None, seed: int = 0) -> pa.Table:
    """Test-day searches of ``world`` with a click or a buy (as the evaluation's), ``ts`` as epoch ms; at most
    ``max_searches``, a seeded sample in log order."""
    manifest = read_manifest(world)
    if not manifest.synthetic:
        raise ValueError(f"world {world}: page fill needs the simulator's ground truth; {manifest.label} has none")
    events = read_table(world, "search_events", days=manifest.test_days, columns=SEARCH_COLUMNS)
    positive = pc.greater(pc.add(pc.list_value_length(events["clicked_item_ids"]),
                                 pc.list_value_length(events["bought_item_ids"])), 0)
    events = events.filter(positive)
    if max_searches is not None and events.num_rows > max_searches:
        rows = np.sort(np.random.default_rng(seed).choice(events.num_rows, max_searches, replace=False))
        events = events.take(pa.array(rows))
    return with_epoch_ms(events)


def exact_counts(judge: RelevanceJudge, searches: pa.Table, catalogue: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(E,) how many catalogue items the ground truth grades exact (2) for each search's intent."""
    out = np.zeros(searches.num_rows, np.int64)
    for lo in range(0, searches.num_rows, chunk):
        part = searches.slice(lo, chunk)
        grid = np.broadcast_to(catalogue, (part.num_rows, len(catalogue)))
        grades = judge.grades(part["intent_leaf_id"], part["intent_brand_id"], part["intent_attr_value_ids"], grid)
        out[lo:lo + part.num_rows] = (grades == EXACT).sum(axis=1)
    return out


@dataclass
class PageStats:
    """One (k, mode) row of ``page_report`` (SYNTHETIC world)."""

    k: int
    mode: str  # "filter on", "filter on, no fallback", "filter off", ...
    searches: int
    short_rate: float  # share with fewer than min(k, exact items of the search) items
    empty_rate: float  # share with no item
    mean_count: float
    p_good: float  # P_good@k over k slots (missing items are not good)
    p_exact: float
    fallback_rate: float  # share of responses the strict lexical fallback filled (every key term)
    mean_fallback_added: float  # items the fallback added, strict and relaxed
    relaxed_rate: float  # share of responses filled with the query's product type (too few items had every term)
    latency_p50_ms: float
    latency_p99_ms: float


# mode name -> (apply_filter, filter_depth or None = the retriever's, fallback or None = the retriever's)
MODES = {
    "filter on": (True, None, None),
    "filter on, old depth + fallback": (True, "old", "lexical"),
    "filter on, old depth, no fallback": (True, "old", "none"),
    "filter off": (False, None, None),
}


def page_report(retriever: Retriever, world: str | Path, ks: tuple[int, ...] = (5, 10, 50),
                max_searches: int = 500, seed: int = 0, modes: tuple[str, ...] = tuple(MODES),
                batch_size: int = 128) -> list[PageStats]:
    """Replay held-out test-day searches (with the searcher's id and logged time) through ``retriever``.

    Args:
        ks: page sizes to measure.
        modes: keys of ``MODES``: the retriever as configured ("filter on"), the lexical fallback alone over
            the old depth ("filter on, old depth + fallback"), the behaviour before the deeper search and the
            fallback existed ("filter on, old depth, no fallback": the embedding channel fetched k x
            filter_fetch capped at max_fetch), and "filter off".

    Returns:
        one ``PageStats`` per (k, mode), k major.
    """
    searches = held_out_searches(world, max_searches, seed)
    judge = RelevanceJudge.from_world(world)
    catalogue = np.sort(read_table(world, "items", columns=["item_id"])["item_id"].to_numpy())
    exact = exact_counts(judge, searches, catalogue)
    queries, users, ts = (searches[c].to_pylist() for c in ("query", "user_id", "ts"))
    encoded: list[Encoded] = []
    for lo in range(0, len(queries), batch_size):
        encoded += retriever.encoder.encode(queries[lo:lo + batch_size], users[lo:lo + batch_size],
                                            ts[lo:lo + batch_size])
    configured = retriever.cfg
    out = []
    try:
        for k in ks:
            for mode in modes:
                apply_filter, depth, fallback = MODES[mode]
                retriever.cfg = configured.model_copy(update={
                    "filter_depth": (min(k * configured.filter_fetch, configured.max_fetch) if depth == "old"
                                     else configured.filter_depth if depth is None else depth),
                    "fallback": configured.fallback if fallback is None else fallback})
                out.append(_measure(retriever, encoded, k, apply_filter, mode, exact, judge, searches))
    finally:
        retriever.cfg = configured
    return out


def _measure(retriever: Retriever, encoded: list[Encoded], k: int, apply_filter: bool, mode: str,
             exact: np.ndarray, judge: RelevanceJudge, searches: pa.Table) -> PageStats:
    pages = np.full((len(encoded), k), -1, np.int64)
    counts, fallbacks, added, relaxed, latency = [], [], [], [], []
    for row, enc in enumerate(encoded):
        t = time.perf_counter()
        r = retriever.answer(enc, k, apply_filter)
        latency.append((time.perf_counter() - t) * 1000)
        ids = [i["item_id"] for i in r["data"]][:k]
        pages[row, :len(ids)] = ids
        counts.append(r["count"])
        relaxed.append(r["relaxed_to"] is not None)
        fallbacks.append(r["fallback"] is not None and not relaxed[-1])
        added.append(r["fallback_added"])
    counts_a = np.asarray(counts)
    grades = judge.grades(searches["intent_leaf_id"], searches["intent_brand_id"],
                          searches["intent_attr_value_ids"], pages)
    grades[pages < 0] = -1
    return PageStats(k, mode, len(encoded), float((counts_a < np.minimum(k, exact)).mean()),
                     float((counts_a == 0).mean()), float(counts_a.mean()), float((grades >= 1).mean()),
                     float((grades >= EXACT).mean()), float(np.mean(fallbacks)), float(np.mean(added)),
                     float(np.mean(relaxed)), float(np.percentile(latency, 50)), float(np.percentile(latency, 99)))


def page_table(stats: list[PageStats], label: str) -> str:
    """Markdown table of ``page_report`` rows, labelled (e.g. ``SYNTHETIC, 2,000 items``)."""
    lines = [f"Page fill with the relevance filter, held-out test-day searches [{label}]", "",
             "| k | mode | searches | short | empty | mean items | P_good@k | P_exact@k | fallback ran | "
             "relaxed to the product type | fallback items | p50 ms | p99 ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stats:
        lines.append(f"| {s.k} | {s.mode} | {s.searches} | {s.short_rate:.1%} | {s.empty_rate:.1%} | "
                     f"{s.mean_count:.1f} | {s.p_good:.3f} | {s.p_exact:.3f} | {s.fallback_rate:.1%} | "
                     f"{s.relaxed_rate:.1%} | "
                     f"{s.mean_fallback_added:.2f} | {s.latency_p50_ms:.1f} | {s.latency_p99_ms:.1f} |")
    return "\n".join(lines)


def as_dicts(stats: list[PageStats]) -> list[dict]:
    return [asdict(s) for s in stats]


def run_retriever(run: str | Path, store: str | Path, **serve: object) -> Retriever:
    """A ``Retriever`` of a demo-style run directory (``world/``, ``index/`` with ``CURRENT``) over a behaviour store
    built at ``store`` from every day of the world (when missing); ``serve``: overrides of the serve section's
    defaults (``ServeConfig`` fields)."""
    from ray_mgdspr.index.versions import current_version
    from ray_mgdspr.serve.store import build_sqlite_store

    run = Path(run)
    if current_version(run / "index") is None:
        raise ValueError(f"{run / 'index'}: no CURRENT index version (run `make demo` first)")
    if not Path(store).is_file():
        build_sqlite_store(run / "world", store)
    cfg = ServeConfig.model_validate({"index_root": str(run / "index"), "world": str(run / "world"),
                                      "store": str(store), **serve}).resolved(ProjectConfig())
    return Retriever.open(cfg)


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_mgdspr.serve.pages runs/demo``: the page-fill table of a run (synthetic worlds only)."""
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 50])
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        retriever = run_retriever(args.run, Path(tmp) / "store.sqlite")
        stats = page_report(retriever, args.run / "world", tuple(args.ks), args.searches, args.seed)
    items = read_manifest(args.run / "world").tables.get("items", 0)
    print(page_table(stats, f"SYNTHETIC, {items:,} items, {args.run}"))
    if args.json:
        args.json.write_text(json.dumps(as_dicts(stats), indent=1))


if __name__ == "__main__":
    main()
