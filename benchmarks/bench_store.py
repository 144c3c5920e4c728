"""Behaviour store lookups: SQLite store format 2 (covering indexes) against format 1, in and out of the page cache.

Data: SYNTHETIC (the store and world of a served configuration, e.g. one ``bench_scale.py --work`` keeps). Both
formats are copies of the configuration's store (``upgrade_sqlite_store`` for format 2; format 1's indexes
rebuilt for the other; both vacuumed, as compact as a fresh build), answering the same held-out test-day
(user, ts) with ``SqliteStore.histories``, as a query encoder does for each request:

- **cold**: the file's pages dropped from the OS page cache first (``posix_fadvise(DONTNEED)``), as after a
  restart or for a store larger than memory: every lookup reads the disk;
- **warm**: the same lookups again, from the page cache.

Rounds take fresh (user, ts) each and alternate the formats ABBA. The rows both formats return are compared.

    python benchmarks/bench_store.py --config /tmp/scale/work/large/config-IVF1024_Flat-s4-colocated-latency.yaml

Results: ``benchmarks/results/store-<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import record
from bench_serve import held_out_requests


def drop_from_page_cache(path: Path) -> None:
    for f in (path, path.with_name(path.name + "-wal")):
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def lookups(store, asks: list[tuple[int, int]]) -> tuple[list[float], list]:
    times, rows = [], []
    for user, ts in asks:
        t0 = time.perf_counter()
        rows.append(store.histories([user], [ts]))
        times.append((time.perf_counter() - t0) * 1000)
    return times, rows


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": float(np.mean(ms))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="a project config whose serve.store to copy")
    ap.add_argument("--name", default="large")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=200, help="(user, ts) lookups per round and format")
    ap.add_argument("--work", type=Path, help="where the two copies go (default: a temporary directory)")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]

    from ray_mgdspr.config import load_config
    from ray_mgdspr.index.versions import current_version
    from ray_mgdspr.serve.engine import verify_release
    from ray_mgdspr.serve.store import FORMAT_1_INDEXES, INDEXES, SqliteStore, create_indexes, upgrade_sqlite_store

    project = load_config(args.config)
    cfg = project.serve.resolved(project)
    features = verify_release(cfg.index_root, current_version(cfg.index_root)).bundle.features
    source = Path(cfg.store)
    asks = [(b["user_id"], b["ts"]) for b in held_out_requests(Path(cfg.world), 50, args.rounds * args.per_round)]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = {"format 2": work / "format2.sqlite", "format 1": work / "format1.sqlite"}
    for path in paths.values():
        shutil.copy(source, path)
    upgrade_sqlite_store(paths["format 2"])
    with closing(sqlite3.connect(paths["format 1"], isolation_level=None)) as db:
        for name in INDEXES:
            db.execute(f"DROP INDEX IF EXISTS {name}")
        create_indexes(db, FORMAT_1_INDEXES)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('format', '1')")
    for path in paths.values():  # both as compact as a fresh build
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("VACUUM")
    stores = {k: SqliteStore(p, features) for k, p in paths.items()}
    times = {k: {"cold": [], "warm": []} for k in paths}
    same = 0
    for r in range(args.rounds):
        part = asks[r * args.per_round:(r + 1) * args.per_round]
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        got = {}
        for k in order:
            drop_from_page_cache(paths[k])
            cold, got[k] = lookups(stores[k], part)
            warm, _ = lookups(stores[k], part)
            times[k]["cold"] += cold
            times[k]["warm"] += warm
        same += sum(all(a.equals(b) for a, b in zip(x, y, strict=True))
                    for x, y in zip(got["format 2"], got["format 1"], strict=True))
    for s in stores.values():
        s.close()
    sizes = {k: p.stat().st_size / 2**20 for k, p in paths.items()}
    result = {**record.meta(args.name, "python benchmarks/bench_store.py " + " ".join(sys.argv[1:]), load_start),
              "store": str(source), "lookups_per_format": len(asks), "same_rows": same, "size_mib": sizes,
              "ms": {k: {c: stats(v) for c, v in t.items()} for k, t in times.items()}}
    if not args.work:
        shutil.rmtree(work)
    lines = record.header(f"Behaviour store lookups: {args.name}", result)
    lines += [f"Store: `{source}` ({sizes['format 2']:,.0f} MiB in format 2, {sizes['format 1']:,.0f} MiB in "
              f"format 1). {len(asks):,} held-out (user, ts) per format, {args.rounds} rounds ABBA; one "
              "`SqliteStore.histories` call each (5 SQL lookups). Cold: the file dropped from the OS page cache "
              f"first; warm: the same lookups again. Same rows from both formats: {same:,} of {len(asks):,}.", "",
              "| format | cold p50 ms | cold p99 ms | cold mean ms | warm p50 ms | warm p99 ms | warm mean ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k, t in result["ms"].items():
        lines.append(f"| {k} | " + " | ".join(f"{t[c][s]:.2f}" for c in ("cold", "warm")
                                              for s in ("p50", "p99", "mean")) + " |")
    record.save(f"store-{args.name}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
