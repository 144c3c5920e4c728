"""What the processes that only route requests load: the ingress, the version manager and per_stage's BM25 head
import the serving modules without torch (the query tower's and the torch search backend's dependency), which
would cost each of them ~1.1 s of start-up CPU and ~180 MiB (docs/operations.md, "Memory")."""

from __future__ import annotations

import subprocess
import sys

ROUTING = ("ray_mgdspr.serve.app", "ray_mgdspr.serve.ingress", "ray_mgdspr.serve.versions",
           "ray_mgdspr.serve.engine", "ray_mgdspr.model.bundle", "ray_mgdspr.index.search")


def loaded_after(modules: tuple[str, ...], heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules``."""
    code = (f"import sys\nfor m in {list(modules)!r}: __import__(m)\n"
            f"print(','.join(h for h in {list(heavy)!r} if h in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return [m for m in r.stdout.strip().split(",") if m]


def test_the_serving_modules_import_without_torch() -> None:
    assert loaded_after(ROUTING, ("torch",)) == []


def test_the_check_sees_torch_when_it_is_imported() -> None:
    """The check itself can fail: a module that imports torch is caught."""
    assert loaded_after(("ray_mgdspr.model.mgdspr",), ("torch",)) == ["torch"]
