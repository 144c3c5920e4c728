"""The one way artifacts are written in place (Ray-free): whole or not at all, nothing left behind on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ray_mgdspr.artifacts import (
    TEMP_NAME,
    atomic_dir,
    atomic_file,
    remove_stale,
    replace_dir,
    temp_prefix,
    write_text_atomic,
)
from ray_mgdspr.index.versions import remove_stale_staging


def _left_by_a_killed_writer(directory: Path, name: str, suffix: str = "x1") -> Path:
    """The temp name a writer of ``name`` on this host gives its work, with a pid that no process has."""
    return directory / (temp_prefix(name).replace(f".{os.getpid()}.", ".999999999.") + suffix)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_file(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_directory_keeps_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "set"
    with atomic_dir(out) as tmp:
        (tmp / "part-0").write_text("1")
    with pytest.raises(ValueError), atomic_dir(out) as tmp:
        (tmp / "part-0").write_text("2")
        raise ValueError("broken")
    assert (out / "part-0").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    with atomic_dir(out) as tmp:
        (tmp / "part-1").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["part-1"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_replace_dir_puts_the_old_directory_back_when_the_move_fails(tmp_path: Path) -> None:
    out = tmp_path / "v"
    out.mkdir()
    (out / "f").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", out)
    assert (out / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_temp_names_are_the_ones_stale_cleanup_recognises(tmp_path: Path) -> None:
    """Work in progress of a killed writer on this host is removed; a live writer's is kept."""
    assert TEMP_NAME.match(temp_prefix("CURRENT") + "abc_12")
    dead = _left_by_a_killed_writer(tmp_path, "v1")
    alive = tmp_path / (temp_prefix("v2") + "x2")
    dead.mkdir()
    alive.mkdir()
    assert remove_stale_staging(tmp_path) == [dead.name]
    assert alive.is_dir() and not dead.exists()


def test_a_write_removes_what_a_killed_writer_of_the_same_artifact_left(tmp_path: Path) -> None:
    """A killed job leaves its half-written ``.<name>.tmp-*`` beside the artifact; the next write of that artifact
    removes it. Another artifact's leftovers, and a live writer's work, stay."""
    killed_dir = _left_by_a_killed_writer(tmp_path, "features")
    killed_dir.mkdir()
    (killed_dir / "part-0.parquet").write_bytes(b"half")
    killed_file = _left_by_a_killed_writer(tmp_path, "store.sqlite", "f1")
    killed_file.write_bytes(b"half")
    other = _left_by_a_killed_writer(tmp_path, "embeddings", "e1")
    other.mkdir()
    live = tmp_path / (temp_prefix("features") + "live")
    live.mkdir()
    with atomic_dir(tmp_path / "features") as tmp:
        (tmp / "ok").write_text("1")
    assert not killed_dir.exists() and other.is_dir() and live.is_dir()
    with atomic_file(tmp_path / "store.sqlite") as tmp:
        tmp.write_bytes(b"whole")
    assert not killed_file.exists() and (tmp_path / "store.sqlite").read_bytes() == b"whole"
    assert remove_stale(tmp_path) == [other.name] and live.is_dir()
    assert remove_stale(tmp_path / "missing") == []
