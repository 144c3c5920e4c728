"""Validate the cluster specs in ``clusters/``: ``mgdspr cluster validate FILE...``.

A file's kind is read from its content:

* **Ray cluster launcher spec** (``provider:``): Ray's own schema, offline, exactly as ``ray up`` checks it
  (``ray.autoscaler._private.util.prepare_config`` then ``validate_config``; private API, pinned by
  ``tests/test_clusters.py``), every schema error of the file as written (with its field path), and the
  project's rules: per node type ``min_workers <= max_workers``, the local provider without node types,
  a setup command that installs the project, ``RAY_AUTH_MODE`` stated in every ``ray start``, the dashboard on.
* **KubeRay manifest** (``apiVersion: ray.io/v1``, ``kind: RayCluster | RayJob | RayService``): the fields the
  project relies on (name, head group with ``rayStartParams`` and a container with image and resources,
  worker groups with ``minReplicas <= replicas <= maxReplicas``, ``num-cpus``/``num-gpus`` within the
  containers' limits, ``RAY_AUTH_MODE`` set, a RayJob entrypoint that runs an existing ``jobs/*.py``), and a
  RayService's ``serveConfigV2`` as a Serve config (below).
* **Serve config** (``applications:``, as ``mgdspr serve config`` writes): Ray Serve's own schema
  (``ray.serve.schema.ServeDeploySchema``), the import path ``ray_mgdspr.serve.app:build_app``, its ``args`` as
  ``AppArgs`` and ``args.serve`` as ``ServeConfig`` fields merged over the named config's ``serve:`` section.
* **Project config** (only stage sections such as ``train:``, ``serve:``): ``ray_mgdspr.config.load_config``.
* **Monitoring** (a Grafana dashboard, a Prometheus scrape config, a PodMonitor): ``ray_mgdspr/monitoring.py``.

Specs sized for a project config name it (launcher: ``metadata.mgdspr_config``; KubeRay: the annotation
``mgdspr/config``, a RayJob's ``--config``, a RayService's ``args.config``); every resource request of that
config (a DDP worker, a featurizer or item-tower actor, an index build task, each Serve replica) must then
fit on one node type, and as many as the config asks for must fit in the cluster at its largest.

Every problem is one line ``FILE: FIELD: message``. Nothing here starts Ray or touches the network.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from ray_mgdspr.config import ConfigError, ProjectConfig, ServeConfig, load_config, parse_config
from ray_mgdspr.monitoring import GRAFANA, PODMONITOR, PROMETHEUS, detect_monitoring_kind, validate_monitoring

IMPORT_PATH = "ray_mgdspr.serve.app:build_app"  # == ray_mgdspr.serve.app.IMPORT_PATH (a test ties them)
IMAGE_ROOT = "/home/ray/ray-mgdspr"  # where clusters/docker/Dockerfile puts the repository in the image
CONFIG_ANNOTATION = "mgdspr/config"  # KubeRay: the project config a RayCluster is sized for
CONFIG_METADATA = "mgdspr_config"  # launcher: metadata.mgdspr_config, the same
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
MONITORING_KINDS = (GRAFANA, PROMETHEUS, PODMONITOR)
KUBERAY_API = "ray.io/v1"

LAUNCHER = "launcher"
SERVE_CONFIG = "serve-config"
PROJECT_CONFIG = "project-config"
STAGES = ("train", "embed", "index", "serve")
JOB_STAGES = {"train": ("train",), "build_index": ("embed", "index"), "evaluate": (),
              "pipeline": ("train", "embed", "index")}


# --------------------------------------------------------------------------------------------------
# reading files


def _repo_root(path: Path) -> Path:
    """The checkout a spec belongs to: the nearest parent with this project's pyproject.toml (else cwd)."""
    for parent in path.resolve().parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file() and 'name = "ray-mgdspr"' in pyproject.read_text():
            return parent
    return Path.cwd()


def load_documents(path: Path, source: str) -> tuple[list[Any], list[str]]:
    """The YAML documents of ``path``, or the problems that prevent reading it (with line and column)."""
    try:
        text = path.read_text()
    except OSError as e:
        return [], [f"{source}: cannot read: {e.strerror or e}"]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        reason = " ".join(str(x) for x in (e.context, e.problem) if x)
        return [], [f"{source}{where}: not valid YAML: {reason}"]
    except yaml.YAMLError as e:
        return [], [f"{source}: not valid YAML: {e}"]
    if not docs:
        return [], [f"{source}: empty file"]
    return docs, []


def detect_kind(doc: Any) -> str | None:
    """``launcher``, ``RayCluster``/``RayJob``/``RayService``, ``serve-config``, ``project-config``, a monitoring
    file's kind (``monitoring.py``: Grafana dashboard, Prometheus config, PodMonitor) or None."""
    if not isinstance(doc, dict):
        return None
    if monitoring := detect_monitoring_kind(doc):
        return monitoring
    if "apiVersion" in doc or "kind" in doc:
        return doc.get("kind") if doc.get("kind") in KUBERAY_KINDS else None
    if "provider" in doc:
        return LAUNCHER
    if "applications" in doc:
        return SERVE_CONFIG
    if doc and set(doc) <= set(ProjectConfig.model_fields):
        return PROJECT_CONFIG
    return None


def _field(*parts: str | int) -> str:
    """``a.b[0].c`` from path parts."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p != "":
            out += f".{p}" if out else str(p)
    return out or "(top level)"


# --------------------------------------------------------------------------------------------------
# resources: does every request of a project config fit on the cluster's nodes?


@dataclass(frozen=True)
class NodeGroup:
    """One kind of node: Ray resources per node and how many of them the cluster may have at most."""

    resources: dict[str, float]
    max_count: int


def _per_node(bundle: dict[str, float], node: dict[str, float]) -> float:
    """How many ``bundle``s one node holds (inf for a bundle that asks for nothing)."""
    counts = [math.floor(node.get(r, 0.0) / need + 1e-9) for r, need in bundle.items() if need > 0]
    return min(counts) if counts else math.inf


def _fmt(resources: dict[str, float]) -> str:
    """``{CPU: 4, GPU: 0.5}``: resources as a reader writes them.

    >>> _fmt({"CPU": 4.0, "GPU": 0.5})
    '{CPU: 4, GPU: 0.5}'
    """
    return "{" + ", ".join(f"{r}: {v:g}" for r, v in resources.items()) + "}"


def _requests(cfg: ProjectConfig, stages: tuple[str, ...]) -> Iterator[tuple[str, dict[str, float], int]]:
    """(config field, resources of one unit, units the stage runs at once) for each stage's work."""
    if "train" in stages:
        t = cfg.train
        yield "train.resources_per_worker", dict(t.resources_per_worker), t.num_workers
        yield "data.featurize_cpus", {"CPU": cfg.data.featurize_cpus}, cfg.data.featurize_actors
        yield "data.read_cpus", {"CPU": cfg.data.read_cpus}, 1
    if "embed" in stages:
        e = cfg.embed
        yield "embed", {"CPU": e.cpus_per_actor, "GPU": e.gpus_per_actor}, e.actors
    if "index" in stages:
        yield "index.build_cpus", {"CPU": cfg.index.build_cpus, **cfg.index.build_resources}, 1
    if "serve" in stages:
        s = cfg.serve
        for name in ("ingress", "encoder", "shard", "head"):
            d = getattr(s, name)
            count = d.min_replicas * (cfg.index.shards if name == "shard" else 1)
            yield f"serve.{name}", {"CPU": d.num_cpus, "GPU": d.num_gpus, **d.resources}, count


def fit_problems(nodes: dict[str, NodeGroup], cfg: ProjectConfig, source: str, field: str,
                 stages: tuple[str, ...] = STAGES) -> list[str]:
    """Requests of ``cfg`` that no node type can hold, or that the cluster at its largest cannot run at once.

    Args:
        nodes: node type name -> its resources and largest count.
        cfg: the project config the cluster is sized for.
        source, field: where the config was named (for the messages).
        stages: which stages' requests to check (a RayJob running jobs/train.py: only ``train``).
    """
    problems = []
    shape = ", ".join(f"{n} {_fmt(g.resources)} x{g.max_count}" for n, g in nodes.items())
    for name, bundle, count in _requests(cfg, stages):
        bundle = {r: v for r, v in bundle.items() if v > 0}
        fits = {n: _per_node(bundle, g.resources) for n, g in nodes.items()}
        if not any(f >= 1 for f in fits.values()):
            problems.append(f"{source}: {field}: {name} asks for {_fmt(bundle)} per unit, more than any node type "
                            f"has ({shape}); lower it or add a larger node type")
            continue
        capacity = sum(min(f, count) * nodes[n].max_count for n, f in fits.items())
        if capacity < count:
            problems.append(f"{source}: {field}: {name}: {count} x {_fmt(bundle)} do not fit in the cluster at its "
                            f"largest ({shape}: room for {int(capacity)}); raise max workers or lower the count")
    return problems


def _resolve_config(ref: str, root: Path) -> Path | str:
    """Where a config named in a spec is in this checkout (``preset:NAME`` is returned as is)."""
    if ref.startswith("preset:"):
        return ref
    p = Path(ref)
    if p.is_absolute() and (ref == IMAGE_ROOT or ref.startswith(IMAGE_ROOT + "/")):
        return root / Path(ref).relative_to(IMAGE_ROOT)
    return p if p.is_absolute() else root / p


def _load_project(ref: Any, root: Path, source: str, field: str) -> tuple[ProjectConfig | None, list[str]]:
    """Load the project config a spec names; problems name the spec's file and field."""
    if not isinstance(ref, str) or not ref:
        return None, [f"{source}: {field}: expected a config path or preset:NAME, got {ref!r}"]
    where = _resolve_config(ref, root)
    try:
        return load_config(where), []
    except ConfigError as e:
        return None, [f"{source}: {field}: {ref!r}: {line}" for line in str(e).splitlines()]


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher specs


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
                problems.append(f"{source}: {_field(*path, key)}: {why}")
        else:
            problems.append(f"{source}: {_field(*path)}: {e.message}")
    return problems


def _ray_start_problems(doc: dict[str, Any], source: str) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, cmd in enumerate(doc.get(key) or []):
            if not isinstance(cmd, str) or "ray start" not in cmd:
                continue
            if "RAY_AUTH_MODE=" not in cmd:
                problems.append(f"{source}: {_field(key, i)}: `ray start` without RAY_AUTH_MODE: state it "
                                "(token, with the token file mounted on every node, or disabled); once "
                                "~/.ray/auth_token exists Ray turns token auth on by itself")
            if "--include-dashboard=false" in cmd.replace(" ", "="):
                problems.append(f"{source}: {_field(key, i)}: the dashboard is off; Ray Jobs and the "
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


def validate_launcher(doc: dict[str, Any], source: str, root: Path) -> list[str]:
    """Problems of a Ray cluster launcher spec (see the module docstring)."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = doc.get("provider")
    is_local = isinstance(provider, dict) and provider.get("type") == "local"
    problems = _schema_problems(doc, source)
    if is_local:
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
            problems.append(f"{source}: {_field('available_node_types', name, 'min_workers')}: "
                            f"{node['min_workers']} > max_workers {node['max_workers']}")
    if problems:  # prepare_config assumes a well-formed spec
        return problems

    try:
        with _quiet("ray.autoscaler._private.util"):
            prepared = prepare_config(copy.deepcopy(doc))
            validate_config(prepared)
    except jsonschema.ValidationError as e:
        return [f"{source}: {_field(*e.absolute_path)}: {e.message} (Ray's schema, after defaults)"]
    except (ValueError, RuntimeError, KeyError, TypeError, click.ClickException) as e:
        field = next((k for k in ("head_node_type", "max_workers", "min_workers", "provider")
                      if k in str(e)), "(cluster)")
        return [f"{source}: {field}: {e} (Ray's validate_config)"]

    if not _installs_project(doc):
        problems.append(f"{source}: setup_commands: no command installs the project (`pip install -e "
                        "~/ray-mgdspr` of the synced checkout, or `pip install \"ray-mgdspr @ git+URL\"`)")
    problems += _ray_start_problems(doc, source)

    metadata = doc.get("metadata") or {}
    if CONFIG_METADATA in metadata:
        field = f"metadata.{CONFIG_METADATA}"
        cfg, load_problems = _load_project(metadata[CONFIG_METADATA], root, source, field)
        problems += load_problems
        if cfg is not None and is_local:
            problems.append(f"{source}: {field}: a local cluster's node resources are detected on the hosts, "
                            "so its fit cannot be checked here")
        elif cfg is not None:
            nodes = {name: NodeGroup({r: float(v) for r, v in t["resources"].items()},
                                     1 if name == prepared["head_node_type"] else int(t["max_workers"]))
                     for name, t in prepared["available_node_types"].items()}
            problems += fit_problems(nodes, cfg, source, field)
    return problems


# --------------------------------------------------------------------------------------------------
# KubeRay manifests


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def k8s_quantity(value: Any) -> float | None:
    """A Kubernetes quantity as a number (``"500m"`` -> 0.5, ``"16Gi"`` -> 17179869184), None if not one.

    >>> k8s_quantity("500m"), k8s_quantity(4), k8s_quantity("2Gi"), k8s_quantity("lots")
    (0.5, 4.0, 2147483648.0, None)
    """
    m = _QUANTITY.match(str(value).strip())
    return float(m.group(1)) * _SUFFIX[m.group(2)] if m else None


def _group_problems(group: Any, source: str, field: str, head: bool) -> tuple[list[str], dict[str, float]]:
    """Problems of a head group or worker group, and the Ray resources one of its pods offers."""
    if not isinstance(group, dict):
        return [f"{source}: {field}: expected a mapping"], {}
    problems: list[str] = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        problems.append(f"{source}: {field}.rayStartParams: required (a mapping of `ray start` flags)")
        params = {}
    for key, value in params.items():
        if not isinstance(value, str):
            problems.append(f"{source}: {field}.rayStartParams.{key}: must be a string (KubeRay's "
                            f"map[string]string), got {value!r}: quote it")
    if str(params.get("include-dashboard", "true")).lower() == "false":
        problems.append(f"{source}: {field}.rayStartParams.include-dashboard: the dashboard is off; KubeRay "
                        "submits jobs and Serve configs through it")
    template = group.get("template")
    pod = template.get("spec") if isinstance(template, dict) else None
    containers = pod.get("containers") if isinstance(pod, dict) else None
    cfield = f"{field}.template.spec.containers"
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
        return [*problems, f"{source}: {cfield}: required (the Ray container first)"], {}
    ray_container = containers[0]
    cfield += "[0]"
    if not isinstance(ray_container.get("image"), str) or not ray_container["image"]:
        problems.append(f"{source}: {cfield}.image: required (the project's image: clusters/docker/Dockerfile)")
    env = {e.get("name"): e for e in ray_container.get("env") or [] if isinstance(e, dict)}
    if "RAY_AUTH_MODE" not in env:
        problems.append(f"{source}: {cfield}.env: set RAY_AUTH_MODE explicitly (disabled behind a ClusterIP "
                        "service, or token with the token in every pod)")
    resources = ray_container.get("resources")
    if not isinstance(resources, dict) or not isinstance(resources.get("limits"), dict):
        problems.append(f"{source}: {cfield}.resources.limits: required (cpu, memory; nvidia.com/gpu for GPUs)")
        return problems, {}
    limits = resources["limits"]
    requests = resources.get("requests") or {}
    for key, value in {**limits, **requests}.items():
        if k8s_quantity(value) is None:
            part = "limits" if key in limits else "requests"
            problems.append(f"{source}: {cfield}.resources.{part}.{key}: not a quantity: {value!r}")
    for key, value in requests.items():
        lim, req = k8s_quantity(limits.get(key)), k8s_quantity(value)
        if lim is not None and req is not None and req > lim:
            problems.append(f"{source}: {cfield}.resources.requests.{key}: {value} > limit {limits[key]}")
    for res in ("cpu", "memory"):
        if res not in limits:
            problems.append(f"{source}: {cfield}.resources.limits.{res}: required")

    cpu_limit = k8s_quantity(limits.get("cpu"))
    gpu_limit = k8s_quantity(limits.get("nvidia.com/gpu", 0)) or 0.0
    offered: dict[str, float] = {"CPU": math.floor(cpu_limit) if cpu_limit is not None else 0.0}
    if "num-cpus" in params:
        num_cpus = k8s_quantity(params["num-cpus"])
        if num_cpus is None:
            problems.append(f"{source}: {field}.rayStartParams.num-cpus: not a number: {params['num-cpus']!r}")
        elif cpu_limit is not None and num_cpus > cpu_limit:
            problems.append(f"{source}: {field}.rayStartParams.num-cpus: {params['num-cpus']} > the container's "
                            f"cpu limit {limits['cpu']} (Ray would schedule work the pod cannot run)")
        else:
            offered["CPU"] = num_cpus
    offered["GPU"] = gpu_limit
    if "num-gpus" in params:
        num_gpus = k8s_quantity(params["num-gpus"])
        if num_gpus is None or num_gpus != gpu_limit:
            problems.append(f"{source}: {field}.rayStartParams.num-gpus: {params['num-gpus']!r} but the "
                            f"container's nvidia.com/gpu limit is {limits.get('nvidia.com/gpu', 'unset')}")
        else:
            offered["GPU"] = num_gpus
    if head and params.get("dashboard-host") not in (None, "0.0.0.0"):
        problems.append(f"{source}: {field}.rayStartParams.dashboard-host: must be 0.0.0.0 so the operator "
                        "reaches the dashboard")
    return problems, offered


def _cluster_spec_problems(spec: Any, source: str, field: str) -> tuple[list[str], dict[str, NodeGroup]]:
    """Problems of a RayCluster spec (also a RayJob's rayClusterSpec, a RayService's rayClusterConfig)."""
    if not isinstance(spec, dict):
        return [f"{source}: {field}: required (a RayCluster spec)"], {}
    problems, nodes = [], {}
    if "headGroupSpec" not in spec:
        problems.append(f"{source}: {field}.headGroupSpec: required")
    else:
        head_problems, offered = _group_problems(spec["headGroupSpec"], source, f"{field}.headGroupSpec", True)
        problems += head_problems
        nodes["head"] = NodeGroup(offered, 1)
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    groups = spec.get("workerGroupSpecs") or []
    if not isinstance(groups, list):
        return [*problems, f"{source}: {field}.workerGroupSpecs: expected a list"], nodes
    seen = set()
    for i, group in enumerate(groups):
        gfield = f"{field}.workerGroupSpecs[{i}]"
        group_problems, offered = _group_problems(group, source, gfield, False)
        problems += group_problems
        if not isinstance(group, dict):
            continue
        name = group.get("groupName")
        if not isinstance(name, str) or not name:
            problems.append(f"{source}: {gfield}.groupName: required")
        elif name in seen:
            problems.append(f"{source}: {gfield}.groupName: {name!r} used twice")
        seen.add(name)
        counts = {}
        for key in ("replicas", "minReplicas", "maxReplicas"):
            value = group.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                problems.append(f"{source}: {gfield}.{key}: must be a non-negative integer, got {value!r}")
            elif value is not None:
                counts[key] = value
        lo, hi = counts.get("minReplicas", 0), counts.get("maxReplicas")
        if hi is not None and lo > hi:
            problems.append(f"{source}: {gfield}.minReplicas: {lo} > maxReplicas {hi}")
        elif "replicas" in counts and not lo <= counts["replicas"] <= (hi if hi is not None else counts["replicas"]):
            problems.append(f"{source}: {gfield}.replicas: {counts['replicas']} outside "
                            f"[minReplicas {lo}, maxReplicas {hi}]")
        largest = hi if autoscaling and hi is not None else counts.get("replicas", lo)
        nodes[str(name or i)] = NodeGroup(offered, largest)
    return problems, nodes


def _job_script(entrypoint: str, root: Path, source: str, field: str) -> tuple[str | None, str | None, list[str]]:
    """The jobs/*.py an entrypoint runs and its --config value, or the problems."""
    try:
        words = shlex.split(entrypoint)
    except ValueError as e:
        return None, None, [f"{source}: {field}: cannot split as a shell command: {e}"]
    scripts = [w for w in words if re.fullmatch(r"(\./)?jobs/\w+\.py", w)]
    if not scripts:
        return None, None, [f"{source}: {field}: runs no jobs/*.py script (e.g. `python jobs/train.py "
                            f"--config FILE`): {entrypoint!r}"]
    script = scripts[0].removeprefix("./")
    problems = []
    if not (root / script).is_file():
        existing = sorted(p.name for p in (root / "jobs").glob("*.py"))
        problems.append(f"{source}: {field}: {script} does not exist in {root} (jobs: {', '.join(existing)})")
    config = None
    for j, w in enumerate(words):
        if w in ("--config", "-c") and j + 1 < len(words):
            config = words[j + 1]
        elif w.startswith("--config="):
            config = w.split("=", 1)[1]
    return script, config, problems


def validate_kuberay(doc: dict[str, Any], source: str, root: Path) -> list[str]:
    """Problems of a KubeRay RayCluster, RayJob or RayService manifest."""
    kind = doc["kind"]
    problems = []
    if doc.get("apiVersion") != KUBERAY_API:
        problems.append(f"{source}: apiVersion: {doc.get('apiVersion')!r}, expected {KUBERAY_API!r}")
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = metadata.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        problems.append(f"{source}: metadata.name: required, lower-case letters, digits and '-' (got {name!r})")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return [*problems, f"{source}: spec: required"]

    cluster_key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[kind]
    nodes: dict[str, NodeGroup] = {}
    if kind == "RayJob" and cluster_key not in spec and "clusterSelector" in spec:
        pass  # runs on an existing RayCluster: nothing to size here
    else:
        cluster = spec if cluster_key is None else spec.get(cluster_key)
        cluster_problems, nodes = _cluster_spec_problems(cluster, source, _field("spec", cluster_key or ""))
        problems += cluster_problems

    annotations = metadata.get("annotations") or {}
    if CONFIG_ANNOTATION in annotations:
        field = f"metadata.annotations.{CONFIG_ANNOTATION}"
        cfg, load_problems = _load_project(annotations[CONFIG_ANNOTATION], root, source, field)
        problems += load_problems
        if cfg is not None and nodes:
            problems += fit_problems(nodes, cfg, source, field)

    if kind == "RayJob":
        entrypoint = spec.get("entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            problems.append(f"{source}: spec.entrypoint: required (e.g. python jobs/train.py --config FILE)")
        else:
            script, config, job_problems = _job_script(entrypoint, root, source, "spec.entrypoint")
            problems += job_problems
            if config is not None:
                cfg, load_problems = _load_project(config, root, source, "spec.entrypoint --config")
                problems += load_problems
                stages = JOB_STAGES.get(Path(script or "").stem, STAGES)
                if cfg is not None and nodes:
                    problems += fit_problems(nodes, cfg, source, "spec.entrypoint --config", stages)
        if "runtimeEnvYAML" in spec:
            try:
                env = yaml.safe_load(spec["runtimeEnvYAML"]) if isinstance(spec["runtimeEnvYAML"], str) else None
            except yaml.YAMLError as e:
                env = None
                problems.append(f"{source}: spec.runtimeEnvYAML: not valid YAML: {e}")
            else:
                if not isinstance(env, dict):
                    problems.append(f"{source}: spec.runtimeEnvYAML: expected a YAML mapping (a runtime_env)")
    if kind == "RayService":
        text = spec.get("serveConfigV2")
        if not isinstance(text, str):
            problems.append(f"{source}: spec.serveConfigV2: required, a Serve config as a YAML string (`|`)")
        else:
            try:
                serve_doc = yaml.safe_load(text)
            except yaml.MarkedYAMLError as e:
                line = f" (line {e.problem_mark.line + 1} of the string)" if e.problem_mark else ""
                problems.append(f"{source}: spec.serveConfigV2: not valid YAML{line}: {e.problem}")
            else:
                problems += validate_serve_config(serve_doc, source, root, "spec.serveConfigV2", nodes,
                                                  exposed=True)
    return problems


# --------------------------------------------------------------------------------------------------
# Serve configs (standalone, or a RayService's serveConfigV2)


def _pydantic_problems(err: ValidationError, source: str, prefix: str) -> list[str]:
    out = []
    for e in err.errors():
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{source}: {_field(prefix, *e['loc'])}: {msg}")
    return out


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

    from ray_mgdspr.serve.app import AppArgs

    if not isinstance(doc, dict):
        return [f"{source}: {_field(prefix)}: expected a Serve config mapping, got {type(doc).__name__}"]
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        return _pydantic_problems(e, source, prefix)
    problems = []
    host = (doc.get("http_options") or {}).get("host")
    if exposed and host not in (None, "0.0.0.0"):
        problems.append(f"{source}: {_field(prefix, 'http_options', 'host')}: {host!r}: the Kubernetes service "
                        "cannot reach a proxy bound there; use 0.0.0.0 (serve.host in the config)")
    apps = doc["applications"]
    if not any(a.get("import_path") == IMPORT_PATH for a in apps):
        problems.append(f"{source}: {_field(prefix, 'applications')}: no application runs {IMPORT_PATH}")
    for i, app in enumerate(apps):
        afield = (prefix, "applications", i)
        if app.get("import_path") != IMPORT_PATH:
            problems.append(f"{source}: {_field(*afield, 'import_path')}: unknown import path "
                            f"{app.get('import_path')!r}; the project's app is {IMPORT_PATH}")
            continue
        args = app.get("args") or {}
        if not isinstance(args, dict):
            problems.append(f"{source}: {_field(*afield, 'args')}: expected a mapping")
            continue
        for key in args:
            if key not in AppArgs.model_fields:
                hint = difflib.get_close_matches(key, list(AppArgs.model_fields), n=1)
                problems.append(f"{source}: {_field(*afield, 'args', key)}: unknown key"
                                + (f" (did you mean {hint[0]!r}?)" if hint else f" (AppArgs: "
                                   f"{', '.join(AppArgs.model_fields)})"))
        try:
            app_args = AppArgs.model_validate(args)
        except ValidationError as e:
            problems += _pydantic_problems(e, source, _field(*afield, "args"))
            continue
        project = ProjectConfig()
        if app_args.config is not None:
            loaded, load_problems = _load_project(app_args.config, root, source, _field(*afield, "args", "config"))
            problems += load_problems
            if loaded is None:
                continue
            project = loaded
        try:  # as ray_mgdspr.serve.app.resolve merges them: args.serve replaces whole keys of serve:
            ServeConfig.model_validate(app_args.serve)
            merged = ServeConfig.model_validate({**project.serve.model_dump(exclude_unset=True), **app_args.serve})
        except ValidationError as e:
            problems += _pydantic_problems(e, source, _field(*afield, "args", "serve"))
            continue
        if nodes:
            sized = project.model_copy(update={"serve": merged})
            problems += fit_problems(nodes, sized, source, _field(*afield, "args"), ("serve",))
    return problems


def validate_project_config(doc: dict[str, Any], source: str) -> list[str]:
    """Problems of a project config (``ray_mgdspr.config``), one per line."""
    try:
        parse_config(doc, source)
    except ConfigError as e:
        return str(e).splitlines()
    return []


# --------------------------------------------------------------------------------------------------
# one file


def validate_file(path: str | Path, root: str | Path | None = None) -> list[str]:
    """Every problem of one cluster spec, each ``FILE: FIELD: message``; an empty list when it is good.

    Args:
        path: a launcher spec, KubeRay manifest, Serve config or project config (kind read from content).
        root: the checkout that jobs/ scripts and config paths are looked up in (default: the nearest parent
            of ``path`` holding this project's pyproject.toml).
    """
    path = Path(path)
    source = str(path)
    base = Path(root) if root is not None else _repo_root(path)
    docs, problems = load_documents(path, source)
    for i, doc in enumerate(docs):
        src = f"{source} (document {i + 1})" if len(docs) > 1 else source
        kind = detect_kind(doc)
        if kind is None:
            what = f"kind {doc.get('kind')!r}" if isinstance(doc, dict) and "kind" in doc else "content"
            problems.append(f"{src}: {'kind' if 'kind' in what else '(top level)'}: unknown {what}: expected a "
                            "Ray cluster launcher spec (provider:), a KubeRay manifest (apiVersion: ray.io/v1, "
                            f"kind: {' | '.join(KUBERAY_KINDS)}), a Serve config (applications:), a project "
                            "config (stage sections: train:, serve:, ...), a Grafana dashboard (panels:), a "
                            "Prometheus config (scrape_configs:) or a PodMonitor")
        elif kind == LAUNCHER:
            problems += validate_launcher(doc, src, base)
        elif kind in KUBERAY_KINDS:
            problems += validate_kuberay(doc, src, base)
        elif kind == SERVE_CONFIG:
            problems += validate_serve_config(doc, src, base)
        elif kind in MONITORING_KINDS:
            problems += validate_monitoring(kind, doc, src)
        else:
            problems += validate_project_config(doc, src)
    return problems


def file_kind(path: str | Path) -> str:
    """The kind of a readable spec (``launcher``, ``RayJob``, ...), or ``?``."""
    docs, _ = load_documents(Path(path), str(path))
    kinds = {detect_kind(d) or "?" for d in docs}
    return ", ".join(sorted(kinds)) or "?"


# --------------------------------------------------------------------------------------------------
# the command

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
