"""Processes of a run by what they do, and their peak memory while it runs (shared by the benchmarks).

A local Ray started by a driver is the driver's process tree: ``gcs_server`` and ``raylet`` are its children,
workers the raylet's. Ray names a worker by what it runs (``ray::RayTrainWorker``, ``ray::MapWorker(...)``,
``ray::ServeReplica:<app>:<deployment>``), so sampling the tree and labelling each process attributes memory to
stages' roles without any help from the code under test.

RSS counts every page a process maps, shared ones included: a worker that reads an object from Ray's object
store (shared memory) counts it, and so does every other reader. Per-process peaks are therefore honest; the
``total`` of a sample over-counts what is shared, and is an upper bound on the tree's memory.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

import psutil


def label(p: psutil.Process) -> str:
    """A Ray process by what it runs: ``ServeReplica:<app>:<deployment>``, ``ServeController``, ``raylet``...; a
    Python process by its script or entry point (``python log_monitor.py``, ``python mgdspr``)."""
    args = p.cmdline() or [p.name()]
    cmd = args[0]
    if "ServeReplica:" in cmd:
        return cmd[cmd.index("ServeReplica:"):].split(".")[0].split()[0]
    if cmd.startswith("ray::"):
        return cmd.removeprefix("ray::").split(".")[0].split()[0]
    name = os.path.basename(cmd.split()[0]) if cmd.strip() else p.name()
    if name.startswith("python") and len(args) > 1:
        return f"{name} {os.path.basename(next((a for a in args[1:] if a.endswith('.py')), args[1]))}"
    return name


def tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and every descendant still alive."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class PeakMemory(threading.Thread):
    """Samples the RSS of ``root``'s process tree every ``interval`` s, per phase (``phase`` is set by the caller
    as the run moves on): each phase keeps the peak RSS of every label's largest process, how many processes
    carried the label at once, and the peak of the tree's summed RSS.

    >>> import time
    >>> sampler = PeakMemory(os.getpid(), interval=0.05); sampler.start(); sampler.phase = "x"
    >>> time.sleep(0.2); sampler.stop()["x"]["total_mib"] > 0
    True
    """

    def __init__(self, root: int, interval: float = 0.5, driver: str = "driver") -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.driver = psutil.Process(root), interval, driver
        self.phase = "start"
        self._done = threading.Event()
        self._labels: dict[int, str] = {}
        self.peaks: dict[str, dict] = defaultdict(lambda: {"total_mib": 0.0, "largest_mib": {}, "processes": {}})

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        phase, total, largest, count = self.phase, 0.0, {}, defaultdict(int)
        for p in tree(self.root):
            try:
                rss = p.memory_info().rss / 2**20
                name = self.driver if p.pid == self.root.pid else label(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if name == "IDLE" and p.pid in self._labels:  # a worker between tasks keeps its last role
                name = self._labels[p.pid]
            self._labels[p.pid] = name
            total += rss
            largest[name] = max(largest.get(name, 0.0), rss)
            count[name] += 1
        peak = self.peaks[phase]
        peak["total_mib"] = max(peak["total_mib"], round(total, 1))
        for name, rss in largest.items():
            peak["largest_mib"][name] = max(peak["largest_mib"].get(name, 0.0), round(rss, 1))
            peak["processes"][name] = max(peak["processes"].get(name, 0), count[name])

    def stop(self) -> dict[str, dict]:
        """Stop sampling (after one last sample) and return the peaks by phase."""
        self._done.set()
        self.join(5 * self.interval + 5)
        self.sample()
        return {k: dict(v) for k, v in self.peaks.items()}
