"""The retrieval endpoint's app builder, its Serve config file, and running it from the CLI.

``serve run ray_mgdspr.serve.app:build_app config=configs/my.yaml`` and ``serve deploy`` of the file
``mgdspr serve config`` writes both go through ``build_app``; ``mgdspr serve`` does the same on a local Ray.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ray_mgdspr.artifacts import write_text_atomic
from ray_mgdspr.config import ProjectConfig, ResolvedServeConfig, ServeConfig, resolve_config
from ray_mgdspr.index.versions import current_version
from ray_mgdspr.serve.ingress import Ingress
from ray_mgdspr.serve.store import build_sqlite_store
from ray_mgdspr.serve.versions import VersionManager

log = logging.getLogger(__name__)
IMPORT_PATH = "ray_mgdspr.serve.app:build_app"
LOGGING = {"enable_access_log": False}  # a line per request (and per version poll) drowns everything else


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in a Serve config's args is an error, not ignored

    config: str | None = Field(None, description="project config YAML, or preset:NAME (default: "
                               "config.DEFAULT_CONFIG, as for every entry point)")
    serve: dict[str, Any] = Field(default_factory=dict, description="overrides of the config's serve section")


def merged_serve(project: ProjectConfig, overrides: dict[str, Any]) -> ServeConfig:
    """The project's ``serve:`` section with ``overrides`` (a Serve config's ``args.serve``) replacing whole keys."""
    return ServeConfig.model_validate({**project.serve.model_dump(exclude_unset=True), **overrides})


def resolve(args: AppArgs) -> ResolvedServeConfig:
    """The serve section of ``args.config`` with ``args.serve`` applied, resolved (``ServeConfig.resolved``), its
    paths made absolute: what every deployment of the endpoint and a ``Retriever`` of it run with."""
    project = resolve_config(args.config)
    cfg = merged_serve(project, args.serve).resolved(project)
    for field in ("index_root", "world"):
        setattr(cfg, field, str(Path(getattr(cfg, field)).resolve()))
    if "://" not in cfg.store:
        cfg.store = str(Path(cfg.store).resolve())
    return cfg


def ensure_store(cfg: ResolvedServeConfig) -> None:
    """Build the SQLite behaviour store from the world's logs when it does not exist yet."""
    if "://" in cfg.store or Path(cfg.store).is_file():
        return
    log.info("building the behaviour store %s from %s", cfg.store, cfg.world)
    build_sqlite_store(cfg.world, cfg.store)


def build_app(args: AppArgs | dict[str, Any]) -> serve.Application:
    """The front application: the HTTP ingress and the version manager (which deploys the versions).

    ``serve deploy`` / ``serve run`` of a config file pass the application's ``args`` as a plain dict."""
    cfg = resolve(AppArgs.model_validate(args))
    ensure_store(cfg)
    settings = cfg.model_dump()
    manager = VersionManager.options(ray_actor_options={"num_cpus": 0.05}).bind(settings)  # idle but for swaps
    return Ingress.options(**cfg.ingress.serve_options()).bind(settings, manager)


def serve_config(args: AppArgs, cfg: ResolvedServeConfig) -> dict[str, Any]:
    """A Serve config (``serve deploy`` / ``serve run`` / a KubeRay RayService ``serveConfigV2``)."""
    return {
        "proxy_location": cfg.proxy_location,
        "http_options": {"host": cfg.host, "port": cfg.port},
        "logging_config": {"enable_access_log": False},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": args.model_dump(exclude_defaults=True),
        }],
    }


def write_serve_config(args: AppArgs, out: str | Path) -> Path:
    return write_text_atomic(out, yaml.safe_dump(serve_config(args, resolve(args)), sort_keys=False))


def local_url(cfg: ResolvedServeConfig) -> str:
    """The endpoint's URL from this machine (loopback when it listens on every interface)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}"


def wait_ready(cfg: ResolvedServeConfig) -> None:
    """Wait until the endpoint answers its readiness probe (``GET /healthz``: a version is loaded), asking over
    HTTP as a load balancer would (a deployment handle here would tie this process's event loop to Serve's router,
    which ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` runs in the caller's loop).

    Raises:
        RuntimeError: the first version failed to load (the version manager's error, as ``GET /v1/version``
            shows it). TimeoutError: not ready within ``serve.load_timeout_s``.
    """
    base = local_url(cfg)
    deadline = time.monotonic() + cfg.load_timeout_s
    with httpx.Client(base_url=base, timeout=cfg.request_timeout_s + 5) as http:
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    return
                info = http.get("/v1/version").json()
                if info.get("version") is None and info.get("last_error"):
                    raise RuntimeError(f"the first version failed to load: {info['last_error']}")
            except (httpx.HTTPError, ValueError) as e:
                log.debug("not ready yet: %s", e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base}/healthz did not answer 200 within serve.load_timeout_s="
                                   f"{cfg.load_timeout_s} s")
            time.sleep(0.2)


def start(args: AppArgs, wait: bool = True) -> ResolvedServeConfig:
    """Start Serve's HTTP proxy on the configured address and deploy the app; returns the resolved config.

    Needs a connected Ray (``runtime.connect_ray``). Returns once the front application runs and (``wait``) the
    first version answers ``/healthz`` (``wait_ready``).
    """
    cfg = resolve(args)
    if cfg.version is None and current_version(cfg.index_root) is None:
        raise FileNotFoundError(f"nothing to serve: the index root {cfg.index_root} has no CURRENT version; build "
                                "one (`mgdspr pipeline`, `mgdspr index build`), set serve.index_root, or, after "
                                "`make demo`, serve the demo with `mgdspr serve -c runs/demo/config.yaml`")
    serve.start(proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port},
                logging_config=LOGGING)
    serve.run(build_app(args), name=cfg.app_name, route_prefix="/", logging_config=LOGGING)
    if wait:
        wait_ready(cfg)  # the manager loads the first version on its first call: now, not on a user's request
    return cfg
