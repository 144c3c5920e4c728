"""Writing artifacts so that readers never see half of one: checksums and the final rename."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a shard or weights file may not fit in memory twice)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete directory ``tmp`` to ``out``, replacing what was there (``os.replace`` is atomic for
    a fresh ``out``; an existing one is removed first, so a reader sees the old or the new, never a mix)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
