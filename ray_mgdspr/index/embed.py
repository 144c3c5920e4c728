"""Catalogue embedding: the bundle's item tower over every item, as a Ray Data actor pool.

```
items.parquet's row ranges (one per row group, >= actors) ─▶ map_batches(EmbeddingWriter, ActorPoolStrategy)
   each actor: its range's row groups (ITEM_COLUMNS) ─▶ item tower ─▶ <embed.out>/<model version>/part-<uuid>.parquet
```

Each actor loads only the item tower, once, reads the rows of each range it is given straight from the catalogue's
Parquet file and writes their vectors as one Parquet part itself; only the ranges go in through Ray and only the
part's name, row count and timings come back. Ray Data's ``read_parquet`` reads a file in one task: at 1M items it spent
4.2-4.5 s reading the whole catalogue into one block before any actor had work, then two repartition tasks split it
(2026-12-06, ``ray.timeline()``). Through Ray Data's ``write_parquet`` the vectors, 512 MB per million items at
d = 128, crossed the object store to separate writer tasks: 6.5 CPU-seconds of a 26-second, 1M-item run on two
cores. The catalogue streams range by range, so memory is bounded by the ranges in flight, not the catalogue size;
the price levels' edges (a few per leaf category) are the bundle's (those the model was trained with), else cut once
by the driver from the catalogue's leaf and price columns, and handed to every actor. The set is written into a
temporary directory and renamed into place when complete, with ``embeddings.json`` (model version and checksum,
rows, dim) beside it; a part written by an attempt Ray retried is not counted, and removed.
``read_embeddings`` accepts the vector column both as Ray's Arrow tensor type and as ``list<float>``.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_mgdspr.artifacts import atomic_dir
from ray_mgdspr.config import EmbedConfig
from ray_mgdspr.data import schema
from ray_mgdspr.data.features import ITEM_COLUMNS, ItemContext, item_features
from ray_mgdspr.model.bundle import item_context, load_bundle, read_bundle_manifest
from ray_mgdspr.model.layers import as_tensors

MANIFEST = "embeddings.json"


class EmbeddingsManifest(BaseModel):
    """``embeddings.json`` of an embedding set: what made the vectors (the contract ``index build`` reads)."""

    model_config = ConfigDict(extra="forbid")

    model_version: str = Field(description="version id of the bundle whose item tower made the vectors")
    model_files: dict[str, str] = Field(description="the bundle's file name -> sha256 (item_tower.pt among them)")
    bundle: str | None = Field(None, description="absolute path of that bundle when the set was made")
    rows: int = Field(ge=0, description="items embedded (one per catalogue item)")
    dim: int = Field(ge=1, description="embedding size d")
    world: str = Field(description="the world whose catalogue was embedded")
    seconds: float = Field(ge=0, description="how long the embedding took")

    @property
    def item_tower_checksum(self) -> str:
        return self.model_files["item_tower.pt"]


def read_embeddings_manifest(path: str | Path) -> EmbeddingsManifest:
    """The manifest of the embedding set at ``path``.

    Raises:
        FileNotFoundError: ``path`` is not an embedding set. ValueError: its manifest is not valid (each
            problem named by field).
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not an embedding set (no {MANIFEST}); run `mgdspr embed`")
    try:
        manifest = EmbeddingsManifest.model_validate_json(file.read_text())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise ValueError(f"{file}: invalid embeddings manifest: {problems}") from None
    if "item_tower.pt" not in manifest.model_files:
        raise ValueError(f"{file}: model_files has no item_tower.pt checksum (re-run `mgdspr embed`)")
    return manifest


class ItemEmbedder:
    """Callable class for ``map_batches``: item rows (``ITEM_COLUMNS``) -> (``item_id``, ``embedding``). Loads
    the item tower of ``bundle`` once per actor, on ``device`` (``auto``: CUDA when the actor has a GPU);
    ``context``: the model's price levels and popularity counts (``bundle.item_context``)."""

    def __init__(self, bundle: str, context: ItemContext, device: str = "auto") -> None:
        self.model, self.vocab, manifest = load_bundle(bundle, towers=("item",))
        self.width, self.context = manifest.features.title_words_kept, context
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.model.to(self.device)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        features = item_features(batch, self.vocab, self.width, self.context)
        h = self.model.embed_items(as_tensors(features, self.device))
        return {"item_id": features["item_id"], "embedding": h.float().cpu().numpy()}


class RowRanges:
    """Rows of a Parquet file by position: ``read(start, stop)`` reads only the row groups the range overlaps."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.file, self.columns = pq.ParquetFile(path), columns
        self.sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])  # group g: starts[g]..starts[g+1]

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows ``start`` to ``stop`` (exclusive) of ``columns``."""
        if not 0 <= start <= stop <= self.starts[-1]:
            raise IndexError(f"rows {start}..{stop} of {self.file.metadata.num_rows}")
        first = max(0, int(np.searchsorted(self.starts, start, side="right")) - 1)
        last = int(np.searchsorted(self.starts, stop, side="left"))  # row groups first..last-1 hold the range
        table = self.file.read_row_groups(range(first, max(first, last)), columns=self.columns)
        return table.slice(start - int(self.starts[first]), stop - start)


class EmbeddingWriter(ItemEmbedder):
    """Callable class for ``map_batches(batch_size=None)`` over a dataset of row ranges (``start``, ``stop``) of
    the catalogue file ``items``: reads each range's rows (``ITEM_COLUMNS``, only the row groups it overlaps),
    embeds them ``batch_size`` items at a time and writes their vectors as one Parquet part (``item_id``,
    ``embedding`` as an Arrow fixed-shape tensor) into ``directory``; returns one row per part: its file name, rows,
    the actor (host:pid), when it began and the seconds spent reading, embedding and writing."""

    def __init__(self, bundle: str, context: ItemContext, items: str, directory: str, batch_size: int,
                 device: str = "auto") -> None:
        super().__init__(bundle, context, device)
        self.items = RowRanges(items, ITEM_COLUMNS)
        self.directory, self.batch_size = Path(directory), batch_size
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, ranges: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = []
        for start, stop in zip(ranges["start"].tolist(), ranges["stop"].tolist(), strict=True):
            started, t0 = time.time(), time.perf_counter()
            rows = self.items.read(start, stop)
            t1 = time.perf_counter()
            parts = [super(EmbeddingWriter, self).__call__(rows.slice(lo, self.batch_size))
                     for lo in range(0, rows.num_rows, self.batch_size)]
            ids = np.concatenate([p["item_id"] for p in parts]) if parts else np.zeros(0, np.int64)
            vectors = (np.concatenate([p["embedding"] for p in parts]) if parts
                       else np.zeros((0, self.model.cfg.d), np.float32))
            t2 = time.perf_counter()
            name = f"part-{uuid.uuid4().hex}.parquet"  # a retried range writes another name: only returned ones count
            pq.write_table(pa.table({"item_id": ids,
                                     "embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(vectors)}),
                           self.directory / name)
            written.append({"file": name, "rows": len(ids), "actor": self.actor, "started": started,
                            "read_s": t1 - t0, "embed_s": t2 - t1, "write_s": time.perf_counter() - t2})
        return {key: np.array([w[key] for w in written]) for key in written[0]}


class ActorStats(BaseModel):
    """What one embedding actor did: its ranges' rows and the seconds it spent reading, embedding and writing."""

    model_config = ConfigDict(extra="forbid")

    actor: str = Field(description="host:pid of the actor's process")
    parts: int = Field(ge=0)
    rows: int = Field(ge=0)
    read_s: float = Field(ge=0)
    embed_s: float = Field(ge=0)
    write_s: float = Field(ge=0)

    @property
    def busy_s(self) -> float:
        return self.read_s + self.embed_s + self.write_s

    @property
    def items_per_s(self) -> float:
        """Items per second while it had a range to embed."""
        return self.rows / self.busy_s if self.busy_s > 0 else 0.0


def actor_stats(parts: list[dict]) -> list[ActorStats]:
    """Per actor, from the rows ``EmbeddingWriter`` returned (one per part), busiest first."""
    by_actor: dict[str, list[dict]] = defaultdict(list)
    for p in parts:
        by_actor[p["actor"]].append(p)
    summed = ("rows", "read_s", "embed_s", "write_s")
    stats = [ActorStats(actor=actor, parts=len(ps), **{k: sum(p[k] for p in ps) for k in summed})
             for actor, ps in by_actor.items()]
    return sorted(stats, key=lambda a: -a.rows)


@dataclass
class EmbedResult:
    path: Path
    rows: int
    dim: int
    model_version: str
    seconds: float
    actors: list[ActorStats] = field(default_factory=list)
    first_range_s: float | None = None  # from the call's start to the first range an actor began: the start-up

    def summary(self) -> str:
        """One line on the pool: items/s per actor while busy, where their time went, the start-up."""
        if not self.actors:
            return "no actor embedded anything (an empty catalogue)"
        busy = sum(a.busy_s for a in self.actors) or 1.0
        shares = ", ".join(f"{k} {sum(getattr(a, f'{k}_s') for a in self.actors) / busy:.0%}"
                           for k in ("read", "embed", "write"))
        rates = ", ".join(f"{a.items_per_s:,.0f}" for a in self.actors)
        return (f"{len(self.actors)} actor(s): {rates} items/s each while busy ({shares}); pool "
                f"{self.rows / self.seconds:,.0f} items/s overall; first range began after {self.first_range_s:.1f}s")


def row_ranges(row_group_rows: list[int], min_rows: int, at_least: int = 1) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` that cover a file with these row groups, largest first: one per row group
    (consecutive row groups of fewer than ``min_rows`` rows together), so each row group is read once; when that
    gives fewer than ``at_least`` ranges, ``at_least`` ranges of equal row counts instead (at most one per
    ``min_rows`` rows; a range reads the whole row groups it overlaps, so those are read more than once).

    >>> row_ranges([100] * 4, 50, at_least=2)
    [(0, 100), (100, 200), (200, 300), (300, 400)]
    >>> row_ranges([30, 30, 30, 100, 10], 50), row_ranges([1000], 50, at_least=3), row_ranges([], 50, 3)
    ([(60, 190), (0, 60), (190, 200)], [(333, 667), (0, 333), (667, 1000)], [])
    """
    total, edges, rows = sum(row_group_rows), [0], 0
    for size in row_group_rows:
        rows += size
        if rows - edges[-1] >= min_rows:
            edges.append(rows)
    edges.append(total)
    ranges = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    if len(ranges) < at_least:
        n = max(1, min(at_least, total // max(1, min_rows)))
        ranges = [(a, b) for a, b in itertools.pairwise(round(k * total / n) for k in range(n + 1)) if b > a]
    return sorted(ranges, key=lambda r: r[0] - r[1])  # largest first: the last range to start is a short one


def embed_catalogue(world: str | Path, bundle: str | Path, cfg: EmbedConfig, overwrite: bool = False) -> EmbedResult:
    """Embed every item of ``world`` with the item tower of ``bundle`` into ``<cfg.out>/<model version>``."""
    import ray

    t0, wall0 = time.perf_counter(), time.time()
    model = read_bundle_manifest(bundle)  # checks the bundle before any actor starts
    items = Path(world) / schema.ITEMS.path_name()
    if not items.is_file():
        raise FileNotFoundError(f"{items}: no items table in world {world}")
    out = Path(cfg.out) / model.version
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_dir(out) as tmp:
        context = item_context(bundle, model, world)  # the model's own edges and counts when it has them
        catalogue = RowRanges(items, ITEM_COLUMNS)
        missing = sorted(set(ITEM_COLUMNS) - set(catalogue.file.schema_arrow.names))
        if missing:
            raise ValueError(f"{items}: no column(s) {', '.join(missing)} (an items table has {ITEM_COLUMNS})")
        expected = catalogue.file.metadata.num_rows
        ranges = row_ranges(catalogue.sizes, cfg.batch_size, at_least=cfg.actors)
        # one range per block: the actors take them one at a time and read their rows themselves
        ds = ray.data.from_items([{"start": a, "stop": b} for a, b in ranges], override_num_blocks=max(1, len(ranges)))
        ds = ds.map_batches(EmbeddingWriter, fn_constructor_kwargs={
            "bundle": str(Path(bundle).resolve()), "context": context, "items": str(items.resolve()),
            "directory": str(tmp), "batch_size": cfg.batch_size},
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.actors, len(ranges)))),  # no actor without a range
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None, batch_size=None, batch_format="numpy")
        written = ds.to_arrow_refs() if ranges else []  # runs the pipeline; each row names a part it wrote
        parts = pa.concat_tables(ray.get(written)).to_pylist() if written else []  # one dict per part
        for orphan in set(p.name for p in tmp.glob("part-*.parquet")) - {p["file"] for p in parts}:
            (tmp / orphan).unlink()  # the part of a block whose actor failed and was retried
        rows = sum(pq.ParquetFile(tmp / p["file"]).metadata.num_rows for p in parts)
        if rows != expected:
            raise RuntimeError(f"embedded {rows} items but {items} has {expected}")
        manifest = EmbeddingsManifest(model_version=model.version, model_files=model.files,
                                      bundle=str(Path(bundle).resolve()), rows=rows, dim=model.model.d,
                                      world=str(world), seconds=time.perf_counter() - t0)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    first = min((p["started"] for p in parts), default=None)
    return EmbedResult(out, rows, model.model.d, model.version, time.perf_counter() - t0, actor_stats(parts),
                       None if first is None else max(0.0, first - wall0))


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (N,) int64, vectors (N, d) float32) of an embedding set, in file order."""
    table = pq.read_table(sorted(str(p) for p in Path(path).glob("*.parquet")))
    return table["item_id"].to_numpy(), vectors_of(table["embedding"])


def vectors_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, d) float32 from Ray's Arrow tensor column or a ``(large_)list<float>`` column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ExtensionArray):  # Ray's tensor type or Arrow's fixed-shape tensor
        column = column.storage
    n = len(column)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)
