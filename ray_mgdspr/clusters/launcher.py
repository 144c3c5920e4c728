"""Ray cluster launcher specs (``provider:``): Ray's own schema, offline, exactly as ``ray up`` checks it
(``ray.autoscaler._private.util.prepare_config`` then ``validate_config``; private API, pinned by
``tests/test_clusters.py``), every schema error of the file as written (with its field path), and the project's
rules: per node type ``min_workers <= max_workers``, the local provider without node types, a setup command that
installs the project, ``RAY_AUTH_MODE`` stated in every ``ray start``, the dashboard on, and the fit of the
project config named in ``metadata.mgdspr_config``."""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_mgdspr.clusters.common import NodeGroup, field_path, fit_problems, load_project

KIND = "launcher"
CONFIG_METADATA = "mgdspr_config"  # metadata.mgdspr_config: the project config the cluster is sized for


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger's INFO chatter (prepare_config logs each default it fills)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _schema_problems(doc: dict[str, Any], source: str) -> list[str]:
    """Every error of Ray's cluster JSON schema in the file as written, with the field it is at."""
    import jsonschema
    import ray.autoscaler

    # the file validate_config reads (ray/autoscaler/ray-schema.json)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = []
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.path))):
        path = list(e.absolute_path)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            known = list(e.schema.get("properties", {}))
            patterns = list(e.schema.get("patternProperties", {}))
            for key in e.instance:
                if key in known or any(re.match(p, key) for p in patterns):
                    continue
                hint = difflib.get_close_matches(key, known, n=1)
                why = f"unknown key (did you mean {hint[0]!r}?)" if hint else "unknown key (not in Ray's schema)"
                problems.append(f"{source}: {field_path(*path, key)}: {why}")
        else:
            problems.append(f"{source}: {field_path(*path)}: {e.message}")
    return problems


def _ray_start_problems(doc: dict[str, Any], source: str) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, cmd in enumerate(doc.get(key) or []):
            if not isinstance(cmd, str) or "ray start" not in cmd:
                continue
            if "RAY_AUTH_MODE=" not in cmd:
                problems.append(f"{source}: {field_path(key, i)}: `ray start` without RAY_AUTH_MODE: state it "
                                "(token, with the token file mounted on every node, or disabled); once "
                                "~/.ray/auth_token exists Ray turns token auth on by itself")
            if "--include-dashboard=false" in cmd.replace(" ", "="):
                problems.append(f"{source}: {field_path(key, i)}: the dashboard is off; Ray Jobs and the "
                                "Train state API need it")
        if key == "head_start_ray_commands" and doc.get(key) and not any(
                isinstance(c, str) and "ray start" in c and "--head" in c for c in doc[key]):
            problems.append(f"{source}: {key}: no `ray start --head` command")
    return problems


def _installs_project(doc: dict[str, Any]) -> bool:
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in doc.get(key) or []]
    commands += [c for t in (doc.get("available_node_types") or {}).values() if isinstance(t, dict)
                 for c in t.get("worker_setup_commands") or []]
    return any(isinstance(c, str) and "pip install" in c and ("ray-mgdspr" in c or "ray_mgdspr" in c)
               for c in commands)


def _shape_problems(doc: dict[str, Any], source: str) -> list[str]:
    """What Ray's schema cannot say: a local provider's hosts and no node types; min_workers <= max_workers."""
    problems = []
    provider = doc.get("provider")
    if isinstance(provider, dict) and provider.get("type") == "local":
        for key in ("available_node_types", "head_node_type", "head_node", "worker_nodes"):
            if key in doc:
                problems.append(f"{source}: {key}: not allowed with provider.type local (Ray rejects it: "
                                "node resources are detected on each host)")
        if "coordinator_address" not in provider:
            if not isinstance(provider.get("head_ip"), str):
                problems.append(f"{source}: provider.head_ip: required for a local cluster")
            if not isinstance(provider.get("worker_ips"), list):
                problems.append(f"{source}: provider.worker_ips: required for a local cluster (a list of hosts)")
    node_types = doc.get("available_node_types")
    for name, node in (node_types.items() if isinstance(node_types, dict) else []):
        if isinstance(node, dict) and isinstance(node.get("min_workers"), int) \
                and isinstance(node.get("max_workers"), int) and node["min_workers"] > node["max_workers"]:
            problems.append(f"{source}: {field_path('available_node_types', name, 'min_workers')}: "
                            f"{node['min_workers']} > max_workers {node['max_workers']}")
    return problems


def _prepared(doc: dict[str, Any], source: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The spec as ``ray up`` sees it (Ray's defaults filled in, then ``validate_config``), or Ray's objection."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with _quiet("ray.autoscaler._private.util"):
            prepared = prepare_config(copy.deepcopy(doc))
            validate_config(prepared)
    except jsonschema.ValidationError as e:
        return None, [f"{source}: {field_path(*e.absolute_path)}: {e.message} (Ray's schema, after defaults)"]
    except (ValueError, RuntimeError, KeyError, TypeError, click.ClickException) as e:
        field = next((k for k in ("head_node_type", "max_workers", "min_workers", "provider")
                      if k in str(e)), "(cluster)")
        return None, [f"{source}: {field}: {e} (Ray's validate_config)"]
    return prepared, []


def _sizing_problems(doc: dict[str, Any], prepared: dict[str, Any], source: str, root: Path) -> list[str]:
    """Whether the project config named in ``metadata.mgdspr_config`` fits the cluster's node types."""
    metadata = doc.get("metadata") or {}
    if CONFIG_METADATA not in metadata:
        return []
    field = f"metadata.{CONFIG_METADATA}"
    cfg, problems = load_project(metadata[CONFIG_METADATA], root, source, field)
    if cfg is None:
        return problems
    if prepared["provider"].get("type") == "local":
        return [*problems, f"{source}: {field}: a local cluster's node resources are detected on the hosts, so "
                           "its fit cannot be checked here"]
    nodes = {name: NodeGroup({r: float(v) for r, v in t["resources"].items()},
                             1 if name == prepared["head_node_type"] else int(t["max_workers"]))
             for name, t in prepared["available_node_types"].items()}
    return problems + fit_problems(nodes, cfg, source, field)


def validate_launcher(doc: dict[str, Any], source: str, root: Path) -> list[str]:
    """Problems of a Ray cluster launcher spec (see the module docstring)."""
    problems = _schema_problems(doc, source) + _shape_problems(doc, source)
    if problems:  # prepare_config assumes a well-formed spec
        return problems
    prepared, problems = _prepared(doc, source)
    if prepared is None:
        return problems
    if not _installs_project(doc):
        problems.append(f"{source}: setup_commands: no command installs the project (`pip install -e "
                        "~/ray-mgdspr` of the synced checkout, or `pip install \"ray-mgdspr @ git+URL\"`)")
    return problems + _ray_start_problems(doc, source) + _sizing_problems(doc, prepared, source, root)
