"""What every ``mgdspr`` command shares: the consoles, the common options, one way to fail, the config a command
runs with and joining Ray. Used by ``cli.py``, ``serve/cli.py``, ``eval/cli.py``, ``clusters/cli.py`` and the
``jobs/`` entrypoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ray_mgdspr.config import ConfigError, ProjectConfig, RayConfig, preset_names, resolve_config

T = TypeVar("T")

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config, or preset:NAME (default: "
                                                                        "preset:demo)")]
PresetOpt = Annotated[str | None, typer.Option(help=f"packaged preset: {', '.join(preset_names())}")]
AddressOpt = Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (2: bad input, 1: a stage failed). The message
    is never wrapped (a wrapped path could not be copied, nor the message found with grep in a job's log)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def project_config(config: str | None, preset: str | None = None) -> ProjectConfig:
    """The config a command runs with (``config.resolve_config``); a bad one ends the command with its message."""
    try:
        return resolve_config(config, preset)
    except ConfigError as e:
        raise fail(str(e)) from None


def on_ray(ray: RayConfig, address: str | None, job: Callable[[], T]) -> T:
    """Join or start Ray as configured, run ``job``; bad input (a missing or existing file, a bad value or config)
    ends the command with its message and exit code 2."""
    from ray_mgdspr.runtime import connect_ray

    try:
        connect_ray(ray, address)
        return job()
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConfigError is a ValueError
        raise fail(str(e)) from None
