"""The manifest of an index version: what it was built from, how, and the checksum of every shard file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

FORMAT_VERSION = 1
"""Format of a version whose shards are whole files (every full build): readers of format 1 can read it."""
SEGMENTS_FORMAT = 2
"""Format of a version with delta segments (``ShardDelta``): a reader that ignored them would serve removed items."""
FORMATS = (FORMAT_VERSION, SEGMENTS_FORMAT)
MANIFEST = "manifest.json"


class ShardDelta(BaseModel):
    """The changes to one shard since its base files, kept beside them: what a delta update writes instead of
    rewriting the shard (``index/update.py``), until a compaction folds them in. The shard serves the base items
    less ``removed_file``'s, plus ``metadata_file``'s (added or changed since the base; a changed item is in both).
    """

    vectors_file: str = Field(description="(rows, dim) float32 .npy: row i is the vector of metadata row i")
    metadata_file: str = Field(description="Parquet rows (shards.METADATA_SCHEMA) of the items added or changed "
                               "since the base files, sorted by item id")
    removed_file: str = Field(description="(removed,) int64 .npy: items of the base files no longer served from "
                              "them (removed, or changed and so in metadata_file), sorted")
    rows: int = Field(ge=0, description="items in metadata_file and vectors_file")
    removed: int = Field(ge=0, description="ids in removed_file")


class ShardEntry(BaseModel):
    """One shard's files: a Faiss index (vectors keyed by item id) and a Parquet table of item metadata."""

    shard: int = Field(ge=0, description="shard number s: holds the items with shard_of(item_id) == s")
    index_file: str
    metadata_file: str
    rows: int = Field(ge=0, description="items the shard serves (without a delta: vectors in the index = rows of "
                      "the metadata)")
    sha256: dict[str, str] = Field(description="file name -> sha256, for every file of the shard")
    delta: ShardDelta | None = Field(None, description="changes since index_file and metadata_file (the base "
                                     "files); None: the base files are the shard")

    @property
    def files(self) -> list[str]:
        """Every file of the shard: the base files, then the delta's."""
        d = self.delta
        return [self.index_file, self.metadata_file, *((d.vectors_file, d.metadata_file, d.removed_file) if d else ())]

    @property
    def base_rows(self) -> int:
        """Items in the base files (vectors in index_file, rows of metadata_file)."""
        return self.rows if self.delta is None else self.rows - self.delta.rows + self.delta.removed

    @model_validator(mode="after")
    def _checksums_cover_files(self) -> ShardEntry:
        if set(self.sha256) != set(self.files) or len(set(self.files)) != len(self.files):
            raise ValueError(f"shard {self.shard}: sha256 must list exactly {self.files} (got {sorted(self.sha256)})")
        if self.base_rows < 0:
            raise ValueError(f"shard {self.shard}: the delta removes more items than the base files hold")
        return self


class DeltaRecord(BaseModel):
    """How a version made by a delta update (``index/update.py``) differs from the version it was applied to."""

    base: str = Field(description="the index version the delta was applied to")
    added: int = Field(ge=0, description="items in the new catalogue only")
    removed: int = Field(ge=0, description="items in the base only")
    changed: int = Field(ge=0, description="items in both whose compared columns differ (re-embedded)")
    unchanged: int = Field(ge=0, description="items kept with their base vectors")
    shards_touched: list[int] = Field(description="shards the delta changed; the others hold the base's files")
    shards_compacted: list[int] = Field(default_factory=list, description="shards of shards_touched rewritten in "
                                        "full (their delta folded into new base files); the rest keep their base "
                                        "files and carry the changes as a delta segment")


class IndexManifest(BaseModel):
    """``manifest.json`` of an index version directory."""

    format_version: int = FORMAT_VERSION
    version: str = Field(description="index version id: the id of the model bundle it was built from")
    model_version: str = Field(description="version id of the model bundle whose item tower made the vectors")
    model_checksum: str = Field(description="checksum of that bundle (ties the index to exact weights)")
    bundle: str | None = Field(None, description="path of that bundle when the index was built (serving loads "
                               "the query tower from it and checks it against model_version and model_checksum)")
    created_at: dt.datetime
    factory: str = Field(description="Faiss index_factory string of every shard (inside an IDMap2)")
    metric: Literal["ip"]
    dim: int = Field(ge=1)
    shards: list[ShardEntry]
    build_backend: str = Field(description="what trained and filled the shards (faiss-cpu)")
    total_rows: int = Field(ge=0)
    build_seconds: float = Field(ge=0)
    delta: DeltaRecord | None = Field(None, description="set when a delta update made this version (None: a full "
                                      "build)")

    @model_validator(mode="after")
    def _consistent(self) -> IndexManifest:
        numbers = [e.shard for e in self.shards]
        if numbers != list(range(len(self.shards))):
            raise ValueError(f"shards must be numbered 0..{len(self.shards) - 1} in order (got {numbers})")
        if self.total_rows != sum(e.rows for e in self.shards):
            raise ValueError(f"total_rows {self.total_rows} != sum of shard rows {sum(e.rows for e in self.shards)}")
        if self.format_version < SEGMENTS_FORMAT and any(e.delta for e in self.shards):
            raise ValueError(f"shards with a delta segment need format_version {SEGMENTS_FORMAT}")
        return self


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    """Write ``directory/manifest.json`` (the caller makes it visible atomically, with its directory)."""
    (directory / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def read_manifest(path: str | Path) -> IndexManifest:
    """The manifest of the index version at ``path`` (files are not checked: see ``verify_index``).

    Raises:
        FileNotFoundError: ``path`` has no manifest (not an index version, or a build in progress).
        ValueError: the manifest is not valid, or was written by another format version.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: not an index version (no {MANIFEST})")
    manifest = IndexManifest.model_validate_json((path / MANIFEST).read_text())
    if manifest.format_version not in FORMATS:
        raise ValueError(f"{path}: index format {manifest.format_version}, this code reads {list(FORMATS)}")
    return manifest
