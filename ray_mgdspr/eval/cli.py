"""``mgdspr eval``: the evaluation report (register with ``app.command("eval")(eval_command)``).

    mgdspr eval --out runs/eval/report                       # en + zh, 3 seeds, every variant and sweep
    mgdspr eval --config my.yaml --lang zh --seeds 5         # the config's eval: section, overridden
    mgdspr eval --quick --out /tmp/report                    # every code path at toy scale (numbers mean nothing)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ray_mgdspr.cli_support import AddressOpt, fail
from ray_mgdspr.config import ConfigError

log = logging.getLogger(__name__)


def eval_command(
    out: Annotated[Path, typer.Option(help="report directory (report.md, report.json, PNGs)")] = Path("runs/eval"),
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML config (with an optional eval: "
                                               "section), or preset:NAME (default: preset:eval)")] = None,
    preset: Annotated[str | None, typer.Option(help="packaged preset for the world and model (default: eval)")] = None,
    lang: Annotated[list[str] | None, typer.Option(help="world language, repeatable (default: en and zh)")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="seeds per trained variant")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="main-table row, repeatable (default: all)")] = None,
    sweeps: Annotated[bool, typer.Option(help="the convergence curves and the τ / α sweeps")] = True,
    noise: Annotated[bool, typer.Option(help="the click-noise worlds (eval.noise_levels)")] = True,
    world: Annotated[Path | None, typer.Option(help="evaluate this simulated world (one --lang)")] = None,
    work: Annotated[Path | None, typer.Option(help="worlds and vocabularies (default: OUT/work)")] = None,
    quick: Annotated[bool, typer.Option(help="toy scale: tiny world, few steps (smoke runs, tests)")] = False,
    address: AddressOpt = None,
    from_json: Annotated[Path | None, typer.Option(help="only re-render the report of an earlier report.json "
                                                    "into OUT (no runs)")] = None,
) -> None:
    """Baselines, MGDSPR, ablations and sweeps over seeds as Ray tasks; the paper's findings checked (SYNTHETIC)."""
    from ray_mgdspr.eval.config import QUICK, load_eval_config
    from ray_mgdspr.eval.experiments import evaluate
    from ray_mgdspr.eval.report import rerender

    if from_json is not None:
        try:
            path = rerender(from_json, out)
        except (FileNotFoundError, ValueError) as e:
            raise fail(str(e)) from None
        typer.echo(f"evaluation report (SYNTHETIC data) re-rendered from {from_json} into {path.parent}")
        return

    if config and preset:
        raise fail("give --config or --preset, not both")
    try:
        cfg, ev = load_eval_config(config or (f"preset:{preset}" if preset else None))
        changes = dict(QUICK) if quick else {}
        changes.update({k: v for k, v in {"langs": lang, "seeds": seeds, "steps": steps, "variants": variant}.items()
                        if v})
        if not sweeps:
            changes["sweep_langs"] = []
        if not noise:
            changes["noise_levels"] = []
        ev = ev.model_validate({**ev.model_dump(), **changes})
    except (ConfigError, ValueError) as e:
        raise fail(str(e)) from None
    if quick:
        cfg = cfg.model_copy(update={"simulate": cfg.simulate.model_copy(update={
            "n_items": 600, "n_users": 150, "n_brands": 60, "n_shops": 100, "warmup_days": 5})})
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = " ".join(["mgdspr eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else "mgdspr eval"
    try:
        path = evaluate(cfg, ev, out, work=work, world=world, address=address, command=command,
                        progress=lambda msg: typer.echo(msg, err=True))
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None
    typer.echo(f"evaluation report (SYNTHETIC data) in {path.parent}: {path.name}, report.json, "
               f"{len(list(path.parent.glob('*.png')))} plots")
