"""Joining or starting Ray for a command (resources come from the config, never from constants)."""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

from ray_mgdspr.config import RayConfig

UNASSIGNED_PORTS_FROM = 20000
"""Lowest port ``free_ports`` picks from: above Ray's worker ports (10002-19999 by default)."""


def unassigned_ports() -> range:
    """Ports the kernel never hands out by itself: from ``UNASSIGNED_PORTS_FROM`` up to the start of its ephemeral
    range (``net.ipv4.ip_local_port_range``, 32768 by default), which ``bind(port 0)`` and every outgoing
    connection draw from. Empty where that range is unknown (no ``/proc``) or leaves fewer than 1,000 ports."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(UNASSIGNED_PORTS_FROM, low) if low - UNASSIGNED_PORTS_FROM >= 1000 else range(0)


def free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` now (held open together, so they differ): for the demo's endpoint,
    HAProxy's stats and metrics listeners, the tests' servers and clusters, the benchmarks.

    Drawn at random from ``unassigned_ports()``, outside the kernel's ephemeral range: a port found there by
    ``bind(0)`` could be taken, before its listener binds it, by the ``bind(0)`` of a starting Ray process or the
    local end of an outgoing connection (a clean-clone CI run once lost HAProxy's listener this way:
    "Some protocols failed to start their listeners"). Falls back to ``bind(0)`` where no such range exists."""
    pool = unassigned_ports()
    with ExitStack() as stack:
        ports: list[int] = []
        for _ in range(n):
            s = stack.enter_context(closing(socket.socket()))
            for port in random.sample(pool, min(len(pool), 200)):
                try:
                    s.bind((host, port))
                    break
                except OSError:
                    continue
            else:
                s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port free on ``host`` now."""
    return free_ports(1, host)[0]


def port_listeners(port: int) -> list[Any]:
    """The processes (``psutil.Process``) that listen on TCP ``port`` of this machine (those this process may see)."""
    import psutil

    try:
        pids = {c.pid for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
        return [psutil.Process(pid) for pid in sorted(pids)]
    except psutil.Error:
        return []


def port_holder(host: str, port: int) -> str | None:
    """None when a server could listen on ``host:port`` now; else who listens there (process name and pid, where
    this machine tells), for an error that says what to stop."""
    with closing(socket.socket()) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a TIME_WAIT is no holder
        try:
            s.bind((host, port))
            return None
        except OSError:
            pass
    holders = port_listeners(port)
    return ", ".join(f"{h.name()} (pid {h.pid})" for h in holders) or "another process"


HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
HAPROXY_DRAIN_S = 2.0
"""How long a stopping ingress replica stays reachable behind Ray's HAProxy before it refuses new connections
(Ray's default, 30 s, gives an external load balancer such as an ALB time to deregister it). Ray reconfigures its
own HAProxy when the replica set changes (within ~0.1 s) and HAProxy retries a refused connection on another
replica, so 2 s suffices; with 30 s every stopping version application and every ``serve.shutdown`` held its
replicas 30 s longer. An explicit ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` in the environment wins."""
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
"""HAProxy's stats page and metrics listeners, on fixed ports by default (8404, 9101): two local Rays on one
machine (a demo beside the test suite) would collide there, so a local Ray gets free ones unless the
environment names them."""
CHOSEN_PORTS_ENV = "MGDSPR_HAPROXY_CHOSEN_PORTS"
"""The ports ``serve_environment`` chose, as ``ENV=PORT`` pairs: inherited by child processes (a CLI run from a
test or a notebook), so that they too tell the ports chosen here from an operator's own and choose again."""


def serve_environment(cfg: RayConfig) -> None:
    """Set what Ray Serve reads from the environment of the processes a local Ray starts, so before ``ray.init``:
    its HTTP front (``cfg.http_proxy``; ``haproxy``: Ray's bundled HAProxy on the Serve port, forwarding to each
    ingress replica's own HTTP server; ``ray``: Ray's Python proxy actor) and its throughput-optimised mode
    (``cfg.serve_throughput_optimized``). On this 2-core machine the two together cut a request's framework
    overhead from 19.7 to 7.6 ms and Serve's CPU per request from 2.5x to 1.4x the monolith's
    (``benchmarks/results/serve.md``). Also the period of Serve's controller loop (``cfg.serve_control_loop_s``),
    which is most of what an idle endpoint burns."""
    os.environ[HAPROXY_ENV] = "1" if cfg.http_proxy == "haproxy" else "0"
    os.environ[THROUGHPUT_ENV] = "1" if cfg.serve_throughput_optimized else "0"
    os.environ[CONTROL_LOOP_ENV] = str(cfg.serve_control_loop_s)
    if cfg.http_proxy == "haproxy":
        os.environ.setdefault(DRAIN_ENV, str(HAPROXY_DRAIN_S))
        chosen = dict(pair.split("=", 1) for pair in os.environ.get(CHOSEN_PORTS_ENV, "").split(",") if "=" in pair)
        for env, port in zip(HAPROXY_PORT_ENVS, free_ports(len(HAPROXY_PORT_ENVS)), strict=True):
            if os.environ.get(env) in (None, chosen.get(env)):
                os.environ[env] = chosen[env] = str(port)
        os.environ[CHOSEN_PORTS_ENV] = ",".join(f"{k}={v}" for k, v in chosen.items())


def connect_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Join ``address`` (or ``cfg.address``, or $RAY_ADDRESS; ``auto`` finds a ``ray start`` cluster on this
    machine), else start a local Ray with
    ``cfg.local_num_cpus`` logical CPUs. Does nothing when Ray is already initialised in this process."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # keep the worker's prints as they are
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Data 2.60 starts 32 Parquet footer-reader actors per read: about 10 s per epoch on 2 cores
    # (a 4-epoch fit took 122 s with them, 47 s with one). Must be set before Ray starts.
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    if ray.is_initialized():
        return
    address = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": always a new Ray of our own, never whichever `ray start` cluster happens to run here
        serve_environment(cfg)
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=cfg.dashboard,
                 logging_level=logging.WARNING)


@contextmanager
def terminal_only_for(consoles: list[Any], log: Path) -> Iterator[None]:
    """Everything this process writes to its stdout and stderr goes to ``log`` (appended), except what
    ``consoles`` (rich consoles) print: they keep the terminal.

    The redirection is of file descriptors 1 and 2, so it also catches what Ray forwards from its workers, Ray
    Data's progress bars, Serve's and Ray's loggers, C++ warnings and libraries that print; a console made with
    ``stderr=True`` keeps the terminal's stderr, any other its stdout. Restored on exit, also after an error.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = {fd: os.fdopen(os.dup(saved[fd]), "w", buffering=1, encoding="utf-8") for fd in (1, 2)}
    before = [(c, c.file) for c in consoles]
    for c in consoles:
        c.file = terminal[2 if c.stderr else 1]
    try:
        with log.open("ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[1], 1)
                os.dup2(saved[2], 2)
    finally:
        for c, file in before:
            c.file = file
        for fd in (1, 2):
            terminal[fd].close()
            os.close(saved[fd])
