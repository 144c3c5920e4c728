"""Simulator throughput and memory, as ratios against baselines measured in the same run.

What it measures (all data synthetic):

1. ``simulate`` of a preset (default ``large``: 1M items, 200k users, 10M+ behaviour rows): wall time,
   log rows written per second (behaviours + search events + query history), peak RSS.
2. Baseline, same run: writing the same number of rows of the same tables with the same writer,
   from pre-generated random columns (the Parquet write ceiling of this machine). The ratio
   simulate / ceiling says how much of the time goes into simulating rather than writing.
3. Memory growth: the same catalogue with a quarter of the users. Streaming means peak RSS grows far
   less than the log (rss ratio << rows ratio).

Each measurement runs in a fresh subprocess so its peak RSS is its own.

    python benchmarks/bench_simulate.py                 # large preset, ~3-4 min on 2 cores
    python benchmarks/bench_simulate.py --preset small  # quick look

Results go to ``benchmarks/results/simulate-<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD_SIMULATE = r"""
import json, resource, sys, time
from ray_mgdspr.config import load_preset
from ray_mgdspr.data.simulator.simulate import simulate
cfg = load_preset(sys.argv[1]).simulate
cfg = cfg.model_copy(update={"n_users": int(cfg.n_users * float(sys.argv[3]))})
t = time.perf_counter()
m = simulate(cfg, sys.argv[2])
secs = time.perf_counter() - t
rows = sum(m.tables[k] for k in ("behaviours", "search_events", "query_history"))
print(json.dumps({"seconds": secs, "rows": rows, "tables": m.tables,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD_WRITE_CEILING = r"""
import json, resource, sys, time, datetime as dt
import numpy as np, pyarrow as pa
from ray_mgdspr.data import schema
from ray_mgdspr.data.world import WorldManifest, WorldWriter
tables = json.loads(sys.argv[2])
rng = np.random.default_rng(0)
n_days, chunk = 38, 50_000
def columns(spec, n):
    out = {}
    for f in spec.schema:
        t = f.type
        if pa.types.is_list(t):
            lens = rng.integers(0, 6, n); offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            vals = rng.integers(0, 1_000_000, offs[-1]).astype(np.int64)
            vals = pa.array(vals).cast(t.value_type) if not pa.types.is_string(t.value_type) else \
                pa.array(np.char.mod("w%d", vals % 5000).astype(object))
            out[f.name] = pa.ListArray.from_arrays(pa.array(offs), vals)
        elif pa.types.is_string(t):
            out[f.name] = pa.array(np.char.mod("q %d", rng.integers(0, 10**6, n)).astype(object))
        elif pa.types.is_timestamp(t):
            out[f.name] = pa.array(rng.integers(0, 86_400_000, n) + 1606780800000).cast(t)
        elif pa.types.is_boolean(t):
            out[f.name] = rng.random(n) < 0.5
        else:
            out[f.name] = pa.array(rng.integers(0, 1000, n)).cast(t)
    for column, allowed in spec.enums.items():
        out[column] = pa.array(np.array(allowed, dtype=object)[rng.integers(0, len(allowed), n)])
    return out
t = time.perf_counter()
with WorldWriter(sys.argv[1]) as w:
    for name in ("behaviours", "search_events", "query_history"):
        spec = schema.TABLES[name]
        per_day = tables[name] // n_days
        block = columns(spec, min(chunk, max(per_day, 1)))
        for day in range(1, n_days + 1):
            with w.day_writer(spec, day) as dw:
                left = per_day
                while left > 0:
                    n = min(left, chunk)
                    dw.write({k: v[:n] for k, v in block.items()})
                    left -= n
    w.commit(WorldManifest(synthetic=True, source="bench", base_date=dt.date(2020, 12, 1)))
secs = time.perf_counter() - t
rows = sum(tables[k] // n_days * n_days for k in ("behaviours", "search_events", "query_history"))
print(json.dumps({"seconds": secs, "rows": rows,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="large")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"simulate preset {args.preset} (synthetic) ...", flush=True)
        full = child(CHILD_SIMULATE, args.preset, f"{tmp}/full", "1.0")
        print(f"  {full['rows']:,} rows in {full['seconds']:.1f}s, peak RSS {full['peak_rss_mib']:.0f} MiB", flush=True)
        print("baseline: write the same rows from pre-generated columns ...", flush=True)
        ceiling = child(CHILD_WRITE_CEILING, f"{tmp}/ceiling", json.dumps(full["tables"]))
        print(f"  {ceiling['rows']:,} rows in {ceiling['seconds']:.1f}s", flush=True)
        print("growth: a quarter of the users ...", flush=True)
        quarter = child(CHILD_SIMULATE, args.preset, f"{tmp}/quarter", "0.25")
    rate = full["rows"] / full["seconds"]
    ceiling_rate = ceiling["rows"] / ceiling["seconds"]
    result = {
        "data": "SYNTHETIC (simulated Taobao-like marketplace)",
        "preset": args.preset,
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "simulate": full,
        "write_ceiling": ceiling,
        "quarter_users": quarter,
        "simulate_rows_per_s": round(rate),
        "ceiling_rows_per_s": round(ceiling_rate),
        "ratio_simulate_vs_write_ceiling": round(rate / ceiling_rate, 3),
        "growth_rows_ratio": round(full["rows"] / quarter["rows"], 2),
        "growth_peak_rss_ratio": round(full["peak_rss_mib"] / quarter["peak_rss_mib"], 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"simulate-{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Simulator benchmark, preset `{args.preset}` ({result['date']}, {result['machine']})",
        "",
        "Data: SYNTHETIC. Command: `python benchmarks/bench_simulate.py --preset " + args.preset + "`.",
        "",
        "| run | rows | seconds | rows/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
        f"| simulate | {full['rows']:,} | {full['seconds']:.1f} | {rate:,.0f} | {full['peak_rss_mib']:.0f} |",
        f"| baseline: write same rows | {ceiling['rows']:,} | {ceiling['seconds']:.1f} | {ceiling_rate:,.0f} | "
        f"{ceiling['peak_rss_mib']:.0f} |",
        f"| simulate, 1/4 users | {quarter['rows']:,} | {quarter['seconds']:.1f} | "
        f"{quarter['rows'] / quarter['seconds']:,.0f} | {quarter['peak_rss_mib']:.0f} |",
        "",
        f"- simulate / write ceiling: **{result['ratio_simulate_vs_write_ceiling']}x**",
        f"- 4x users: rows x{result['growth_rows_ratio']}, peak RSS x{result['growth_peak_rss_ratio']}",
        f"- behaviours: {full['tables']['behaviours']:,}; items: {full['tables']['items']:,}; "
        f"users: {full['tables']['users']:,}",
    ]
    (RESULTS / f"simulate-{args.preset}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
