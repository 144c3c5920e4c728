"""``runtime.free_ports``: ports for listeners, outside the range the kernel hands out itself.
``runtime.terminal_only_for``: what a process prints goes to a log file, the project's consoles keep the terminal.
``runtime.serve_environment``: the environment a local Ray starts Serve's HTTP front and modes from."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_mgdspr import runtime
from ray_mgdspr.config import RayConfig

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from rich.console import Console
    from ray_mgdspr.runtime import terminal_only_for

    out, err = Console(), Console(stderr=True)
    log = Path(sys.argv[1])
    try:
        with terminal_only_for([out, err], log):
            print("python stdout")
            print("python stderr", file=sys.stderr)
            os.write(1, b"fd 1\\n")
            os.write(2, b"fd 2\\n")
            subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
            out.print("console stdout")
            err.print("console stderr")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    print("after")
    out.print("console after")
""")


def test_everything_but_the_consoles_goes_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "run.log"
    log.parent.mkdir()
    log.write_text("earlier run\n")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["console stdout", "after", "console after"]
    assert r.stderr.splitlines() == ["console stderr"]
    lines = log.read_text().splitlines()  # appended; Python's buffers and raw fd writes may interleave
    assert lines[0] == "earlier run"
    assert sorted(lines[1:]) == sorted(["python stdout", "python stderr", "fd 1", "fd 2", "child process"])


def test_serve_environment_sets_what_ray_reads_as_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    envs = (runtime.HAPROXY_ENV, runtime.THROUGHPUT_ENV, runtime.DRAIN_ENV, *runtime.HAPROXY_PORT_ENVS,
            runtime.CHOSEN_PORTS_ENV, runtime.CONTROL_LOOP_ENV)
    for env in envs:  # set, then deleted: monkeypatch restores each as it was before the test
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
    runtime.serve_environment(RayConfig())
    first = {env: runtime.os.environ[env] for env in envs}
    assert first[runtime.HAPROXY_ENV] == "1" and first[runtime.THROUGHPUT_ENV] == "1"
    assert float(first[runtime.DRAIN_ENV]) == runtime.HAPROXY_DRAIN_S
    assert float(first[runtime.CONTROL_LOOP_ENV]) == RayConfig().serve_control_loop_s
    stats, metrics = (int(first[e]) for e in runtime.HAPROXY_PORT_ENVS)
    assert stats != metrics and min(stats, metrics) > 1024
    runtime.serve_environment(RayConfig())  # the next local Ray (of this process or a child): free ports again
    assert all(runtime.os.environ[e].isdigit() for e in runtime.HAPROXY_PORT_ENVS)
    assert runtime.os.environ[runtime.CHOSEN_PORTS_ENV] == ",".join(
        f"{e}={runtime.os.environ[e]}" for e in runtime.HAPROXY_PORT_ENVS)
    runtime.serve_environment(RayConfig(http_proxy="ray", serve_throughput_optimized=False, serve_control_loop_s=0.1))
    assert runtime.os.environ[runtime.HAPROXY_ENV] == "0" and runtime.os.environ[runtime.THROUGHPUT_ENV] == "0"
    assert float(runtime.os.environ[runtime.CONTROL_LOOP_ENV]) == 0.1

    # what an operator set is kept: the drain period and the listeners' ports
    monkeypatch.setenv(runtime.DRAIN_ENV, "30")
    monkeypatch.setenv(runtime.HAPROXY_PORT_ENVS[0], "8404")
    runtime.serve_environment(RayConfig())
    assert runtime.os.environ[runtime.DRAIN_ENV] == "30" and runtime.os.environ[runtime.HAPROXY_PORT_ENVS[0]] == "8404"


def test_free_ports_are_distinct_bindable_and_outside_the_kernels_ephemeral_range() -> None:
    import socket

    pool = runtime.unassigned_ports()
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert pool == range(runtime.UNASSIGNED_PORTS_FROM, low)  # this box's range starts at 32768
    ports = runtime.free_ports(8)
    assert len(set(ports)) == 8 and all(p in pool for p in ports)
    with socket.socket() as s:  # free: a listener can bind it
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
        # a port in use is never handed out, however often we ask
        assert all(ports[0] not in runtime.free_ports(4) for _ in range(50))


def test_free_ports_fall_back_to_the_kernels_choice_without_an_unassigned_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "unassigned_ports", lambda: range(0))
    ports = runtime.free_ports(3)
    assert len(set(ports)) == 3 and all(p > 1024 for p in ports)


@pytest.mark.slow
@pytest.mark.parametrize("dashboard", [True, False])
def test_a_local_ray_starts_the_dashboard_as_configured(dashboard: bool) -> None:
    """``ray.dashboard``: with it, the local Ray `connect_ray` starts serves the web UI and runs the dashboard's
    head modules; without it, neither (Ray keeps a minimal API process): what an idle endpoint saves."""
    script = textwrap.dedent(f"""
        import time, psutil, ray
        from ray_mgdspr.config import RayConfig
        from ray_mgdspr.runtime import connect_ray
        connect_ray(RayConfig(local_num_cpus=1, dashboard={dashboard}))
        url = ray._private.worker.global_worker.node.address_info.get("webui_url")
        time.sleep(2)
        heads = [p.name() for p in psutil.Process().children(recursive=True) if "Head" in p.name()]
        print("UI", bool(url), "HEADS", len(heads))
        ray.shutdown()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                       env={**runtime.os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""})
    ui, heads = r.stdout.split("UI ")[-1].split(" HEADS ") if "UI " in r.stdout else ("?", "?")
    assert ui == str(dashboard), r.stdout + r.stderr
    assert (int(heads) > 0) == dashboard, r.stdout + r.stderr
