"""Cluster specs in clusters/ and their validator (``ray_mgdspr.clusters``, ``mgdspr cluster validate``).

Every shipped spec validates clean; broken copies are reported with their file and field. Nothing starts Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ray_mgdspr.clusters import IMAGE_ROOT, IMPORT_PATH, detect_kind, validate_file
from ray_mgdspr.clusters.cli import cluster_app

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted(p for p in (REPO / "clusters").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_clusters_dir_has_every_kind() -> None:
    kinds = {detect_kind(yaml.safe_load(p.read_text())) for p in SPECS}
    assert {"launcher", "RayCluster", "RayJob", "RayService", "grafana-dashboard", "prometheus-config",
            "PodMonitor"} <= kinds
    assert {p.name for p in (REPO / "clusters" / "launcher").glob("*.yaml")} >= {"local.yaml", "aws.yaml",
                                                                                   "gcp.yaml"}


@pytest.mark.parametrize("spec", SPECS, ids=_rel)
def test_shipped_spec_is_clean(spec: Path) -> None:
    assert validate_file(spec) == []


def test_private_launcher_api_is_where_we_use_it() -> None:
    """ray_mgdspr.clusters checks launcher specs with Ray's private prepare_config + validate_config.

    If this fails after a Ray upgrade, Ray moved or changed them: update validate_launcher to match.
    """
    import jsonschema

    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # pragma: no cover - the point of the test
        pytest.fail(f"Ray moved its launcher config API (used by ray_mgdspr.clusters.launcher.validate_launcher): {e}")
    import ray.autoscaler

    assert (Path(ray.autoscaler.__file__).parent / "ray-schema.json").is_file()
    spec = {"cluster_name": "pin", "provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": []},
            "auth": {"ssh_user": "u"}}
    validate_config(prepare_config(copy.deepcopy(spec)))
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**copy.deepcopy(spec), "idle_timeout_minutez": 5}))


def test_import_path_matches_the_app() -> None:
    from ray_mgdspr.serve.app import IMPORT_PATH as APP_IMPORT_PATH

    assert IMPORT_PATH == APP_IMPORT_PATH


def test_rayservice_embeds_the_generated_serve_config() -> None:
    """serveConfigV2 is what ray_mgdspr.serve.app.serve_config writes for its args (byte-for-byte YAML)."""
    from ray_mgdspr.config import ServeConfig, load_config
    from ray_mgdspr.serve.app import AppArgs, serve_config

    manifest = yaml.safe_load((REPO / "clusters/kuberay/rayservice.yaml").read_text())
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    args = AppArgs.model_validate(embedded["applications"][0]["args"])
    assert args.config and args.config.startswith(IMAGE_ROOT + "/")
    assert set(args.serve) >= {"ingress", "encoder", "shard"}
    project = load_config(REPO / Path(args.config).relative_to(IMAGE_ROOT))
    cfg = ServeConfig.model_validate({**project.serve.model_dump(exclude_unset=True), **args.serve}).resolved(project)
    generated = serve_config(args, cfg)
    assert embedded == generated
    assert manifest["spec"]["serveConfigV2"] == yaml.safe_dump(generated, sort_keys=False)
    assert cfg.shard.max_replicas > cfg.shard.min_replicas  # autoscaling on
    # production: a read whose replica dies is retried on another one, so every stage it calls has >= 2
    assert min(cfg.encoder.min_replicas, cfg.shard.min_replicas, cfg.head.min_replicas, cfg.ingress.min_replicas) >= 2
    gpu = load_config(REPO / "clusters/configs/gpu.yaml").serve
    assert min(gpu.encoder.min_replicas, gpu.shard.min_replicas, gpu.head.min_replicas) >= 2


def test_rayjob_runs_an_existing_job_script() -> None:
    manifest = yaml.safe_load((REPO / "clusters/kuberay/rayjob.yaml").read_text())
    script = manifest["spec"]["entrypoint"].split()[1]
    assert (REPO / script).is_file()


# --------------------------------------------------------------------------------------------------
# broken copies: each problem names the file and the field

Edit = Callable[[dict[str, Any]], Any]


def _serve(edit: Edit) -> Edit:
    """An edit of a RayService's serveConfigV2 (parsed, edited, written back as YAML)."""
    def apply(doc: dict[str, Any]) -> None:
        serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
        edit(serve)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve, sort_keys=False)
    return apply


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["workerGroupSpecs"][1]


def _shard(serve: dict[str, Any]) -> dict[str, Any]:
    return serve["applications"][0]["args"]["serve"]["shard"]


def _gpu_type(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["available_node_types"]["gpu_worker"]


BROKEN: list[tuple[str, str, Edit, list[str]]] = [
    ("launcher-typo", "launcher/aws.yaml", lambda d: d.update(max_worker=d.pop("max_workers")),
     ["max_worker: unknown key (did you mean 'max_workers'?)"]),
    ("launcher-nested-typo", "launcher/gcp.yaml",
     lambda d: _gpu_type(d).update(resourcez=_gpu_type(d).pop("resources")),
     ["available_node_types.gpu_worker.resourcez: unknown key",
      "available_node_types.gpu_worker: 'resources' is a required property"]),
    ("launcher-min-gt-max", "launcher/aws.yaml", lambda d: _gpu_type(d).update(min_workers=9),
     ["available_node_types.gpu_worker.min_workers: 9 > max_workers 8"]),
    ("launcher-ray-validate-config", "launcher/aws.yaml", lambda d: d.update(max_workers=2),
     ["max_workers: The specified global `max_workers` is smaller", "(Ray's validate_config)"]),
    ("launcher-wrong-type", "launcher/aws.yaml", lambda d: _gpu_type(d).update(max_workers="eight"),
     ["available_node_types.gpu_worker.max_workers: 'eight' is not of type 'integer'"]),
    ("local-node-types", "launcher/local.yaml",
     lambda d: d.update(available_node_types={"a": {"resources": {}, "node_config": {}}}),
     ["available_node_types: not allowed with provider.type local"]),
    ("local-top-level-min-workers", "launcher/local.yaml", lambda d: d.update(min_workers=1),
     ["min_workers: unknown key"]),
    ("local-no-worker-ips", "launcher/local.yaml", lambda d: d["provider"].pop("worker_ips"),
     ["provider.worker_ips: required for a local cluster"]),
    ("launcher-no-auth-mode", "launcher/aws.yaml",
     lambda d: d.update(head_start_ray_commands=["ray stop", "ray start --head --port=6379"]),
     ["head_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE"]),
    ("launcher-no-install", "launcher/gcp.yaml", lambda d: d.update(setup_commands=["echo hi"]),
     ["setup_commands: no command installs the project"]),
    ("launcher-gpu-misfit", "launcher/aws.yaml", lambda d: _gpu_type(d).update(resources={"CPU": 8}),
     ["metadata.mgdspr_config: train.resources_per_worker asks for {CPU: 4, GPU: 1}"]),
    ("launcher-missing-config", "launcher/aws.yaml", lambda d: d["metadata"].update(mgdspr_config="nope.yaml"),
     ["metadata.mgdspr_config: 'nope.yaml'", "config file not found"]),
    ("kuberay-missing-image", "kuberay/raycluster.yaml", lambda d: _head_container(d).pop("image"),
     ["spec.headGroupSpec.template.spec.containers[0].image: required"]),
    ("kuberay-missing-limits", "kuberay/raycluster.yaml", lambda d: _head_container(d).pop("resources"),
     ["spec.headGroupSpec.template.spec.containers[0].resources.limits: required"]),
    ("kuberay-replicas-out-of-range", "kuberay/raycluster.yaml", lambda d: _gpu_group(d).update(replicas=9),
     ["spec.workerGroupSpecs[1].replicas: 9 outside [minReplicas 2, maxReplicas 8]"]),
    ("kuberay-min-gt-max", "kuberay/raycluster.yaml", lambda d: _gpu_group(d).update(minReplicas=9),
     ["spec.workerGroupSpecs[1].minReplicas: 9 > maxReplicas 8"]),
    ("kuberay-num-gpus-vs-limit", "kuberay/raycluster.yaml",
     lambda d: _gpu_group(d)["rayStartParams"].update({"num-gpus": "2"}),
     ["spec.workerGroupSpecs[1].rayStartParams.num-gpus: '2' but the container's nvidia.com/gpu limit is 1"]),
    ("kuberay-num-cpus-over-limit", "kuberay/raycluster.yaml",
     lambda d: _gpu_group(d)["rayStartParams"].update({"num-cpus": "32"}),
     ["spec.workerGroupSpecs[1].rayStartParams.num-cpus: 32 > the container's cpu limit 8"]),
    ("kuberay-unquoted-param", "kuberay/raycluster.yaml",
     lambda d: _gpu_group(d)["rayStartParams"].update({"num-cpus": 8}),
     ["spec.workerGroupSpecs[1].rayStartParams.num-cpus: must be a string"]),
    ("kuberay-no-auth-mode", "kuberay/raycluster.yaml", lambda d: _head_container(d).pop("env"),
     ["spec.headGroupSpec.template.spec.containers[0].env: set RAY_AUTH_MODE explicitly"]),
    ("kuberay-no-gpu-room", "kuberay/raycluster.yaml", lambda d: _gpu_group(d).update(maxReplicas=2, replicas=2),
     ["metadata.annotations.mgdspr/config: train.resources_per_worker: 4 x {CPU: 4, GPU: 1} do not fit in the "
      "cluster at its largest (head {CPU: 0, GPU: 0} x1, cpu-workers {CPU: 16, GPU: 0} x4, gpu-workers "
      "{CPU: 8, GPU: 1} x2: room for 2)"]),
    ("kuberay-bad-name", "kuberay/raycluster.yaml", lambda d: d["metadata"].update(name="Mgdspr_1"),
     ["metadata.name: required, lower-case"]),
    ("kuberay-old-api", "kuberay/raycluster.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"),
     ["apiVersion: 'ray.io/v1alpha1', expected 'ray.io/v1'"]),
    ("wrong-kind", "kuberay/raycluster.yaml", lambda d: d.update(kind="Deployment"),
     ["kind: unknown kind 'Deployment'"]),
    ("unknown-content", "launcher/aws.yaml", lambda d: d.pop("provider"),
     ["(top level): unknown content"]),
    ("rayjob-missing-script", "kuberay/rayjob.yaml",
     lambda d: d["spec"].update(entrypoint="python jobs/nope.py --config clusters/configs/gpu.yaml"),
     ["spec.entrypoint: jobs/nope.py does not exist"]),
    ("rayjob-no-script", "kuberay/rayjob.yaml", lambda d: d["spec"].update(entrypoint="python -c 'print(1)'"),
     ["spec.entrypoint: runs no jobs/*.py script"]),
    ("rayjob-bad-config", "kuberay/rayjob.yaml",
     lambda d: d["spec"].update(entrypoint="python jobs/train.py --config clusters/configs/nope.yaml"),
     ["spec.entrypoint --config: 'clusters/configs/nope.yaml'", "config file not found"]),
    ("rayjob-too-few-gpus", "kuberay/rayjob.yaml",
     lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].update(replicas=2, minReplicas=2, maxReplicas=2),
     ["spec.entrypoint --config: train.resources_per_worker: 4 x {CPU: 4, GPU: 1} do not fit"]),
    ("rayjob-runtime-env-not-yaml", "kuberay/rayjob.yaml", lambda d: d["spec"].update(runtimeEnvYAML="a: [b"),
     ["spec.runtimeEnvYAML: not valid YAML"]),
    ("serve-schema", "kuberay/rayservice.yaml", _serve(lambda s: s["http_options"].update(port="abc")),
     ["spec.serveConfigV2.http_options.port: Input should be a valid integer"]),
    ("serve-unknown-import-path", "kuberay/rayservice.yaml",
     _serve(lambda s: s["applications"][0].update(import_path="ray_mgdspr.serve.app:build")),
     ["spec.serveConfigV2.applications[0].import_path: unknown import path 'ray_mgdspr.serve.app:build'",
      "spec.serveConfigV2.applications: no application runs ray_mgdspr.serve.app:build_app"]),
    ("serve-args-typo", "kuberay/rayservice.yaml",
     _serve(lambda s: s["applications"][0]["args"].update(serv={})),
     ["spec.serveConfigV2.applications[0].args.serv: unknown key (did you mean 'serve'?)"]),
    ("serve-override-typo", "kuberay/rayservice.yaml",
     _serve(lambda s: s["applications"][0]["args"]["serve"].update(shrd={})),
     ["spec.serveConfigV2.applications[0].args.serve.shrd: unknown key"]),
    ("serve-override-bounds", "kuberay/rayservice.yaml", _serve(lambda s: _shard(s).update(min_replicas=5)),
     ["spec.serveConfigV2.applications[0].args.serve.shard: Value error, max_replicas 4 < min_replicas 5"]),
    ("serve-override-misfit", "kuberay/rayservice.yaml", _serve(lambda s: _shard(s).update(num_gpus=2)),
     ["spec.serveConfigV2.applications[0].args: serve.shard asks for {CPU: 2, GPU: 2} per unit"]),
    ("serve-loopback", "kuberay/rayservice.yaml", _serve(lambda s: s["http_options"].update(host="127.0.0.1")),
     ["spec.serveConfigV2.http_options.host: '127.0.0.1'"]),
    ("serve-missing-config", "kuberay/rayservice.yaml",
     _serve(lambda s: s["applications"][0]["args"].update(config="/home/ray/ray-mgdspr/nope.yaml")),
     ["spec.serveConfigV2.applications[0].args.config: '/home/ray/ray-mgdspr/nope.yaml'", "not found"]),
    ("serve-not-yaml", "kuberay/rayservice.yaml", lambda d: d["spec"].update(serveConfigV2="applications: [x"),
     ["spec.serveConfigV2: not valid YAML (line 1 of the string)"]),
    ("project-config-typo", "configs/gpu.yaml", lambda d: d["train"].update(num_worker=4),
     ["train.num_worker: unknown key"]),
    ("dashboard-renamed-metric", "monitoring/grafana-serving.json",
     lambda d: d["panels"][0]["targets"][0].update(expr="sum(rate(ray_mgdspr_request_total[5m]))"),
     ["panels[0].targets[0].expr: ray_mgdspr_request_total is not a series the endpoint exports"]),
    ("dashboard-local-metric-name", "monitoring/grafana-serving.json",
     lambda d: d["panels"][1]["targets"][0].update(expr="sum(rate(mgdspr_requests_total[5m]))"),
     ["panels[1].targets[0].expr: reads no ray_mgdspr_* series"]),
    ("dashboard-unbalanced", "monitoring/grafana-serving.json",
     lambda d: d["panels"][3]["targets"][1].update(
         expr="histogram_quantile(0.99, rate(ray_mgdspr_stage_seconds_bucket[5m])"),
     ["panels[3].targets[1].expr: unbalanced ()"]),
    ("dashboard-fixed-datasource", "monitoring/grafana-serving.json",
     lambda d: d["panels"][2].update(datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}),
     ["panels[2].datasource: 'P1809F7CD0C75ACF3': use the dashboard's ${datasource} variable"]),
    ("dashboard-off-grid", "monitoring/grafana-serving.json", lambda d: d["panels"][4]["gridPos"].update(x=20),
     ["panels[4].gridPos: x 20 + w 12 must lie within 24 columns"]),
    ("dashboard-duplicate-id", "monitoring/grafana-serving.json", lambda d: d["panels"][5].update(id=1),
     ["panels[5].id: 1 is used by another panel"]),
    ("prometheus-no-targets", "monitoring/prometheus.yaml", lambda d: d["scrape_configs"][0].pop("file_sd_configs"),
     ["scrape_configs[0]: no targets"]),
    ("podmonitor-wrong-port", "kuberay/podmonitor.yaml",
     lambda d: d["spec"]["podMetricsEndpoints"][0].update(port="dashboard"),
     ["spec.podMetricsEndpoints[0].port: 'dashboard': Ray's metrics export is the containers' 'metrics' port"]),
]


@pytest.mark.parametrize(("spec", "edit", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_copy_names_file_and_field(tmp_path: Path, spec: str, edit: Edit, expected: list[str]) -> None:
    doc = yaml.safe_load((REPO / "clusters" / spec).read_text())
    edit(doc)
    path = tmp_path / Path(spec).name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = validate_file(path, root=REPO)
    assert problems, "the broken copy validated clean"
    assert all(p.startswith(f"{path}") for p in problems), problems
    for text in expected:
        assert any(text in p for p in problems), f"{text!r} not in {problems}"


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cluster_name: x\nprovider:\n  type: local\n  head_ip: [10.0.0.1\n")
    (problem,) = validate_file(path, root=REPO)
    assert problem.startswith(f"{path}:5:1: not valid YAML:"), problem


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert validate_file(tmp_path / "empty.yaml") == [f"{tmp_path / 'empty.yaml'}: empty file"]
    (problem,) = validate_file(tmp_path / "missing.yaml")
    assert problem.startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


def test_standalone_serve_config(tmp_path: Path) -> None:
    """A file `mgdspr serve config` writes is recognised and checked the same way."""
    doc = yaml.safe_load(yaml.safe_load((REPO / "clusters/kuberay/rayservice.yaml").read_text())["spec"]
                         ["serveConfigV2"])
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert validate_file(path, root=REPO) == []
    doc["applications"][0]["args"]["serve"]["encoder"]["max_replicas"] = 1
    path.write_text(yaml.safe_dump(doc))
    assert validate_file(path, root=REPO) == [
        f"{path}: applications[0].args.serve.encoder: Value error, max_replicas 1 < min_replicas 2"]


# --------------------------------------------------------------------------------------------------
# the command


def test_cli_ok_lines_for_shipped_specs() -> None:
    r = CliRunner().invoke(cluster_app, ["validate", *map(str, SPECS)])
    assert r.exit_code == 0, r.output
    for spec in SPECS:
        assert f"OK   {spec}" in r.output
    assert f"{len(SPECS)} file(s): {len(SPECS)} ok, 0 with problems" in r.output


def test_cli_exit_1_with_one_line_per_problem(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "clusters/launcher/aws.yaml").read_text())
    doc["max_worker"] = doc.pop("max_workers")
    doc["available_node_types"]["gpu_worker"]["min_workers"] = 9
    bad = tmp_path / "aws.yaml"
    bad.write_text(yaml.safe_dump(doc))
    good = REPO / "clusters/launcher/local.yaml"
    r = CliRunner().invoke(cluster_app, ["validate", str(good), str(bad)])
    assert r.exit_code == 1, r.output
    fails = [line for line in r.output.splitlines() if line.startswith("FAIL")]
    assert fails == [f"FAIL {bad}: max_worker: unknown key (did you mean 'max_workers'?)",
                     f"FAIL {bad}: available_node_types.gpu_worker.min_workers: 9 > max_workers 8"]
    assert f"OK   {good} (launcher)" in r.output
    assert "2 file(s): 1 ok, 1 with problems" in r.output
