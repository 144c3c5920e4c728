"""The pipeline job's failure paths, fast: bad input exits 2 before any Ray starts, an unreachable endpoint exits 3
with the built version named; `pipeline.json` says which stage failed. The whole run is in test_pipeline_job.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mgdspr.config import ProjectConfig, config_to_yaml
from ray_mgdspr.pipeline import ExitCode, Pipeline, PipelineError, absolute_paths
from ray_mgdspr.runtime import free_port

MGDSPR = str(Path(sys.executable).parent / "mgdspr")


def pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MGDSPR, "pipeline", *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", "MGDSPR_SERVE_TOKEN": "", "COLUMNS": "400"})


def report(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())


def test_missing_world_exits_2_naming_it(tmp_path: Path) -> None:
    r = pipeline("--world", str(tmp_path / "nowhere"), "--out", "out", cwd=tmp_path)
    assert r.returncode == ExitCode.BAD_INPUT == 2, r.stderr
    assert "stage logs" in r.stderr and str(tmp_path / "nowhere") in r.stderr
    rep = report(tmp_path / "out")
    assert rep["status"] == "failed" and rep["exit_code"] == 2
    assert [(s["name"], s["status"]) for s in rep["stages"]] == [("check", "ok"), ("logs", "failed")]


def test_endpoint_without_a_token_exits_2_before_training(tmp_path: Path) -> None:
    r = pipeline("--endpoint", "http://127.0.0.1:1", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and "MGDSPR_SERVE_TOKEN" in r.stderr, r.stderr
    assert [s["name"] for s in report(tmp_path / "out")["stages"]] == ["check"]


def test_simulate_never_replaces_logs_unasked(tmp_path: Path, world_en: Path) -> None:
    world = shutil.copytree(world_en, tmp_path / "world")
    r = pipeline("--world", str(world), "--simulate", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and "--overwrite-world" in r.stderr, r.stderr
    assert (world / "manifest.json").read_bytes() == (world_en / "manifest.json").read_bytes()


def test_invalid_logs_exit_2_with_the_validation_problems(tmp_path: Path, world_en: Path) -> None:
    world = shutil.copytree(world_en, tmp_path / "world")
    items = next(world.glob("items*"))
    (items / "part-0.parquet" if items.is_dir() else items).write_bytes(b"not parquet")
    r = pipeline("--world", str(world), "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and "failed validation" in r.stderr and "items" in r.stderr, r.stderr


def test_unreachable_endpoint_is_exit_3_and_names_the_built_version(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    run = Pipeline(ProjectConfig(), tmp_path / "out", endpoint=dead, token="t", say=lambda _: None)
    with pytest.raises(PipelineError) as e:
        run.promote("20261126-000000-abcdef12")
    assert e.value.code == ExitCode.NOT_PROMOTED == 3 and e.value.stage == "promote"
    assert "cannot connect" in str(e.value) and "mgdspr serve promote 20261126-000000-abcdef12" in str(e.value)


def test_paths_are_made_absolute_and_serve_points_at_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(ProjectConfig(), tmp_path / "out")
    assert cfg.train.world == str(tmp_path / "runs" / "world") and cfg.index.out == str(tmp_path / "runs" / "index")
    assert cfg.serve.index_root == cfg.index.out and cfg.serve.world == cfg.train.world
    assert cfg.serve.store == str(tmp_path / "out" / "store" / "behaviours.sqlite")
    redis = ProjectConfig.model_validate({"serve": {"store": "redis://r:6379/0"}})
    assert absolute_paths(redis, tmp_path).serve.store == "redis://r:6379/0"
    assert "index_root" in config_to_yaml(cfg)
