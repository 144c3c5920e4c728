"""What the cluster-spec checks share: field paths, the project's constants, loading the project config a spec
names, and whether that config's resource requests fit a cluster's nodes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ray_mgdspr.config import ConfigError, ProjectConfig, load_config

IMPORT_PATH = "ray_mgdspr.serve.app:build_app"  # == ray_mgdspr.serve.app.IMPORT_PATH (a test ties them)
IMAGE_ROOT = "/home/ray/ray-mgdspr"  # where clusters/docker/Dockerfile puts the repository in the image
STAGES = ("train", "embed", "index", "serve")


def field_path(*parts: str | int) -> str:
    """``a.b[0].c`` from path parts.

    >>> field_path("spec", "workerGroupSpecs", 0, "groupName"), field_path()
    ('spec.workerGroupSpecs[0].groupName', '(top level)')
    """
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p != "":
            out += f".{p}" if out else str(p)
    return out or "(top level)"


def pydantic_problems(err: ValidationError, source: str, prefix: str) -> list[str]:
    """One ``FILE: FIELD: message`` line per error of a pydantic model validated at ``prefix``."""
    out = []
    for e in err.errors():
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{source}: {field_path(prefix, *e['loc'])}: {msg}")
    return out


def _resolve_config(ref: str, root: Path) -> Path | str:
    """Where a config named in a spec is in this checkout (``preset:NAME`` is returned as is)."""
    if ref.startswith("preset:"):
        return ref
    p = Path(ref)
    if p.is_absolute() and (ref == IMAGE_ROOT or ref.startswith(IMAGE_ROOT + "/")):
        return root / Path(ref).relative_to(IMAGE_ROOT)
    return p if p.is_absolute() else root / p


def load_project(ref: Any, root: Path, source: str, field: str) -> tuple[ProjectConfig | None, list[str]]:
    """Load the project config a spec names; problems name the spec's file and field."""
    if not isinstance(ref, str) or not ref:
        return None, [f"{source}: {field}: expected a config path or preset:NAME, got {ref!r}"]
    where = _resolve_config(ref, root)
    try:
        return load_config(where), []
    except ConfigError as e:
        return None, [f"{source}: {field}: {ref!r}: {line}" for line in str(e).splitlines()]


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
        per_version = {"colocated": ("retriever",), "inline": (),  # inline: the ingress replicas hold the version
                       "per_stage": ("encoder", "shard", "head")}[s.placement]
        for name in ("ingress", *per_version):
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
