"""Building index versions: sharding, atomic builds, CURRENT, verification (Ray-free)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_mgdspr.config import ConfigError, IndexConfig, parse_config
from ray_mgdspr.index.manifest import IndexManifest
from ray_mgdspr.index.shards import (
    IndexCorruptError,
    ShardData,
    build_index_version,
    read_shard,
    shard_of,
    split_by_shard,
    verify_index,
)
from ray_mgdspr.index.versions import current_version, list_versions

D = 8


def catalogue(n: int = 600, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Random vectors, unique large item ids, and metadata rows for them in another order."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    shuffled = ids[rng.permutation(n)]
    metadata = pa.table({
        "item_id": shuffled,
        "leaf_id": (shuffled % 97).astype(np.int32),
        "cate1_id": (shuffled % 7).astype(np.int32),
        "brand_id": (shuffled % 31).astype(np.int32),
        "attr_value_ids": [[int(i % 5), int(i % 3)] for i in shuffled],
        "title_words": [[f"w{i % 11}", "shirt"] for i in shuffled],
        "title": [f"item {i}" for i in shuffled],
        "shop_id": (shuffled % 13).astype(np.int32),  # kept (the item tower reads it: delta updates compare it)
        "seller_rating": np.ones(n),  # not kept: the shards hold what the filter, responses and the item tower read
    })
    return vectors, ids, metadata


def build(root: Path, version: str = "v1", shards: int = 3, make_current: bool = True, **config: object
          ) -> IndexManifest:
    vectors, ids, metadata = catalogue()
    return build_index_version(root, version, split_by_shard(vectors, ids, metadata, shards),
                               IndexConfig(shards=shards, **config), model_version=version,
                               model_checksum="sha-of-bundle", dim=D, make_current=make_current)


def dead_pid() -> int:
    """The pid of a process that has exited (what a killed build leaves in its staging name)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# shard_of


def test_shard_of_is_a_fixed_function_of_the_id() -> None:
    # splitmix64 reference values: any change here moves items between shards of existing indexes
    ids = np.array([0, 1, 2, 3, 1_000_000_007, -5, 2**62])
    assert shard_of(ids, 7).tolist() == [2, 2, 4, 2, 5, 5, 4]
    assert shard_of(ids, 4).tolist() == [3, 1, 2, 1, 2, 2, 3]
    assert shard_of(ids, 1).tolist() == [0] * 7
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard_of(ids, 0)


@pytest.mark.parametrize("stride", [1, 8, 1000])
def test_shard_of_is_balanced_for_sequential_and_strided_ids(stride: int) -> None:
    counts = np.bincount(shard_of(np.arange(80_000) * stride, 8), minlength=8)
    assert np.abs(counts / 10_000 - 1).max() < 0.05, counts


# --------------------------------------------------------------------------------------------------
# building a version


def test_build_writes_a_verified_version_and_points_current_at_it(tmp_path: Path) -> None:
    _, ids, metadata = catalogue()
    manifest = build(tmp_path)
    assert list_versions(tmp_path) == ["v1"] and current_version(tmp_path) == "v1"
    assert verify_index(tmp_path / "v1") == []
    assert hidden(tmp_path) == []
    assert (manifest.version, manifest.model_version, manifest.dim, manifest.factory) == ("v1", "v1", D, "Flat")
    assert manifest.total_rows == 600
    assert [e.rows for e in manifest.shards] == np.bincount(shard_of(ids, 3), minlength=3).tolist()
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == [
        "manifest.json", *[f"shard-{s:05d}.{ext}" for s in range(3) for ext in ("faiss", "parquet")]]

    _, index, table = read_shard(tmp_path / "v1", 1)
    mine = np.sort(ids[shard_of(ids, 3) == 1])
    assert table["item_id"].to_numpy().tolist() == mine.tolist()  # sorted by item id
    assert table.schema.field("attr_value_ids").type == pa.list_(pa.int32())
    assert "seller_rating" not in table.column_names and "title" in table.column_names
    assert table["shop_id"].to_pylist() == (table["item_id"].to_numpy() % 13).tolist()
    assert table["price"].null_count == table.num_rows  # a catalogue without prices: null, not an error
    expected = metadata.filter(pa.array(shard_of(metadata["item_id"].to_numpy(), 3) == 1)).sort_by("item_id")
    assert table["title_words"].to_pylist() == expected["title_words"].to_pylist()
    assert index.ntotal == len(mine)


def test_make_current_is_optional_and_versions_are_immutable(tmp_path: Path) -> None:
    build(tmp_path, "v1")
    build(tmp_path, "v2", make_current=False)
    assert list_versions(tmp_path) == ["v1", "v2"] and current_version(tmp_path) == "v1"
    with pytest.raises(FileExistsError, match="immutable"):
        build(tmp_path, "v2")
    with pytest.raises(ValueError, match="plain name"):
        build(tmp_path, "../v3")


def test_build_from_a_function_per_shard(tmp_path: Path) -> None:
    parts = split_by_shard(*catalogue(), 3)
    called = []

    def shard(s: int) -> ShardData:
        called.append(s)
        return parts[s]

    build_index_version(tmp_path, "v1", shard, IndexConfig(shards=3), "v1", "sha", D)
    assert called == [0, 1, 2] and verify_index(tmp_path / "v1") == []
    assert current_version(tmp_path) is None


def _wrong_metadata_on_shard_1(parts: list[ShardData]) -> list[ShardData]:
    bad = parts[1]
    return [parts[0], bad._replace(metadata=bad.metadata.slice(1)), parts[2]]


def _raise_on_shard_2(parts: list[ShardData]) -> Callable[[int], ShardData]:
    def shard(s: int) -> ShardData:
        if s == 2:
            raise RuntimeError("embedding read failed")
        return parts[s]

    return shard


@pytest.mark.parametrize(("breaker", "error", "message"), [
    (_wrong_metadata_on_shard_1, ValueError, r"shard 1: metadata has \d+ rows, the index \d+ items"),
    (_raise_on_shard_2, RuntimeError, "embedding read failed"),
])
def test_a_failed_build_leaves_no_trace(tmp_path: Path, breaker, error: type[Exception], message: str) -> None:
    build(tmp_path, "v1")
    parts = split_by_shard(*catalogue(seed=1), 3)
    with pytest.raises(error, match=message):
        build_index_version(tmp_path, "v2", breaker(parts), IndexConfig(shards=3), "v2", "sha", D, make_current=True)
    assert list_versions(tmp_path) == ["v1"] and current_version(tmp_path) == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "v1"]


def test_leftovers_of_killed_builds_are_ignored_and_the_next_build_removes_them(tmp_path: Path) -> None:
    build(tmp_path, "v1")
    host = socket.gethostname()
    killed = tmp_path / f".v2.tmp-{host}.{dead_pid()}.k1ll3d"
    killed.mkdir()
    (killed / "shard-00000.faiss").write_bytes(b"half written")
    killed_pointer = tmp_path / f".CURRENT.tmp-{host}.{dead_pid()}.x7"
    killed_pointer.write_text("v2\n")
    running = tmp_path / f".v3.tmp-{host}.{os.getpid()}.busy"  # a build in progress beside ours
    elsewhere = tmp_path / ".v4.tmp-another-host.1.remote"  # its host decides whether it is alive
    running.mkdir()
    elsewhere.mkdir()

    assert list_versions(tmp_path) == ["v1"] and current_version(tmp_path) == "v1"
    build(tmp_path, "v5")
    assert hidden(tmp_path) == sorted([running.name, elsewhere.name])
    assert list_versions(tmp_path) == ["v1", "v5"] and current_version(tmp_path) == "v5"


def test_build_errors_name_the_shard_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shard 0: factory 'IVF512,Flat' has 512 inverted lists but the shard "
                                         r"has only \d+ vectors; use at most \d+ lists"):
        build(tmp_path, shards=3, factory="IVF512,Flat")
    with pytest.raises(ValueError, match=r"shard 0: factory 'PQ3' does not fit 8-d vectors"):
        build(tmp_path, shards=3, factory="PQ3")
    vectors, ids, metadata = catalogue()
    parts = split_by_shard(vectors, ids, metadata, 3)
    with pytest.raises(ValueError, match=r"shard 0: \d+ item ids belong to other shards"):
        build_index_version(tmp_path, "v1", parts.__getitem__, IndexConfig(shards=2), "v1", "sha", D)
    with pytest.raises(ValueError, match=r"shard 0: vectors have shape \(\d+, 8\), expected \(n, 16\)"):
        build_index_version(tmp_path, "v1", parts, IndexConfig(shards=3), "v1", "sha", 16)
    assert list(tmp_path.iterdir()) == []


def test_config_rejects_a_bad_factory_string_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml: index\.factory: .*'IVF100,Flt' is not a Faiss index_factory"):
        parse_config({"index": {"factory": "IVF100,Flt"}}, "x.yaml")
    with pytest.raises(ValueError, match="leave out IDMap"):
        IndexConfig(factory="IDMap2,Flat")
    assert IndexConfig(factory="IVF1000,PQ10").factory == "IVF1000,PQ10"  # PQ10 needs 10 | d: checked at build


# --------------------------------------------------------------------------------------------------
# verify_index


def test_verify_finds_a_missing_shard_file(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "v1" / "shard-00001.faiss").unlink()
    assert verify_index(tmp_path / "v1") == ["shard 1: shard-00001.faiss is missing"]
    with pytest.raises(IndexCorruptError, match=r"shard 1: shard-00001\.faiss is missing"):
        read_shard(tmp_path / "v1", 1)
    read_shard(tmp_path / "v1", 0)  # the other shards still load


@pytest.mark.parametrize("name", ["shard-00002.faiss", "shard-00002.parquet"])
def test_verify_finds_a_corrupted_byte(tmp_path: Path, name: str) -> None:
    build(tmp_path)
    path = tmp_path / "v1" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify_index(tmp_path / "v1") == [f"shard 2: {name} does not match its sha256 (corrupt or modified)"]


def test_verify_finds_a_manifest_that_disagrees_with_the_index(tmp_path: Path) -> None:
    manifest = build(tmp_path)
    path = tmp_path / "v1" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["dim"] = 16
    path.write_text(json.dumps(doc))
    assert verify_index(tmp_path / "v1") == [
        f"shard {s}: shard-{s:05d}.faiss holds 8-d vectors, the manifest says dim 16" for s in range(3)]

    doc["dim"] = D
    doc["shards"][0]["rows"] += 1
    doc["total_rows"] += 1
    path.write_text(json.dumps(doc))
    rows = manifest.shards[0].rows
    assert verify_index(tmp_path / "v1") == [
        f"shard 0: shard-00000.faiss holds {rows} vectors, the manifest says {rows + 1}",
        f"shard 0: shard-00000.parquet has {rows} rows, the manifest says {rows + 1}",
    ]


def test_verify_reports_a_directory_that_is_no_index(tmp_path: Path) -> None:
    assert verify_index(tmp_path) == [f"{tmp_path}: not an index version (no manifest.json)"]
