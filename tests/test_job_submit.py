"""`ray job submit` of ``jobs/train.py`` to a real head node started with ``ray start`` (synthetic data).

The head gets ports and a temp dir of its own, so it runs beside any other Ray on the machine, and it is stopped
by terminating its own process group: ``ray stop`` would kill every Ray cluster on the machine."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from ray_mgdspr.config import config_to_yaml, load_preset
from ray_mgdspr.data.world import SYNTHETIC_LABEL
from ray_mgdspr.model.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the job's `python` must be this venv's: first on the head's PATH
RAY = str(VENV_BIN / "ray")

HEAD_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",  # see tests/train/conftest.py: ~10 s less per epoch on 2 cores
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    env: dict[str, str]
    temp_dir: Path


def stop_process_group(pgid: int, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process of the head's own process group and their descendants."""
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.Error, ProcessLookupError):
            pass
    procs.pop(os.getpid(), None)  # never this test process
    for p in procs.values():
        with suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def head() -> Iterator[Head]:
    """A head node with 4 logical CPUs and the dashboard (the job server) on loopback ports of its own."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Unix socket paths are limited to ~107 bytes
    gcs, dashboard, agent, client, agent_grpc, metrics, runtime_env = free_ports(7)
    env = {**os.environ, **HEAD_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--num-cpus", "4", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env), "--ray-client-server-port", str(client),
           "--include-dashboard", "true", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    # a session of its own: every process the head starts is in this process group, and only they are
    start = subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, f"ray start failed:\n{out}"
        yield Head(f"http://127.0.0.1:{dashboard}", env, temp_dir)
    finally:
        if start.poll() is None:
            start.kill()
        stop_process_group(start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_job_submit_trains_a_bundle(head: Head, world_en: Path, tmp_path: Path) -> None:
    world = Path(shutil.copytree(world_en, tmp_path / "world"))
    cfg = load_preset("demo")
    cfg = cfg.model_copy(update={"train": cfg.train.model_validate(
        {**cfg.train.model_dump(), "storage_path": str(tmp_path / "train"), "eval_events": 200})})
    config = tmp_path / "train.yaml"
    config.write_text(config_to_yaml(cfg))

    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--",
           "python", "jobs/train.py", "--config", str(config), "--world", str(world), "--run-name", "job",
           "--epochs", "1"]
    job = subprocess.run(cmd, env=head.env, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    log = f"{job.stdout}\n{job.stderr}"
    assert job.returncode == 0, log[-6000:]
    assert "succeeded" in log, log[-6000:]

    bundle = tmp_path / "train" / "job" / "bundle"
    _, _, manifest = load_bundle(bundle)
    assert manifest.metadata["data"] == SYNTHETIC_LABEL
    assert manifest.metadata["epochs"] == 1 and manifest.metadata["run"] == "job"
    assert manifest.metadata["world"] == str(world)
    history = json.loads((tmp_path / "train" / "job" / "bundle.metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1] and history[0]["step"] == manifest.metadata["steps"] > 0
    assert "recall@50" in history[0] and history[0]["loss"] > 0
