"""Serve configs (``applications:``, as ``mgdspr serve config`` writes; standalone or a RayService's
``serveConfigV2``): Ray Serve's own schema (``ray.serve.schema.ServeDeploySchema``), the import path
``ray_mgdspr.serve.app:build_app``, its ``args`` as ``AppArgs`` and ``args.serve`` as ``ServeConfig`` fields
merged over the named config's ``serve:`` section; and project configs (stage sections only)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ray_mgdspr.clusters.common import (
    IMPORT_PATH,
    NodeGroup,
    field_path,
    fit_problems,
    load_project,
    pydantic_problems,
)
from ray_mgdspr.config import DEFAULT_CONFIG, ConfigError, ServeConfig, parse_config

KIND = "serve-config"
PROJECT_KIND = "project-config"


def _application_problems(app: dict[str, Any], afield: tuple[str | int, ...], source: str, root: Path,
                          nodes: dict[str, NodeGroup] | None) -> list[str]:
    """One application of a Serve config: the project's import path, ``args`` as ``AppArgs``, ``args.serve``
    merged over the named config's ``serve:`` as the endpoint merges them, and its replicas' fit."""
    from ray_mgdspr.serve.app import AppArgs, merged_serve

    if app.get("import_path") != IMPORT_PATH:
        return [f"{source}: {field_path(*afield, 'import_path')}: unknown import path {app.get('import_path')!r}; "
                f"the project's app is {IMPORT_PATH}"]
    args = app.get("args") or {}
    if not isinstance(args, dict):
        return [f"{source}: {field_path(*afield, 'args')}: expected a mapping"]
    problems = []
    for key in args:
        if key not in AppArgs.model_fields:
            hint = difflib.get_close_matches(key, list(AppArgs.model_fields), n=1)
            problems.append(f"{source}: {field_path(*afield, 'args', key)}: unknown key"
                            + (f" (did you mean {hint[0]!r}?)" if hint else f" (AppArgs: "
                               f"{', '.join(AppArgs.model_fields)})"))
    try:
        app_args = AppArgs.model_validate(args)
    except ValidationError as e:
        return problems + pydantic_problems(e, source, field_path(*afield, "args"))
    # what ray_mgdspr.serve.app.resolve runs: the named config, else the default every entry point uses
    project, load_problems = load_project(app_args.config or DEFAULT_CONFIG, root, source,
                                          field_path(*afield, "args", "config"))
    if project is None:
        return problems + load_problems
    try:
        ServeConfig.model_validate(app_args.serve)  # the overrides alone, so a problem names args.serve's key
        merged = merged_serve(project, app_args.serve)
    except ValidationError as e:
        return problems + pydantic_problems(e, source, field_path(*afield, "args", "serve"))
    if nodes:
        sized = project.model_copy(update={"serve": merged})
        problems += fit_problems(nodes, sized, source, field_path(*afield, "args"), ("serve",))
    return problems


def validate_serve_config(doc: Any, source: str, root: Path, prefix: str = "",
                          nodes: dict[str, NodeGroup] | None = None, exposed: bool = False) -> list[str]:
    """Problems of a Serve config: Ray Serve's schema, then the project's application and its args.

    Args:
        doc: the parsed Serve config.
        source, prefix: file and field path the config sits at (``spec.serveConfigV2`` in a RayService).
        root: the checkout whose configs ``args.config`` names.
        nodes: the cluster's node groups, to check that every deployment's replicas fit.
        exposed: served behind a Kubernetes service: the proxy must listen on 0.0.0.0.
    """
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(doc, dict):
        return [f"{source}: {field_path(prefix)}: expected a Serve config mapping, got {type(doc).__name__}"]
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        return pydantic_problems(e, source, prefix)
    problems = []
    host = (doc.get("http_options") or {}).get("host")
    if exposed and host not in (None, "0.0.0.0"):
        problems.append(f"{source}: {field_path(prefix, 'http_options', 'host')}: {host!r}: the Kubernetes service "
                        "cannot reach a proxy bound there; use 0.0.0.0 (serve.host in the config)")
    apps = doc["applications"]
    if not any(a.get("import_path") == IMPORT_PATH for a in apps):
        problems.append(f"{source}: {field_path(prefix, 'applications')}: no application runs {IMPORT_PATH}")
    for i, app in enumerate(apps):
        problems += _application_problems(app, (prefix, "applications", i), source, root, nodes)
    return problems


def validate_project_config(doc: dict[str, Any], source: str) -> list[str]:
    """Problems of a project config (``ray_mgdspr.config``), one per line."""
    try:
        parse_config(doc, source)
    except ConfigError as e:
        return str(e).splitlines()
    return []
