"""``runtime.terminal_only_for``: what a process prints goes to a log file, the project's consoles keep the terminal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
