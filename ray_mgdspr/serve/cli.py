"""``mgdspr serve`` (run, config, promote), ``mgdspr query`` and ``mgdspr store build``."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ray_mgdspr.cli_support import AddressOpt, ConfigOpt, console, fail

serve_app = typer.Typer(help="The retrieval endpoint on Ray Serve.", no_args_is_help=False,
                        invoke_without_command=True)
store_app = typer.Typer(help="The user behaviour store the endpoint reads histories from.", no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option(help="the endpoint", envvar="MGDSPR_URL")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _args(config: str | None, overrides: dict[str, Any]) -> Any:
    from ray_mgdspr.serve.app import AppArgs

    return AppArgs(config=config, serve={k: v for k, v in overrides.items() if v is not None})


@serve_app.callback()
def serve_run(
    ctx: typer.Context,
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default serve.host: loopback)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default serve.port)")] = None,
    version: Annotated[str | None, typer.Option(help="version to serve (default: the index root's CURRENT)")] = None,
    address: AddressOpt = None,
) -> None:
    """Serve the retrieval endpoint on a local Ray (or --address) until Ctrl-C / SIGTERM."""
    if ctx.invoked_subcommand is not None:
        return
    from ray import serve

    from ray_mgdspr.config import ConfigError, resolve_config
    from ray_mgdspr.runtime import connect_ray, port_holder
    from ray_mgdspr.serve.app import local_url, resolve, start
    from ray_mgdspr.serve.engine import ReleaseError

    args = _args(config, {"host": host, "port": port, "version": version})
    try:
        ray_cfg, holder = resolve_config(args.config).ray, None
        if not (address or ray_cfg.address or os.environ.get("RAY_ADDRESS")):  # a local Ray: its port must be free
            wanted = resolve(args)
            holder = port_holder(wanted.host, wanted.port)
    except (ConfigError, ReleaseError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise fail(str(e)) from None
    if holder:
        raise fail(f"port {wanted.port} on {wanted.host} is in use by {holder}: stop it (a `haproxy` left by `ray "
                   "stop --force`: `pkill haproxy`) or serve on another port (--port)")
    try:
        connect_ray(ray_cfg, address)
        cfg = start(args)
    except (ConfigError, ReleaseError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise fail(str(e)) from None
    info = _call(local_url(cfg), "/v1/version")  # over HTTP: a handle here would need an event loop in
    # Serve's throughput-optimised mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)
    console.print(f"serving version {info['version']} ({info['model']}) at http://{cfg.host}:{cfg.port} "
                  "- POST /v1/retrieve, GET /v1/version, /healthz, /metrics; Ctrl-C stops", soft_wrap=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    console.print("stopping")
    serve.shutdown()


@serve_app.command("config")
def serve_config_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Serve config YAML to write")] = Path("serve.yaml"),
    config: ConfigOpt = None,
) -> None:
    """Write a Serve config for `serve deploy` / `serve run` / a KubeRay RayService."""
    from ray_mgdspr.config import ConfigError
    from ray_mgdspr.serve.app import write_serve_config

    try:
        path = write_serve_config(_args(config, {}), out)
    except (ConfigError, ValueError) as e:
        raise fail(str(e)) from None
    console.print(f"wrote {path}: `serve deploy {path}` (on a running Ray) or `serve run {path}`")


def _call(url: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 600) -> dict:
    """One JSON request; an HTTP error ends the command with the server's message."""
    from ray_mgdspr.serve.client import EndpointError, call

    try:
        return call(url, path, body, token, timeout)
    except EndpointError as e:
        raise fail(str(e), code=1) from None


@serve_app.command("promote")
def serve_promote(
    version: Annotated[str, typer.Argument(help="index/model version id to serve")],
    url: UrlOpt = DEFAULT_URL,
    token: Annotated[str | None, typer.Option(help="bearer token", envvar="MGDSPR_SERVE_TOKEN")] = None,
) -> None:
    """Load VERSION beside the serving one and switch to it without downtime (refused if it fails checks)."""
    info = _call(url, "/v1/admin/promote", {"version": version}, token)
    console.print(f"serving {info['version']} (was {info['previous']}); {info['previous']} drains and is removed")


@serve_app.command("status")
def serve_status(url: UrlOpt = DEFAULT_URL) -> None:
    """Which version serves, what is loading or draining, the last refusal."""
    console.print_json(data=_call(url, "/v1/version"))


def query_command(
    text: Annotated[str, typer.Argument(help="the query")],
    user: Annotated[int | None, typer.Option(help="user id (personalisation)")] = None,
    k: Annotated[int, typer.Option(help="results per channel")] = 10,
    filter_: Annotated[bool, typer.Option("--filter/--no-filter", help="relevance control")] = True,
    lexical: Annotated[bool, typer.Option(help="add the BM25 lexical channel")] = False,
    ts: Annotated[int | None, typer.Option(help="request time, epoch ms (replay a logged search: the user's "
                                           "histories are read as of then; default now)")] = None,
    url: UrlOpt = DEFAULT_URL,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw response")] = False,
) -> None:
    """Ask the retrieval endpoint (`mgdspr serve`) for a query's items."""
    body = {"query": text, "user_id": user, "k": k, "filter": filter_,
            "channels": ["embedding", "lexical"] if lexical else ["embedding"]}
    if ts is not None:
        body["ts"] = ts
    r = _call(url, "/v1/retrieve", body)
    if as_json:
        console.print_json(data=r)
        return
    t = Table(title=escape(f"'{text}' -> {r['count']} items from version {r['version']} "
                           f"(filtered {r['filtered']}; key terms {r['key_terms']}"
                           + (f"; the {r['fallback']} fallback added {r['fallback_added']}" if r.get("fallback")
                              else "") + ")"), title_justify="left")
    for col in ("#", "item", "channels", "score", "title"):
        t.add_column(col)
    for i, item in enumerate(r["data"], 1):
        score = item["scores"].get("embedding", item["scores"].get("lexical", 0.0))
        t.add_row(str(i), str(item["item_id"]), "+".join(item["channels"]), f"{score:.3f}", escape(item["title"]))
    console.print(t)
    console.print("latency ms: " + ", ".join(f"{s} {v:.1f}" for s, v in r["latency_ms"].items()))


@store_app.command("build")
def store_build(
    world: Annotated[Path, typer.Option(help="world whose behaviours and query history to load")],
    out: Annotated[Path, typer.Option(help="SQLite store file")] = Path("runs/store/behaviours.sqlite"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing store")] = False,
    redis_url: Annotated[str | None, typer.Option(help="load into this Redis instead (redis://host:port/db)")] = None,
) -> None:
    """Build the behaviour store from a world's logs (SQLite file, written atomically; or into Redis)."""
    from ray_mgdspr.config import FeatureConfig
    from ray_mgdspr.serve.store import RedisStore, build_sqlite_store

    try:
        if redis_url:
            counts = RedisStore(redis_url, FeatureConfig()).load_world(world)
            where = redis_url
        else:
            counts = build_sqlite_store(world, out, overwrite=overwrite)
            where = str(out)
    except (FileExistsError, ValueError) as e:
        raise fail(str(e)) from None
    console.print(f"behaviour store {where}: {counts['behaviours']:,} behaviours, {counts['queries']:,} past "
                  f"queries from {world}")


@store_app.command("upgrade")
def store_upgrade(
    path: Annotated[Path, typer.Argument(help="SQLite store file")] = Path("runs/store/behaviours.sqlite"),
) -> None:
    """Bring a SQLite store built by an earlier release to this format in place (covering indexes), while it
    is served: readers go on, an append waits for it."""
    import sqlite3

    from ray_mgdspr.serve.store import FORMAT, upgrade_sqlite_store

    try:
        changed = upgrade_sqlite_store(path)
    except FileNotFoundError as e:
        raise fail(str(e)) from None
    except sqlite3.DatabaseError as e:
        raise fail(f"{path}: not a SQLite behaviour store ({e})") from None
    console.print(f"behaviour store {path}: " + (f"upgraded to format {FORMAT}" if changed
                                                    else f"already format {FORMAT}, nothing to do"))
