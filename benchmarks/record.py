"""Writing a benchmark's results: ``benchmarks/results/<name>.{json,md}``, and the lines every report opens with
(title with date and machine, the data's label, the command, the load average at start and end)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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
