"""Validate the cluster specs in ``clusters/``: ``mgdspr cluster validate FILE...`` (``cli.py``).

A file's kind is read from its content, and each kind has its module:

* **Ray cluster launcher spec** (``provider:``): ``launcher.py``, Ray's own schema as ``ray up`` checks it and
  the project's rules.
* **KubeRay manifest** (``apiVersion: ray.io/v1``, ``kind: RayCluster | RayJob | RayService``): ``kuberay.py``.
* **Serve config** (``applications:``, as ``mgdspr serve config`` writes) and **project config** (only stage
  sections such as ``train:``, ``serve:``): ``serve_config.py``.
* **Monitoring** (a Grafana dashboard, a Prometheus scrape config, a PodMonitor): ``monitoring.py``.

Specs sized for a project config name it (launcher: ``metadata.mgdspr_config``; KubeRay: the annotation
``mgdspr/config``, a RayJob's ``--config``, a RayService's ``args.config``); every resource request of that
config (a DDP worker, a featurizer or item-tower actor, an index build task, each Serve replica) must then
fit on one node type, and as many as the config asks for must fit in the cluster at its largest
(``common.fit_problems``).

Every problem is one line ``FILE: FIELD: message``. Nothing here starts Ray or touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ray_mgdspr.clusters import kuberay, launcher, monitoring, serve_config
from ray_mgdspr.clusters.common import IMAGE_ROOT, IMPORT_PATH
from ray_mgdspr.config import ProjectConfig

__all__ = ["IMAGE_ROOT", "IMPORT_PATH", "detect_kind", "file_kind", "load_documents", "validate_file"]


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
    if kind := monitoring.detect_kind(doc):
        return kind
    if "apiVersion" in doc or "kind" in doc:
        return doc.get("kind") if doc.get("kind") in kuberay.KINDS else None
    if "provider" in doc:
        return launcher.KIND
    if "applications" in doc:
        return serve_config.KIND
    if doc and set(doc) <= set(ProjectConfig.model_fields):
        return serve_config.PROJECT_KIND
    return None


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
                            f"kind: {' | '.join(kuberay.KINDS)}), a Serve config (applications:), a project "
                            "config (stage sections: train:, serve:, ...), a Grafana dashboard (panels:), a "
                            "Prometheus config (scrape_configs:) or a PodMonitor")
        elif kind == launcher.KIND:
            problems += launcher.validate_launcher(doc, src, base)
        elif kind in kuberay.KINDS:
            problems += kuberay.validate_kuberay(doc, src, base)
        elif kind == serve_config.KIND:
            problems += serve_config.validate_serve_config(doc, src, base)
        elif kind in monitoring.KINDS:
            problems += monitoring.validate_monitoring(kind, doc, src)
        else:
            problems += serve_config.validate_project_config(doc, src)
    return problems


def file_kind(path: str | Path) -> str:
    """The kind of a readable spec (``launcher``, ``RayJob``, ...), or ``?``."""
    docs, _ = load_documents(Path(path), str(path))
    kinds = {detect_kind(d) or "?" for d in docs}
    return ", ".join(sorted(kinds)) or "?"
