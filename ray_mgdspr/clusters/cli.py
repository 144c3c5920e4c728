"""``mgdspr cluster validate FILE...``: the cluster specs checked offline (``ray_mgdspr.clusters``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ray_mgdspr.clusters import file_kind, validate_file

cluster_app = typer.Typer(help="Cluster specs: Ray cluster launcher YAMLs, KubeRay manifests, monitoring files.",
                          no_args_is_help=True)


@cluster_app.callback()
def _cluster() -> None:
    """Cluster specs: Ray cluster launcher YAMLs and KubeRay manifests (a group, so `validate` is named)."""


@cluster_app.command("validate")
def validate_command(files: Annotated[list[Path], typer.Argument(help="spec files (launcher, KubeRay, Serve "
                                                                 "config, project config, Grafana dashboard, "
                                                                 "Prometheus config, PodMonitor)")]) -> None:
    """Check cluster specs offline with Ray's own schemas and the project's rules; exit 1 on any problem."""
    out = Console(soft_wrap=True, highlight=False)
    bad = 0
    for f in files:
        problems = validate_file(f)
        if problems:
            bad += 1
            for p in problems:
                out.print(f"[red]FAIL[/] {escape(p)}")
        else:
            out.print(f"[green]OK[/]   {escape(str(f))} ({file_kind(f)})")
    out.print(f"{len(files)} file(s): {len(files) - bad} ok, {bad} with problems")
    if bad:
        raise typer.Exit(1)
