"""The `mgdspr` command as a user runs it: real subprocesses, exit codes and messages."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_mgdspr.config import config_to_yaml, load_preset

MGDSPR = [sys.executable, "-m", "ray_mgdspr.cli"]
SMALL = ["--items", "300", "--users", "60"]


def run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([*MGDSPR, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_simulate_then_validate(tmp_path: Path) -> None:
    out = tmp_path / "w"
    r = run("simulate", "--out", str(out), *SMALL, "--lang", "zh", "--seed", "3")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("simulated 300 items, 60 users,") and "(zh, seed 3)" in last and "[SYNTHETIC]" in last
    r = run("validate", str(out))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "SYNTHETIC" in r.stdout


def test_simulate_refuses_to_clobber_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert run("simulate", "--out", str(out), *SMALL).returncode == 0
    r = run("simulate", "--out", str(out), *SMALL)
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert run("simulate", "--out", str(out), *SMALL, "--overwrite").returncode == 0


def test_validate_reports_broken_file_and_exits_1(world_en: Path, tmp_path: Path) -> None:
    w = tmp_path / "w"
    shutil.copytree(world_en, w)
    (w / "items.parquet").unlink()
    r = run("validate", str(w))
    assert r.returncode == 1
    assert "items.parquet: required table is missing" in r.stderr
    assert "nothing was modified" in r.stderr


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("simulate:\n  n_items: lots\n  langg: en\n")
    r = run("simulate", "--config", str(cfg), "--out", str(tmp_path / "w"))
    assert r.returncode == 2
    assert f"{cfg}: simulate.n_items: Input should be a valid integer" in r.stderr
    assert f"{cfg}: simulate.langg: unknown key" in r.stderr
    assert not (tmp_path / "w").exists()
    r = run("config", "check", str(cfg))
    assert r.returncode == 1 and "simulate.langg" in r.stderr


def test_bad_override_is_an_error(tmp_path: Path) -> None:
    r = run("simulate", "--out", str(tmp_path / "w"), "--lang", "fr")
    assert r.returncode == 2 and "lang" in r.stderr


def test_load_real_data(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "wands_queries"
    if not src.exists():
        src = Path("/work/shared/data/wands_queries")
    r = run("load", "wands", str(src), "--out", str(tmp_path / "wands"))
    assert r.returncode == 0, r.stderr
    assert "queries 480" in r.stdout and "real data" in r.stdout
    assert run("validate", str(tmp_path / "wands")).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path: Path) -> None:
    """The README's main job as a user runs it: simulate, validate, vocabulary, Ray training (real Ray), embedding,
    index, Serve over HTTP, the evaluation table. One epoch instead of the preset's eight keeps the suite short; the
    README's exact command is run from a clean clone before each release."""
    cfg = load_preset("demo")
    epochs = 1
    config = tmp_path / "demo.yaml"
    config.write_text(config_to_yaml(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})))
    r = run("demo", "--out", str(tmp_path / "demo"), "--config", str(config), timeout=840)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("demo done in") and "[SYNTHETIC data]" in last
    assert "training by epoch" in r.stdout and "recall@50" in r.stdout
    # quiet: the project's own lines only; Ray's output (workers, Ray Data, Serve) is all in the log file
    shown = (r.stdout + r.stderr).splitlines()
    assert len(shown) <= 80, f"{len(shown)} lines:\n" + "\n".join(shown)
    log = (tmp_path / "demo" / "demo.log").read_text(errors="replace")
    for ray_line in ("RayTrainWorker", "ServeController", "Dataset"):
        assert ray_line in log and ray_line not in r.stdout + r.stderr, ray_line
    assert f"Ray's own output goes to {tmp_path / 'demo' / 'demo.log'}" in r.stdout
    assert (tmp_path / "demo" / "vocab.json").is_file()
    manifest = json.loads((tmp_path / "demo" / "model" / "manifest.json").read_text())
    assert manifest["metadata"]["data"].startswith("SYNTHETIC") and manifest["metadata"]["epochs"] == epochs
    history = json.loads((tmp_path / "demo" / "model.metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert "answered from the index" in r.stdout and "verified" in r.stdout
    assert (tmp_path / "demo" / "index" / "CURRENT").read_text().strip() == manifest["version"]
    # `mgdspr serve -c <out>/config.yaml` serves what the demo built (test_serve_cli runs `mgdspr serve -c`)
    from ray_mgdspr.serve.app import AppArgs, resolve

    written = tmp_path / "demo" / "config.yaml"
    assert f"mgdspr serve -c {written}" in r.stdout
    served = resolve(AppArgs(config=str(written)))
    assert served.index_root == str((tmp_path / "demo" / "index").resolve())
    assert Path(served.store).is_file() and (Path(served.world) / "manifest.json").is_file()


def test_demo_dates_its_world_so_that_the_test_day_is_today() -> None:
    import datetime as dt

    from ray_mgdspr.config import SimulateConfig
    from ray_mgdspr.demo import dated

    sim = dated(load_preset("demo").simulate, today=dt.date(2026, 12, 1))
    assert sim.base_date + dt.timedelta(days=sim.train_days) == dt.date(2026, 12, 1)  # day 8, the test day
    own = SimulateConfig(base_date=dt.date(2020, 1, 1))
    assert dated(own).base_date == dt.date(2020, 1, 1)  # a config that dates its world keeps its date


def test_schema_and_config_show() -> None:
    r = run("schema")
    assert r.returncode == 0 and "### `search_events`" in r.stdout
    docs = Path(__file__).resolve().parents[1] / "docs" / "data.md"
    assert r.stdout.strip() in docs.read_text(), "docs/data.md is stale: regenerate it with `mgdspr schema`"
    r = run("config", "show", "--preset", "large")
    assert r.returncode == 0 and "n_items: 1000000" in r.stdout
