"""The manifest of an index version: what it was built from, how, and the checksum of every shard file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ShardEntry(BaseModel):
    """One shard's files: a Faiss index (vectors keyed by item id) and a Parquet table of item metadata."""

    shard: int = Field(ge=0, description="shard number s: holds the items with shard_of(item_id) == s")
    index_file: str
    metadata_file: str
    rows: int = Field(ge=0, description="items in the shard (vectors in the index = rows of the metadata)")
    sha256: dict[str, str] = Field(description="file name -> sha256, for both files")

    @model_validator(mode="after")
    def _checksums_cover_files(self) -> ShardEntry:
        if set(self.sha256) != {self.index_file, self.metadata_file}:
            raise ValueError(f"shard {self.shard}: sha256 must list exactly {self.index_file} and "
                             f"{self.metadata_file} (got {sorted(self.sha256)})")
        return self


class DeltaRecord(BaseModel):
    """How a version made by a delta update (``index/update.py``) differs from the version it was applied to."""

    base: str = Field(description="the index version the delta was applied to")
    added: int = Field(ge=0, description="items in the new catalogue only")
    removed: int = Field(ge=0, description="items in the base only")
    changed: int = Field(ge=0, description="items in both whose compared columns differ (re-embedded)")
    unchanged: int = Field(ge=0, description="items kept with their base vectors")
    shards_touched: list[int] = Field(description="shards rewritten; the others hold the base's files")


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
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(f"{path}: index format {manifest.format_version}, this code reads {FORMAT_VERSION}")
    return manifest
