"""The life of an index version: staged, committed into place in one step, made ``CURRENT``, listed; and the
leftovers of killed builds removed. (Building and checking a version's shards is ``index/shards.py``; serving's
side of versions, promotion and drain, is ``serve/versions.py``.)

Layout of an index root (``IndexConfig.out``)::

    runs/index/
      CURRENT                    name of the version serving loads (replaced atomically)
      <version>/                 one per model bundle: the bundle's version id (immutable once committed)
      .<version>.tmp-<host>.<pid>.<random>/    a build in progress (or killed): readers ignore it

A build::

    with staging_dir(root, version) as staging:           # temp dir, removed if anything raises
        ...write the version's files into staging.path...
        commit_version(staging, IndexManifest(...))        # manifest.json, then os.replace
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ray_mgdspr.artifacts import remove_stale, temp_prefix, write_text_atomic
from ray_mgdspr.index.manifest import MANIFEST, IndexManifest, write_manifest

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Staging:
    """A version being built: its files go to ``path`` (a hidden sibling of ``root/version``)."""

    root: Path
    version: str
    path: Path


@contextlib.contextmanager
def staging_dir(root: str | Path, version: str) -> Iterator[Staging]:
    """A fresh staging directory for ``version`` under ``root``; removed on exit unless committed.

    Leftovers of killed builds are removed first (``remove_stale_staging``).

    Raises:
        ValueError: ``version`` is not a plain name (letters, digits, ``._-``; not ``CURRENT``).
        FileExistsError: ``root/version`` exists (a version is immutable: it names one model bundle).
    """
    root = Path(root)
    if not _VERSION_NAME.match(version) or version == CURRENT:
        raise ValueError(f"version {version!r} must be a plain name of letters, digits and ._- (not {CURRENT})")
    if (root / version).exists():
        raise FileExistsError(f"{root / version} exists; index versions are immutable, build a new version")
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    path = Path(tempfile.mkdtemp(prefix=temp_prefix(version), dir=root))
    try:
        yield Staging(root, version, path)
    finally:
        shutil.rmtree(path, ignore_errors=True)  # gone already when committed


def commit_version(staging: Staging, manifest: IndexManifest, make_current: bool = False) -> Path:
    """Write ``manifest.json`` into the staging directory and rename it to ``root/version`` in one step.

    Args:
        make_current: also point ``root/CURRENT`` at the new version.

    Returns:
        The version directory.
    """
    if manifest.version != staging.version:
        raise ValueError(f"manifest version {manifest.version!r} != staging version {staging.version!r}")
    final = staging.root / staging.version
    if final.exists():
        raise FileExistsError(f"{final} appeared during the build; index versions are immutable")
    write_manifest(staging.path, manifest)
    os.replace(staging.path, final)
    if make_current:
        set_current(staging.root, staging.version)
    return final


def set_current(root: str | Path, version: str) -> None:
    """Point ``root/CURRENT`` at ``version`` (temp file + ``os.replace``: readers see old or new, never half)."""
    root = Path(root)
    if not (root / version / MANIFEST).is_file():
        raise FileNotFoundError(f"{root / version}: no such index version")
    write_text_atomic(root / CURRENT, version + "\n")


def current_version(root: str | Path) -> str | None:
    """The version ``root/CURRENT`` names, or None before any version was made current."""
    path = Path(root) / CURRENT
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def list_versions(root: str | Path) -> list[str]:
    """Complete versions under ``root`` (directories with a manifest), sorted by name; staging is skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def remove_stale_staging(root: str | Path) -> list[str]:
    """Remove staging directories and CURRENT temp files left by killed builds on this host
    (``artifacts.remove_stale`` over the whole root); returns the names removed."""
    return remove_stale(root)
