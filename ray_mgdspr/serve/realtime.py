"""Does a click posted to the behaviour store change what the next search returns? (Ray-free; synthetic worlds.)

``realtime_recall`` replays held-out test-day **follow-up** searches (a query that refines the session's
previous one, ambiguous alone) at their logged time, twice:

* **without**: the store holds the days before the test day only (``build_sqlite_store(days=...)``): nothing
  of the test day, so neither the session's earlier clicks;
* **with clicks**: the same store after ``Store.append`` (what ``POST /v1/events`` calls) of the clicks of
  the session's earlier searches, with their logged timestamps (all before the follow-up's); they enter the
  user's real-time sequence R^u;
* **with clicks + queries** (optional): also the session's earlier queries (the history-query attention).

and measures Recall@k (no relevance filter) of each. The windows only read rows before each request's ``ts``,
so a click logged after a follow-up never reaches it. A user with several test-day sessions also sees the
appended clicks of their earlier sessions (as a live store would); ``changed`` / ``appended`` say per
follow-up whether its H_qu moved and whether the store got rows of that user before its time.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ray_mgdspr.data.schema import epoch_ms, with_epoch_ms
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.serve.engine import Retriever, merge_hits
from ray_mgdspr.serve.pages import SEARCH_COLUMNS
from ray_mgdspr.serve.store import Behaviour, PastQuery, SqliteStore, build_sqlite_store


@dataclass
class Followup:
    """One held-out follow-up search and what its session did before it."""

    event_id: int
    user_id: int
    ts: int  # epoch ms
    query: str
    targets: list[int]  # clicked or bought on the follow-up
    earlier_clicks: list[Behaviour]  # the session's earlier clicks, logged ts (< ts)
    earlier_queries: list[PastQuery]  # the session's earlier queries


@dataclass
class RealtimeReport:
    """Recall@k of follow-up searches with and without the session's earlier clicks (SYNTHETIC world)."""

    k: int
    followups: int
    with_earlier_clicks: int  # follow-ups whose session clicked before them
    clicks_appended: int
    recall_without: float
    recall_with_clicks: float
    recall_with_clicks_and_queries: float | None
    changed: np.ndarray = field(repr=False)  # (F,) bool: H_qu differs with the clicks appended
    appended: np.ndarray = field(repr=False)  # (F,) bool: the store got clicks of that user before the ts
    target_rank_without: np.ndarray = field(repr=False)  # (F,) best rank of a target in the top k (k: none)
    target_rank_with: np.ndarray = field(repr=False)


def followups(world: str | Path, max_followups: int | None = None, seed: int = 0) -> list[Followup]:
    """Test-day follow-up searches with a click or a buy whose session searched before them (seeded sample)."""
    manifest = read_manifest(world)
    events = read_table(world, "search_events", days=manifest.test_days, columns=SEARCH_COLUMNS)
    events = with_epoch_ms(events)
    clicks = read_table(world, "behaviours", days=manifest.test_days, columns=["user_id", "item_id", "action",
                                                                              "ts", "event_id"])
    clicks = clicks.filter(pc.and_(pc.equal(clicks["action"], "click"), pc.is_valid(clicks["event_id"])))
    clicks_by_event: dict[int, list[tuple[int, int, int]]] = {}
    for user, item, ts, event in zip(clicks["user_id"].to_pylist(), clicks["item_id"].to_pylist(),
                                     epoch_ms(clicks["ts"]).tolist(), clicks["event_id"].to_pylist(), strict=True):
        clicks_by_event.setdefault(event, []).append((user, item, ts))
    rows = events.to_pylist()
    by_session: dict[int, list[dict]] = {}
    for e in rows:
        by_session.setdefault(e["session_id"], []).append(e)
    out = []
    for e in rows:
        targets = sorted(set(e["clicked_item_ids"] or []) | set(e["bought_item_ids"] or []))
        earlier = [p for p in by_session[e["session_id"]] if p["ts"] < e["ts"]]
        if not e["is_followup"] or not targets or not earlier:
            continue
        cl = [Behaviour(user_id=u, item_id=i, action="click", ts=t) for p in earlier
              for u, i, t in clicks_by_event.get(p["event_id"], []) if t < e["ts"]]
        qs = [PastQuery(user_id=p["user_id"], ts=p["ts"], query_words=p["query_words"] or []) for p in earlier]
        out.append(Followup(e["event_id"], e["user_id"], e["ts"], e["query"], targets, cl, qs))
    if max_followups is not None and len(out) > max_followups:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), max_followups, replace=False))
        out = [out[i] for i in keep]
    return out


def store_before_test_day(world: str | Path, out: str | Path) -> Path:
    """A SQLite store of the days before the world's first test day."""
    manifest = read_manifest(world)
    first = min(manifest.test_days)
    build_sqlite_store(world, out, overwrite=True, days=[d for d in manifest.all_days if d < first])
    return Path(out)


def realtime_recall(retriever: Retriever, world: str | Path, k: int = 50, max_followups: int | None = 500,
                    seed: int = 0, with_queries: bool = True, work_dir: str | Path | None = None) -> RealtimeReport:
    """Recall@k of held-out follow-ups without / with their session's earlier clicks in the store (see the module
    docstring). ``retriever``'s encoder store is swapped for the measurement's stores and restored after."""
    chosen = followups(world, max_followups, seed)
    if not chosen:
        raise ValueError(f"world {world}: no test-day follow-up searches with an earlier search in their session")
    tmp = Path(tempfile.mkdtemp(prefix="realtime-", dir=work_dir))
    features = retriever.release.bundle.features
    saved = retriever.encoder.store
    try:
        base = store_before_test_day(world, tmp / "without.sqlite")
        shutil.copy(base, tmp / "clicks.sqlite")
        stores = {"without": SqliteStore(base, features), "clicks": SqliteStore(tmp / "clicks.sqlite", features)}
        clicks = {(b.user_id, b.item_id, b.ts): b for f in chosen for b in f.earlier_clicks}
        stores["clicks"].append(clicks.values())  # what POST /v1/events does
        if with_queries:
            shutil.copy(tmp / "clicks.sqlite", tmp / "queries.sqlite")
            stores["queries"] = SqliteStore(tmp / "queries.sqlite", features)
            queries = {(q.user_id, q.ts): q for f in chosen for q in f.earlier_queries}
            stores["queries"].append((), queries.values())
        embeddings, ranks = {}, {}
        for name, store in stores.items():
            retriever.encoder.store = store
            embeddings[name], ranks[name] = _search(retriever, chosen, k)
            store.close()
    finally:
        retriever.encoder.store = saved
        shutil.rmtree(tmp, ignore_errors=True)
    appended_users: dict[int, list[int]] = {}
    for user, _, ts in clicks:
        appended_users.setdefault(user, []).append(ts)
    appended = np.array([any(t < f.ts for t in appended_users.get(f.user_id, [])) for f in chosen])
    changed = ~np.all(np.isclose(embeddings["without"], embeddings["clicks"], rtol=1e-6, atol=1e-7), axis=1)
    recall = {n: float(np.mean([r[1] for r in rs])) for n, rs in ranks.items()}
    return RealtimeReport(k, len(chosen), sum(bool(f.earlier_clicks) for f in chosen), len(clicks),
                          recall["without"], recall["clicks"], recall.get("queries"), changed, appended,
                          np.array([r[0] for r in ranks["without"]]), np.array([r[0] for r in ranks["clicks"]]))


def _search(retriever: Retriever, chosen: list[Followup], k: int, batch: int = 128
            ) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """H_qu of each follow-up and (best target rank or k, recall@k) of its unfiltered top k."""
    vectors, out = [], []
    for lo in range(0, len(chosen), batch):
        part = chosen[lo:lo + batch]
        enc = retriever.encoder.encode([f.query for f in part], [f.user_id for f in part], [f.ts for f in part])
        vectors += [e.embedding for e in enc]
        queries = np.stack([e.embedding for e in enc])
        hits = [s.search(queries, k, [()] * len(part)) for s in retriever.shards]
        for row, f in enumerate(part):
            top = merge_hits([h[row] for h in hits], k).item_ids.tolist()
            found = [top.index(t) for t in f.targets if t in top]
            out.append((min(found) if found else k, len(found) / len(f.targets)))
    return np.stack(vectors), out


def realtime_table(r: RealtimeReport, label: str) -> str:
    """Markdown summary of ``realtime_recall``, labelled (e.g. ``SYNTHETIC, 2,000 items``)."""
    up = int((r.target_rank_with < r.target_rank_without).sum())
    down = int((r.target_rank_with > r.target_rank_without).sum())
    lines = [f"Follow-up searches with / without the session's earlier clicks in the store [{label}]", "",
             f"| store | Recall@{r.k} |", "|---|---:|",
             f"| days before the test day | {r.recall_without:.4f} |",
             f"| + the session's earlier clicks (Store.append) | {r.recall_with_clicks:.4f} |"]
    if r.recall_with_clicks_and_queries is not None:
        lines.append(f"| + clicks and the session's earlier queries | {r.recall_with_clicks_and_queries:.4f} |")
    lines += ["", f"{r.followups} follow-ups, {r.with_earlier_clicks} with earlier clicks in their session "
              f"({r.clicks_appended} clicks appended); H_qu changed for {int(r.changed.sum())}; the best target "
              f"moved up for {up}, down for {down}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_mgdspr.serve.realtime runs/demo``: follow-up Recall@K with / without the session's earlier
    clicks in the store (synthetic worlds only)."""
    import argparse

    from ray_mgdspr.serve.pages import run_retriever

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--followups", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        retriever = run_retriever(args.run, Path(tmp) / "store.sqlite")
        report = realtime_recall(retriever, args.run / "world", args.k, args.followups, args.seed, work_dir=tmp)
    items = read_manifest(args.run / "world").tables.get("items", 0)
    print(realtime_table(report, f"SYNTHETIC, {items:,} items, {args.run}"))


if __name__ == "__main__":
    main()
