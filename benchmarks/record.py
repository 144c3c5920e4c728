"""Writing a benchmark's results: ``benchmarks/results/<name>.{json,md}``, and the lines every report opens with
(title with date and machine, the data's label, the command, the load average at start and end)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def meta(preset: str, command: str, load_start: float, machine: str = "") -> dict:
    """The fields every result records: the data's label (a simulated ``preset`` world: SYNTHETIC), today's date,
    the machine (plus ``machine``), the command and the load average at start and now."""
    return {"data": f"SYNTHETIC (simulated {preset} world)", "date": dt.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}{machine}",
            "command": command, "load_avg": [load_start, os.getloadavg()[0]]}


def header(title: str, r: dict) -> list[str]:
    """The opening lines of a report of ``r`` (which has ``date``, ``machine``, ``data``, ``command``, ``load_avg``)."""
    return [f"# {title} ({r['date']}, {r['machine']})", "",
            f"Data: **{r['data']}**. Command: `{r['command']}`; load average {r['load_avg'][0]:.1f} -> "
            f"{r['load_avg'][1]:.1f}.", ""]


def save(name: str, result: dict, markdown: str) -> None:
    """``result`` as ``<name>.json`` and ``markdown`` as ``<name>.md`` under ``benchmarks/results/``; prints it."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
