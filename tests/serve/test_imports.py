"""What the processes that only route requests load: the ingress, the version manager and per_stage's BM25 head
import the serving modules without torch (the query tower's and the torch search backend's dependency), which
would cost each of them ~1.1 s of start-up CPU and ~180 MiB (docs/operations.md, "Memory")."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

ROUTING = ("ray_mgdspr.serve.app", "ray_mgdspr.serve.ingress", "ray_mgdspr.serve.versions",
           "ray_mgdspr.serve.engine", "ray_mgdspr.model.bundle", "ray_mgdspr.index.search")


def loaded_after(modules: tuple[str, ...], heavy: tuple[str, ...], then: str = "") -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules`` (and running ``then``)."""
    code = (f"import sys\nfor m in {list(modules)!r}: __import__(m)\n{then}\n"
            f"print(','.join(h for h in {list(heavy)!r} if h in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return [m for m in r.stdout.strip().split(",") if m]


def test_the_serving_modules_import_without_torch() -> None:
    assert loaded_after(ROUTING, ("torch",)) == []


def test_the_check_sees_torch_when_it_is_imported() -> None:
    """The check itself can fail: a module that imports torch is caught."""
    assert loaded_after(("ray_mgdspr.model.mgdspr",), ("torch",)) == ["torch"]


def test_the_auto_backend_asks_torch_only_where_it_may_see_a_gpu() -> None:
    """A shard replica resolves ``serve.backend: auto``: with a CPU-only torch build (``+cpu``, as this project
    installs) it chooses faiss-cpu without importing torch; with another build torch is asked."""
    cpu_only = importlib.metadata.version("torch").endswith("+cpu")
    then = ("from ray_mgdspr.index.search import resolve_backend\n"
            "assert resolve_backend('auto') == 'faiss-cpu' or not " + repr(cpu_only))
    assert loaded_after(("ray_mgdspr.index.search",), ("torch",), then) == ([] if cpu_only else ["torch"])
