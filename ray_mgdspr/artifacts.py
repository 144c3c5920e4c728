"""Writing artifacts so that readers never see half of one: checksums, and the one way to write in place.

Work in progress lies beside its artifact under one naming scheme, ``.<name>.tmp-<host>.<pid>.<random>``
(``temp_prefix``): hidden from readers, and telling whose it is, so the leftovers of a killed writer can be
told from a running one's. ``remove_stale`` removes a killed writer's leftovers; every write below does so for
its own artifact before it starts, and an index build for its whole root (``index.versions.staging_dir``).

- a file: ``atomic_file`` (a temp path, moved over the target with ``os.replace`` on success) or
  ``write_text_atomic``;
- a directory: ``atomic_dir`` (a temp directory, moved into place with ``replace_dir`` on success).

On failure the temp file or directory is removed and the old artifact is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# temp_prefix + a random suffix: host and pid say whose work it is (remove_stale)
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)\.(?P<pid>\d+)\.[a-z0-9_]+$")


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


def remove_stale(directory: str | Path, name: str | None = None) -> list[str]:
    """Remove the work in progress (``temp_prefix`` names) that killed writers on this host left in
    ``directory``: of the artifact ``name``, or of every artifact when ``name`` is None.

    Only leftovers whose process (host, pid in the name) is gone are removed: a writer running beside this one
    keeps its work, and another host's leftovers are left to that host.

    Returns:
        The names removed.
    """
    directory = Path(directory)
    host, removed = socket.gethostname(), []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        m = TEMP_NAME.match(path.name)
        if m is None or m["host"] != host or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed %s, left by a killed writer (pid %s)", path, m["pid"])
        removed.append(path.name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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
    remove_stale(path.parent, path.name)
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
    remove_stale(out.parent, out.name)
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
