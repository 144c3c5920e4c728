"""The one way artifacts are written in place (Ray-free): whole or not at all, nothing left behind on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ray_mgdspr.artifacts import atomic_dir, atomic_file, replace_dir, temp_prefix, write_text_atomic
from ray_mgdspr.index.versions import _STAGING_NAME, remove_stale_staging


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
    assert _STAGING_NAME.match(temp_prefix("CURRENT") + "abc_12")
    dead = tmp_path / (temp_prefix("v1").replace(f".{os.getpid()}.", ".999999999.") + "x1")
    alive = tmp_path / (temp_prefix("v2") + "x2")
    dead.mkdir()
    alive.mkdir()
    assert remove_stale_staging(tmp_path) == [dead.name]
    assert alive.is_dir() and not dead.exists()
