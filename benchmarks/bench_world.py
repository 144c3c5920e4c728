"""The simulated world's own ceilings, measured without any model (SYNTHETIC): oracle Recall@50 (user-aware,
user-agnostic, grade only), the personalisation headroom, and the share of clicks on irrelevant items, for the
`eval` preset at the default strengths and with each knob of issue 14 turned down, and for a range of
``choice.click_noise`` levels.

    python benchmarks/bench_world.py [--events 2000] [--out benchmarks/results]

Tuning the world's knobs looks only at these numbers (properties of the world), never at a model's score.
Writes ``world.md`` and ``world.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ray_mgdspr.config import SimulateConfig, load_preset
from ray_mgdspr.data.simulator.oracle import ORACLES, Oracle
from ray_mgdspr.data.simulator.simulate import simulate
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.metrics import recall_at_k

K = 50
WORLDS: list[tuple[str, dict[str, Any]]] = [
    ("defaults (eval preset)", {}),
    ("pages without the user (page_personalisation 0)", {"choice": {"page_personalisation": 0.0}}),
    ("page_personalisation 1", {"choice": {"page_personalisation": 1.0}}),
    ("candidates 3 (the engine's old draw)", {"choice": {"candidates": 3}}),
    ("all 260 leaves (~38 items each)", {"leaves_per_category": None}),
    ("before issue 14 (all leaves, page_personalisation 0, candidates 3)",
     {"leaves_per_category": None, "choice": {"page_personalisation": 0.0, "candidates": 3}}),
    ("every personal strength 0", {"choice": {k: 0.0 for k in ("page_personalisation", "b_brand", "c_shop",
                                                                "d_price", "g_taste")}}),
]
NOISE = [0.0, 1.0, 4.0, 12.0, 40.0, 100.0, 300.0]


def world_config(base: SimulateConfig, change: dict[str, Any]) -> SimulateConfig:
    top = {k: v for k, v in change.items() if k != "choice"}
    return base.model_copy(update={**top, "choice": base.choice.model_copy(update=change.get("choice", {}))})


def measure(cfg: SimulateConfig, events: int, root: Path, oracles: bool = True) -> dict[str, Any]:
    world = root / "world"
    t0 = time.perf_counter()
    manifest = simulate(cfg, world, overwrite=True)
    out: dict[str, Any] = {"irrelevant_click_share": manifest.stats["irrelevant_click_share"],
                           "simulate_s": round(time.perf_counter() - t0, 1)}
    if oracles:
        logged = read_table(world, "search_events", days=read_manifest(world).test_days)
        logged = logged.filter(pc.greater(pc.list_value_length(logged["clicked_item_ids"]), 0))
        rows = np.sort(np.random.default_rng(0).choice(logged.num_rows, min(events, logged.num_rows), replace=False))
        logged = logged.take(rows)
        targets = [np.asarray(c, np.int64) for c in logged["clicked_item_ids"].to_pylist()]
        oracle = Oracle.from_world(world)
        for mode in ORACLES:
            out[mode] = recall_at_k(oracle.topk(logged, mode, K), targets, K)
        out["headroom"] = out["oracle_aware"] - out["oracle_agnostic"]
        out["searches"] = len(targets)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2000, help="held-out searches with a click per world")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    base = load_preset("eval").simulate
    load = os.getloadavg()[0]
    results: dict[str, Any] = {"label": "SYNTHETIC", "preset": "eval", "k": K, "load_avg_start": load,
                               "worlds": [], "noise": []}
    with tempfile.TemporaryDirectory(prefix="bench-world-") as tmp:
        for name, change in WORLDS:
            r = {"world": name, "change": change, **measure(world_config(base, change), args.events, Path(tmp))}
            results["worlds"].append(r)
            print(f"{name}: aware {r['oracle_aware']:.3f} agnostic {r['oracle_agnostic']:.3f} "
                  f"headroom {r['headroom']:+.3f}, irrelevant clicks {r['irrelevant_click_share']:.1%}", flush=True)
        for level in NOISE:
            r = {"click_noise": level, **measure(world_config(base, {"choice": {"click_noise": level}}),
                                                 args.events, Path(tmp), oracles=False)}
            results["noise"].append(r)
            print(f"click_noise {level:g}: {r['irrelevant_click_share']:.1%} of clicks on irrelevant items", flush=True)
    results["load_avg_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# The simulated world's own ceilings (SYNTHETIC)", "",
             f"`python benchmarks/bench_world.py` — the `eval` preset (en, seed 0), {args.events} held-out test-day "
             f"searches with a click per world, Recall@{K} of the oracle rankings (`data/simulator/oracle.py`); "
             "no model is involved. Load average "
             f"{results['load_avg_start']:.1f} → {results['load_avg_end']:.1f} (quality numbers do not depend on it).",
             "", "| world | user-aware | user-agnostic | grade only | headroom | clicks on irrelevant items |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results["worlds"]:
        lines.append(f"| {r['world']} | {r['oracle_aware']:.3f} | {r['oracle_agnostic']:.3f} | "
                     f"{r['oracle_grade']:.3f} | {r['headroom']:+.3f} | {r['irrelevant_click_share']:.1%} |")
    lines += ["", "| `choice.click_noise` | " + " | ".join(f"{r['click_noise']:g}" for r in results["noise"]) + " |",
              "|---|" + "---:|" * len(results["noise"]),
              "| clicks on irrelevant items | " + " | ".join(f"{r['irrelevant_click_share']:.1%}"
                                                      for r in results["noise"]) + " |", ""]
    (args.out / "world.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'world.md'} (SYNTHETIC)")


if __name__ == "__main__":
    main()
