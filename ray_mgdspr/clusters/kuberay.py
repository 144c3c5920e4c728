"""KubeRay manifests (``apiVersion: ray.io/v1``, ``kind: RayCluster | RayJob | RayService``): the fields the project
relies on (name, head group with ``rayStartParams`` and a container with image and resources, worker groups with
``minReplicas <= replicas <= maxReplicas``, ``num-cpus``/``num-gpus`` within the containers' limits,
``RAY_AUTH_MODE`` set, a RayJob entrypoint that runs an existing ``jobs/*.py``), a RayService's ``serveConfigV2``
as a Serve config (``serve_config.py``), and the fit of the project config the manifest names (the annotation
``mgdspr/config``, a RayJob's ``--config``)."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from ray_mgdspr.clusters.common import STAGES, NodeGroup, field_path, fit_problems, load_project
from ray_mgdspr.clusters.serve_config import validate_serve_config

KINDS = ("RayCluster", "RayJob", "RayService")
API = "ray.io/v1"
CONFIG_ANNOTATION = "mgdspr/config"  # the project config a RayCluster is sized for
JOB_STAGES = {"train": ("train",), "build_index": ("embed", "index"), "evaluate": (), "update_index": (),
              "pipeline": ("train", "embed", "index")}
"""The stages each ``jobs/*.py`` runs: whose resource requests a RayJob's cluster must fit."""


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


def _start_params(group: dict[str, Any], source: str, field: str, head: bool) -> tuple[list[str], dict[str, Any]]:
    """Problems of a group's ``rayStartParams`` (strings, the dashboard on and reachable), and the params."""
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        return [f"{source}: {field}.rayStartParams: required (a mapping of `ray start` flags)"], {}
    problems = [f"{source}: {field}.rayStartParams.{key}: must be a string (KubeRay's map[string]string), got "
                f"{value!r}: quote it" for key, value in params.items() if not isinstance(value, str)]
    if str(params.get("include-dashboard", "true")).lower() == "false":
        problems.append(f"{source}: {field}.rayStartParams.include-dashboard: the dashboard is off; KubeRay "
                        "submits jobs and Serve configs through it")
    if head and params.get("dashboard-host") not in (None, "0.0.0.0"):
        problems.append(f"{source}: {field}.rayStartParams.dashboard-host: must be 0.0.0.0 so the operator "
                        "reaches the dashboard")
    return problems, params


def _container_problems(container: dict[str, Any], source: str, cfield: str) -> tuple[list[str], dict[str, Any]]:
    """Problems of the Ray container (image, RAY_AUTH_MODE, resources as quantities), and its limits."""
    problems = []
    if not isinstance(container.get("image"), str) or not container["image"]:
        problems.append(f"{source}: {cfield}.image: required (the project's image: clusters/docker/Dockerfile)")
    env = {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}
    if "RAY_AUTH_MODE" not in env:
        problems.append(f"{source}: {cfield}.env: set RAY_AUTH_MODE explicitly (disabled behind a ClusterIP "
                        "service, or token with the token in every pod)")
    resources = container.get("resources")
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
    problems += [f"{source}: {cfield}.resources.limits.{res}: required" for res in ("cpu", "memory")
                 if res not in limits]
    return problems, limits


def _offered(params: dict[str, Any], limits: dict[str, Any], source: str, field: str
             ) -> tuple[list[str], dict[str, float]]:
    """The Ray resources one pod offers (``num-cpus``/``num-gpus``, else the container's limits), and the
    problems of ``num-cpus``/``num-gpus`` that disagree with those limits."""
    problems = []
    cpu_limit = k8s_quantity(limits.get("cpu"))
    gpu_limit = k8s_quantity(limits.get("nvidia.com/gpu", 0)) or 0.0
    offered: dict[str, float] = {"CPU": math.floor(cpu_limit) if cpu_limit is not None else 0.0, "GPU": gpu_limit}
    if "num-cpus" in params:
        num_cpus = k8s_quantity(params["num-cpus"])
        if num_cpus is None:
            problems.append(f"{source}: {field}.rayStartParams.num-cpus: not a number: {params['num-cpus']!r}")
        elif cpu_limit is not None and num_cpus > cpu_limit:
            problems.append(f"{source}: {field}.rayStartParams.num-cpus: {params['num-cpus']} > the container's "
                            f"cpu limit {limits['cpu']} (Ray would schedule work the pod cannot run)")
        else:
            offered["CPU"] = num_cpus
    if "num-gpus" in params:
        num_gpus = k8s_quantity(params["num-gpus"])
        if num_gpus is None or num_gpus != gpu_limit:
            problems.append(f"{source}: {field}.rayStartParams.num-gpus: {params['num-gpus']!r} but the "
                            f"container's nvidia.com/gpu limit is {limits.get('nvidia.com/gpu', 'unset')}")
        else:
            offered["GPU"] = num_gpus
    return problems, offered


def _group_problems(group: Any, source: str, field: str, head: bool) -> tuple[list[str], dict[str, float]]:
    """Problems of a head group or worker group, and the Ray resources one of its pods offers."""
    if not isinstance(group, dict):
        return [f"{source}: {field}: expected a mapping"], {}
    problems, params = _start_params(group, source, field, head)
    template = group.get("template")
    pod = template.get("spec") if isinstance(template, dict) else None
    containers = pod.get("containers") if isinstance(pod, dict) else None
    cfield = f"{field}.template.spec.containers"
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
        return [*problems, f"{source}: {cfield}: required (the Ray container first)"], {}
    container_problems, limits = _container_problems(containers[0], source, cfield + "[0]")
    problems += container_problems
    if not limits:
        return problems, {}
    offered_problems, offered = _offered(params, limits, source, field)
    return problems + offered_problems, offered


def _worker_group(group: dict[str, Any], source: str, gfield: str, autoscaling: bool
                  ) -> tuple[list[str], int]:
    """Problems of a worker group's replica counts, and how many pods it has at its largest."""
    problems, counts = [], {}
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
    return problems, hi if autoscaling and hi is not None else counts.get("replicas", lo)


def _cluster_spec_problems(spec: Any, source: str, field: str) -> tuple[list[str], dict[str, NodeGroup]]:
    """Problems of a RayCluster spec (also a RayJob's rayClusterSpec, a RayService's rayClusterConfig), and its
    node groups (the head and each worker group, at their largest)."""
    if not isinstance(spec, dict):
        return [f"{source}: {field}: required (a RayCluster spec)"], {}
    problems, nodes = [], {}
    if "headGroupSpec" not in spec:
        problems.append(f"{source}: {field}.headGroupSpec: required")
    else:
        head_problems, offered = _group_problems(spec["headGroupSpec"], source, f"{field}.headGroupSpec", True)
        problems += head_problems
        nodes["head"] = NodeGroup(offered, 1)
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
        count_problems, largest = _worker_group(group, source, gfield, bool(spec.get("enableInTreeAutoscaling")))
        problems += count_problems
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


def _rayjob_problems(spec: dict[str, Any], nodes: dict[str, NodeGroup], source: str, root: Path) -> list[str]:
    """A RayJob's entrypoint (an existing ``jobs/*.py``; its ``--config`` fits the cluster for the job's stages)
    and its ``runtimeEnvYAML``."""
    problems = []
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        problems.append(f"{source}: spec.entrypoint: required (e.g. python jobs/train.py --config FILE)")
    else:
        script, config, job_problems = _job_script(entrypoint, root, source, "spec.entrypoint")
        problems += job_problems
        if config is not None:
            cfg, load_problems = load_project(config, root, source, "spec.entrypoint --config")
            problems += load_problems
            stages = JOB_STAGES.get(Path(script or "").stem, STAGES)
            if cfg is not None and nodes:
                problems += fit_problems(nodes, cfg, source, "spec.entrypoint --config", stages)
    if "runtimeEnvYAML" in spec:
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"]) if isinstance(spec["runtimeEnvYAML"], str) else None
        except yaml.YAMLError as e:
            return [*problems, f"{source}: spec.runtimeEnvYAML: not valid YAML: {e}"]
        if not isinstance(env, dict):
            problems.append(f"{source}: spec.runtimeEnvYAML: expected a YAML mapping (a runtime_env)")
    return problems


def _rayservice_problems(spec: dict[str, Any], nodes: dict[str, NodeGroup], source: str, root: Path) -> list[str]:
    """A RayService's ``serveConfigV2``: a Serve config (``serve_config.py``) served behind a Kubernetes service."""
    text = spec.get("serveConfigV2")
    if not isinstance(text, str):
        return [f"{source}: spec.serveConfigV2: required, a Serve config as a YAML string (`|`)"]
    try:
        serve_doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = f" (line {e.problem_mark.line + 1} of the string)" if e.problem_mark else ""
        return [f"{source}: spec.serveConfigV2: not valid YAML{line}: {e.problem}"]
    return validate_serve_config(serve_doc, source, root, "spec.serveConfigV2", nodes, exposed=True)


def validate_kuberay(doc: dict[str, Any], source: str, root: Path) -> list[str]:
    """Problems of a KubeRay RayCluster, RayJob or RayService manifest."""
    kind = doc["kind"]
    problems = []
    if doc.get("apiVersion") != API:
        problems.append(f"{source}: apiVersion: {doc.get('apiVersion')!r}, expected {API!r}")
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = metadata.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        problems.append(f"{source}: metadata.name: required, lower-case letters, digits and '-' (got {name!r})")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return [*problems, f"{source}: spec: required"]

    cluster_key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[kind]
    nodes: dict[str, NodeGroup] = {}
    if not (kind == "RayJob" and cluster_key not in spec and "clusterSelector" in spec):
        # (a RayJob with a clusterSelector runs on an existing RayCluster: nothing to size here)
        cluster = spec if cluster_key is None else spec.get(cluster_key)
        cluster_problems, nodes = _cluster_spec_problems(cluster, source, field_path("spec", cluster_key or ""))
        problems += cluster_problems

    annotations = metadata.get("annotations") or {}
    if CONFIG_ANNOTATION in annotations:
        field = f"metadata.annotations.{CONFIG_ANNOTATION}"
        cfg, load_problems = load_project(annotations[CONFIG_ANNOTATION], root, source, field)
        problems += load_problems
        if cfg is not None and nodes:
            problems += fit_problems(nodes, cfg, source, field)
    if kind == "RayJob":
        problems += _rayjob_problems(spec, nodes, source, root)
    if kind == "RayService":
        problems += _rayservice_problems(spec, nodes, source, root)
    return problems
