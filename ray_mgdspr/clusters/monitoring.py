"""Checks of the monitoring files in ``clusters/`` (``mgdspr cluster validate`` dispatches here by content).

* **Grafana dashboard** (JSON with ``panels`` and ``schemaVersion``): a title and uid, a ``datasource``
  template variable that every panel and query uses, panels laid out on Grafana's 24-column grid with a unique
  id, and every query's series one the endpoint records (``serve/metrics.py`` ``METRICS`` as Ray's export names
  them, ``ray_mgdspr_*``), with balanced brackets. A dashboard that plots a series nobody exports shows an empty
  panel in production; this catches the renamed metric before that.
* **Prometheus scrape config** (``scrape_configs:``): unique job names, each with a way to find its targets.
* **Prometheus Operator PodMonitor** (``kind: PodMonitor``): a name, a pod selector, and endpoints on the Ray
  containers' ``metrics`` port.

Every problem is one line ``FILE: FIELD: message``, as in ``ray_mgdspr.clusters``.
"""

from __future__ import annotations

import re
from typing import Any

GRAFANA = "grafana-dashboard"
PROMETHEUS = "prometheus-config"
PODMONITOR = "PodMonitor"
KINDS = (GRAFANA, PROMETHEUS, PODMONITOR)
GRID_COLUMNS = 24
SERIES = re.compile(r"\bray_mgdspr_[A-Za-z0-9_]+")
TARGETS = ("static_configs", "file_sd_configs", "kubernetes_sd_configs", "dns_sd_configs", "consul_sd_configs")


def detect_kind(doc: dict[str, Any]) -> str | None:
    """``grafana-dashboard``, ``prometheus-config``, ``PodMonitor`` or None."""
    if doc.get("kind") == PODMONITOR:
        return PODMONITOR
    if "panels" in doc and "schemaVersion" in doc:
        return GRAFANA
    if "scrape_configs" in doc:
        return PROMETHEUS
    return None


def validate_monitoring(kind: str, doc: dict[str, Any], source: str) -> list[str]:
    return {GRAFANA: validate_dashboard, PROMETHEUS: validate_prometheus, PODMONITOR: validate_podmonitor}[kind](
        doc, source)


def validate_dashboard(doc: dict[str, Any], source: str) -> list[str]:
    from ray_mgdspr.serve.metrics import exported_series

    known = exported_series()
    problems = [f"{source}: {key}: missing" for key in ("title", "uid") if not doc.get(key)]
    variables = {v.get("name") for v in (doc.get("templating") or {}).get("list", []) if isinstance(v, dict)}
    if "datasource" not in variables:
        problems.append(f"{source}: templating.list: no 'datasource' variable: panels would be tied to one "
                        "Grafana's Prometheus uid")
    panels = doc.get("panels")
    if not isinstance(panels, list) or not panels:
        return [*problems, f"{source}: panels: expected a non-empty list"]
    seen: set[Any] = set()
    for i, panel in enumerate(panels):
        where = f"{source}: panels[{i}]"
        if not isinstance(panel, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        if panel.get("id") in seen:
            problems.append(f"{where}.id: {panel.get('id')!r} is used by another panel")
        seen.add(panel.get("id"))
        for key in ("type", "title"):
            if not panel.get(key):
                problems.append(f"{where}.{key}: missing")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{where}.gridPos: needs integer x, y, w, h")
        elif grid["x"] < 0 or grid["w"] < 1 or grid["x"] + grid["w"] > GRID_COLUMNS:
            problems.append(f"{where}.gridPos: x {grid['x']} + w {grid['w']} must lie within {GRID_COLUMNS} "
                            "columns")
        problems += _datasource(panel, where)
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}.targets: no query")
        for j, target in enumerate(targets):
            problems += _query(target, f"{where}.targets[{j}]", known)
    return problems


def _datasource(item: dict[str, Any], where: str) -> list[str]:
    ds = item.get("datasource")
    uid = ds.get("uid") if isinstance(ds, dict) else ds
    if uid not in ("${datasource}", "$datasource"):
        return [f"{where}.datasource: {uid!r}: use the dashboard's ${{datasource}} variable"]
    return []


def _query(target: Any, where: str, known: set[str]) -> list[str]:
    if not isinstance(target, dict) or not isinstance(target.get("expr"), str) or not target["expr"].strip():
        return [f"{where}.expr: missing"]
    expr, problems = target["expr"], []
    for opening, closing in ("()", "[]", "{}"):
        if expr.count(opening) != expr.count(closing):
            problems.append(f"{where}.expr: unbalanced {opening}{closing} in {expr!r}")
    series = set(SERIES.findall(expr))
    if not series:
        problems.append(f"{where}.expr: reads no ray_mgdspr_* series: {expr!r}")
    for name in sorted(series - known):
        problems.append(f"{where}.expr: {name} is not a series the endpoint exports (serve/metrics.py METRICS: "
                        f"{', '.join(sorted(known))})")
    if target.get("datasource") is not None:
        problems += _datasource(target, where)
    return problems


def validate_prometheus(doc: dict[str, Any], source: str) -> list[str]:
    jobs = doc.get("scrape_configs")
    if not isinstance(jobs, list) or not jobs:
        return [f"{source}: scrape_configs: expected a non-empty list"]
    problems, names = [], set()
    for i, job in enumerate(jobs):
        where = f"{source}: scrape_configs[{i}]"
        if not isinstance(job, dict) or not job.get("job_name"):
            problems.append(f"{where}.job_name: missing")
            continue
        if job["job_name"] in names:
            problems.append(f"{where}.job_name: {job['job_name']!r} is used twice")
        names.add(job["job_name"])
        if not any(job.get(k) for k in TARGETS):
            problems.append(f"{where}: no targets: give one of {', '.join(TARGETS)}")
    return problems


def validate_podmonitor(doc: dict[str, Any], source: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"{source}: apiVersion: {doc.get('apiVersion')!r}, expected 'monitoring.coreos.com/v1'")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append(f"{source}: metadata.name: missing")
    spec = doc.get("spec") or {}
    selector = spec.get("selector") or {}
    if not (selector.get("matchLabels") or selector.get("matchExpressions")):
        problems.append(f"{source}: spec.selector: selects nothing (give matchLabels or matchExpressions on "
                        "ray.io/node-type)")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*problems, f"{source}: spec.podMetricsEndpoints: expected a non-empty list"]
    for i, endpoint in enumerate(endpoints):
        port = endpoint.get("port") if isinstance(endpoint, dict) else None
        if port != "metrics":
            problems.append(f"{source}: spec.podMetricsEndpoints[{i}].port: {port!r}: Ray's metrics export is the "
                            "containers' 'metrics' port")
    return problems
