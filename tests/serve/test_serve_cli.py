"""The serving commands as a user runs them: `mgdspr serve` in a subprocess, then query / promote / status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_mgdspr.runtime import free_port

pytestmark = pytest.mark.slow
MGDSPR = str(Path(sys.executable).parent / "mgdspr")
TOKEN = "cli-token-456"


def _config(tmp_path: Path, deployment: Any, port: int) -> Path:
    cfg = {"ray": {"local_num_cpus": 8},
           "serve": {"index_root": str(deployment.index_root), "world": str(deployment.world), "port": port,
                     "store": str(tmp_path / "store" / "behaviours.sqlite"), "version": "v1", "drain_s": 1.0}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MGDSPR, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


def test_serve_config_validates_with_serves_own_schema(tmp_path: Path, deployment: Any) -> None:
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "deploy.yaml"
    r = _run("serve", "config", "-c", str(_config(tmp_path, deployment, 8123)), "-o", str(out))
    assert r.returncode == 0, r.stderr
    spec = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(spec)
    app = spec["applications"][0]
    assert app["import_path"] == "ray_mgdspr.serve.app:build_app" and spec["http_options"]["host"] == "127.0.0.1"
    # `serve deploy` hands the builder its args as the plain dict of the file (not an AppArgs)
    from ray import serve

    from ray_mgdspr.serve.app import build_app

    assert isinstance(build_app(app["args"]), serve.Application)
    with pytest.raises(ValueError, match="confg"):
        build_app({**app["args"], "confg": "typo.yaml"})


def test_serve_query_promote_status_from_the_command_line(tmp_path: Path, deployment: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MGDSPR_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([MGDSPR, "serve", "--config", str(_config(tmp_path, deployment, port))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines: list[str] = []
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            if "serving version v1" in line:
                break
        assert any("serving version v1" in x for x in lines), "".join(lines[-30:])
        assert (tmp_path / "store" / "behaviours.sqlite").is_file()  # built from the world on first start

        q = _run("query", "red dress", "--k", "5", "--user", "3", "--ts", "4000000000000", "--url", url)
        assert q.returncode == 0, q.stderr
        assert "from version v1" in q.stdout and "latency ms" in q.stdout
        bad = _run("query", "   ", "--url", url)
        assert bad.returncode == 1 and "query is empty" in bad.stderr
        refused = _run("serve", "promote", "v2", "--url", url, env={"MGDSPR_SERVE_TOKEN": "wrong"})
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr

        p = _run("serve", "promote", "v2", "--url", url, env={"MGDSPR_SERVE_TOKEN": TOKEN})
        assert p.returncode == 0, p.stderr
        assert "serving v2 (was v1)" in p.stdout
        status = _run("serve", "status", "--url", url)
        assert '"version": "v2"' in status.stdout and '"previous": "v1"' in status.stdout

        proc.send_signal(signal.SIGTERM)
        tail, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopping" in tail
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    down = _run("query", "red dress", "--url", url)
    assert down.returncode == 1 and "cannot connect" in down.stderr


def test_a_first_version_that_cannot_load_ends_serve_with_its_error(tmp_path: Path, deployment: Any) -> None:
    """`mgdspr serve` waits for readiness over HTTP; a first version the manager refuses ends it at once with the
    manager's reason (exit 2), not after serve.load_timeout_s."""
    path = _config(tmp_path, deployment, free_port())
    cfg = yaml.safe_load(path.read_text())
    cfg["serve"]["version"] = "v9"  # no such version in the index root
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    r = _run("serve", "--config", str(path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the first version failed to load: v9" in r.stderr
    assert time.perf_counter() - t < 200


def test_serve_on_a_port_in_use_names_what_holds_it_before_starting_ray(tmp_path: Path, deployment: Any) -> None:
    import socket

    with socket.socket() as held:  # e.g. a haproxy left running by `ray stop --force`
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t = time.monotonic()
        r = _run("serve", "-c", str(_config(tmp_path, deployment, port)))
    assert r.returncode == 2, r.stderr
    message = " ".join(r.stderr.split())
    assert f"port {port} on 127.0.0.1 is in use by" in message and f"(pid {os.getpid()})" in message, message
    assert time.monotonic() - t < 60  # refused before a Ray starts
