"""The daily pipeline end to end on a real head node started with ``ray start`` (synthetic data): ``ray job submit``
of ``jobs/pipeline.py``, ``serve deploy`` of the Serve config it writes, queries over HTTP, then a second job that
retrains and promotes its version on the running endpoint.

The head gets ports and a temp dir of its own, so it runs beside any other Ray on the machine, and it is stopped
by terminating its own process group: ``ray stop`` would kill every Ray cluster on the machine."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import RAY_TEST_ENV, SMALL

from ray_mgdspr.config import config_to_yaml, load_preset
from ray_mgdspr.data.world import SYNTHETIC_LABEL
from ray_mgdspr.model.bundle import load_bundle
from ray_mgdspr.runtime import free_ports
from ray_mgdspr.serve.client import EndpointError, call

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the job's `python` must be this venv's: first on the head's PATH
RAY = str(VENV_BIN / "ray")



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
    env = {**os.environ, **RAY_TEST_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
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


def clean_checkout(dest: Path) -> Path:
    """The working tree as a fresh clone has it: tracked and new files, nothing git ignores (no .venv, runs/,
    caches), so the job cannot lean on a leftover artifact."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is gone from the clone too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def submit_pipeline(head: Head, checkout: Path, *args: str, timeout: float = 400) -> str:
    """``ray job submit --working-dir <checkout>`` of jobs/pipeline.py; returns the job's log."""
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(checkout), "--",
           "python", "jobs/pipeline.py", *args]
    job = subprocess.run(cmd, env=head.env, cwd=checkout, capture_output=True, text=True, timeout=timeout)
    log = f"{job.stdout}\n{job.stderr}"
    assert job.returncode == 0, log[-8000:]
    assert "succeeded" in log, log[-8000:]
    return log


def serve_diagnostics(head: Head) -> str:
    """`serve status` and the tail of Serve's logs: why an app did not come up."""
    status = subprocess.run([str(VENV_BIN / "serve"), "status", "--address", head.dashboard], env=head.env,
                            capture_output=True, text=True, timeout=60)
    logs = sorted((head.temp_dir / "session_latest" / "logs" / "serve").glob("*.log"))
    tails = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs[-6:]]
    return "\n".join([status.stdout, status.stderr, *tails])


def wait_serving(head: Head, url: str, timeout_s: float = 240) -> dict:
    """/v1/version once the app answers and its first version has loaded (``version`` is null while it loads)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = call(url, "/v1/version", timeout=10)
            if info["version"] is not None:
                return info
            problem = f"no version serves yet: {info}"
        except EndpointError as e:
            problem = str(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"{problem}\n{serve_diagnostics(head)}")
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_job_then_serve_deploy_then_promote(head: Head, tmp_path: Path) -> None:
    """From a clean checkout: job 1 simulates, trains, embeds, indexes (CURRENT); ``serve deploy`` of its Serve config
    answers over HTTP; job 2 resumes the run one epoch further and promotes its new version on that endpoint."""
    (port,) = free_ports(1)
    token = "pipeline-test-token"
    cfg = load_preset("demo")
    data = {**cfg.model_dump(mode="json"), "simulate": {**cfg.simulate.model_dump(mode="json"), **SMALL}}
    data["train"].update(world=str(tmp_path / "world"), storage_path=str(tmp_path / "train"), run_name="daily",
                         epochs=1, eval_events=200, max_steps_per_epoch=25)
    data["embed"]["out"] = str(tmp_path / "embeddings")
    data["index"]["out"] = str(tmp_path / "index")
    data["serve"].update(port=port, token=token, watch_current_s=0)
    config = tmp_path / "pipeline.yaml"
    config.write_text(config_to_yaml(cfg.model_validate(data)))
    out = tmp_path / "out"
    checkout = clean_checkout(tmp_path / "clone")

    submit_pipeline(head, checkout, "--config", str(config), "--simulate", "--out", str(out))
    report = json.loads((out / "pipeline.json").read_text())
    assert report["status"] == "ok" and report["exit_code"] == 0 and not report["promoted"]
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["check", "logs", "ray", "train", "embed", "index", "serve-config", "promote"]
    assert stages["logs"]["detail"]["data"] == SYNTHETIC_LABEL
    first = report["version"]
    assert (tmp_path / "index" / "CURRENT").read_text().strip() == first == stages["index"]["detail"]["version"]
    _, _, manifest = load_bundle(stages["train"]["detail"]["bundle"])
    assert manifest.version == first and manifest.metadata["data"] == SYNTHETIC_LABEL

    deploy = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(out / "serve.yaml"), "--address",
                             head.dashboard], env=head.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    url = f"http://127.0.0.1:{port}"
    assert wait_serving(head, url)["version"] == first
    answer = call(url, "/v1/retrieve", {"query": "red dress", "k": 5, "filter": False})
    assert answer["version"] == first and answer["count"] == 5

    log = submit_pipeline(head, checkout, "--config", str(config), "--epochs", "2", "--out", str(out),
                          "--endpoint", url)
    report = json.loads((out / "pipeline.json").read_text())
    second = report["version"]
    assert report["promoted"] and second != first, log[-4000:]
    promote = report["stages"][-1]
    assert promote["detail"] == {"endpoint": url, "serving": second, "previous": first}
    train = next(s for s in report["stages"] if s["name"] == "train")["detail"]
    assert train["epochs"] == 2 and train["resumed_at_steps"] == [25]  # one more epoch from job 1's checkpoint
    assert call(url, "/v1/retrieve", {"query": "red dress", "k": 5, "filter": False})["version"] == second
