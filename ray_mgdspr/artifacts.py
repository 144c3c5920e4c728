"""Writing artifacts so that readers never see half of one: checksums, and the one way to write in place.

Work in progress lies beside its artifact under one naming scheme, ``.<name>.tmp-<host>.<pid>.<random>``
(``temp_prefix``): hidden from readers, and telling whose it is, so the leftovers of a killed writer can be
told from a running one's (``index.versions.remove_stale_staging`` removes them in an index root).

- a file: ``atomic_file`` (a temp path, moved over the target with ``os.replace`` on success) or
  ``write_text_atomic``;
- a directory: ``atomic_dir`` (a temp directory, moved into place with ``replace_dir`` on success).

On failure the temp file or directory is removed and the old artifact is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a shard or weights file may not fit in memory twice)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_prefix(name: str) -> str:
    """The prefix of work in progress on the artifact ``name``: ``.<name>.tmp-<host>.<pid>.``."""
    return f".{name}.tmp-{socket.gethostname()}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A fresh, empty temp file beside ``path`` to write; when the block ends without an error it replaces
    ``path`` in one step (``os.replace``), otherwise it is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.json"
        >>> with atomic_file(target) as tmp:
        ...     _ = tmp.write_text("{}")
        >>> target.read_text()
        '{}'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_prefix(path.name) + uuid.uuid4().hex[:12])
    tmp.touch(exist_ok=False)  # the usual mode (umask), as a plain write would give; mkstemp's is 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (``atomic_file``); returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """A fresh, empty temp directory beside ``out`` to fill; when the block ends without an error it replaces
    ``out`` (``replace_dir``), otherwise it is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was moved into place


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete directory ``tmp`` to ``out``, replacing what was there: an existing ``out`` is first
    renamed aside (one step), then ``tmp`` is renamed to ``out`` (one step), then the old one is deleted, so a
    reader finds the old directory or the new one, whole."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
        os.replace(out, old)  # onto an empty directory: allowed, and atomic
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
