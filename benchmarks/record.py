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


def save(name: str, result: dict, markdown: str, results: Path = RESULTS) -> None:
    """``result`` as ``<name>.json`` and ``markdown`` as ``<name>.md`` under ``results`` (default
    ``benchmarks/results/``); prints it."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text(markdown)
    print(markdown)


def serve_settings(pairs: list[str] | None) -> dict:
    """``FIELD=VALUE`` pairs of the command line (values as YAML: 0, 4.0, false, lexical) as ``serve:`` settings,
    checked against ``ServeConfig`` (an unknown field or a bad value exits with pydantic's message)."""
    import pydantic
    import yaml

    from ray_mgdspr.config import ServeConfig

    out = {}
    for pair in pairs or []:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise SystemExit(f"serve settings are FIELD=VALUE pairs, got {pair!r}")
        out[field] = yaml.safe_load(value)
    try:
        ServeConfig.model_validate(out)
    except pydantic.ValidationError as e:
        raise SystemExit(f"serve settings {out}: {e}") from None
    return out


def settings_label(settings: dict) -> str:
    """``serve_settings`` as a short label: ``early_fallback=0, batch_wait_ms=2`` (empty when none)."""
    return ", ".join(f"{k}={v}" for k, v in settings.items())
