"""Build the shards of an index version of the catalogue embeddings, and check them.

Layout of one version directory (the index root around it, ``CURRENT`` and staging, is ``index/versions.py``)::

    <index root>/<version>/
      manifest.json            see manifest.py: factory, dim, rows and sha256 of every file
      shard-00000.faiss        IDMap2(<factory>): a search returns item ids
      shard-00000.parquet      item_id, leaf_id, cate1_id, brand_id, attr_value_ids, title_words, title, ...
      ...
      shard-00000.delta-<version>.{npy,parquet}, shard-00000.removed-<version>.npy
                               a delta update's changes since the base files (manifest ``ShardDelta``): the shard
                               serves the base less the removed ids plus the delta's items (``read_shard`` joins
                               them in memory, ``shard_items`` the metadata alone)

Item ``i`` lives in shard ``shard_of(i, S)``. Building one shard is one call, ``build_shard_files``,
which a Ray task can run; ``build_index_version`` is the whole build in one process, and the Ray layer
composes the same three steps::

    with staging_dir(root, version) as staging:           # index/versions.py
        entries = [build_shard_files(staging.path, s, data(s), config, dim) for s in range(S)]
        commit_version(staging, IndexManifest(...))        # manifest.json, then os.replace
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_mgdspr.artifacts import sha256_file
from ray_mgdspr.config import IndexConfig
from ray_mgdspr.index.manifest import IndexManifest, ShardDelta, ShardEntry, read_manifest
from ray_mgdspr.index.versions import commit_version, staging_dir

log = logging.getLogger(__name__)

BUILD_BACKEND = "faiss-cpu"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT}
METADATA_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("leaf_id", pa.int32()),
        pa.field("cate1_id", pa.int32()),
        pa.field("brand_id", pa.int32()),
        pa.field("attr_value_ids", pa.list_(pa.int32())),
        pa.field("title_words", pa.list_(pa.string())),
        pa.field("title", pa.string()),
        pa.field("shop_id", pa.int32()),
        pa.field("price", pa.float32()),
    ]
)
"""Per-item columns the post-retrieval relevance filter reads and a response shows, and the rest of what the item
tower reads (``shop_id``, ``price``: what a delta update compares, ``index/update.py``); types as in
``data/schema.py`` ``ITEMS``."""
OPTIONAL_METADATA = ("shop_id", "price")
"""Columns a shard's metadata may lack (synthetic test catalogues, versions built before delta updates): null."""


class IndexCorruptError(ValueError):
    """An index version that fails verification; the message names the shard and file of every problem."""


ShardBuilder = Callable[[Path, Callable[[int], "ShardData"]], list[ShardEntry]]


class ShardData(NamedTuple):
    """What one shard is built from.

    Args:
        vectors: (n, d) float32 item embeddings.
        item_ids: (n,) int64, unique; all with ``shard_of(item_ids, S) == shard``.
        metadata: one row per item id (any order) with the columns of ``METADATA_SCHEMA`` (more are dropped).
    """

    vectors: np.ndarray
    item_ids: np.ndarray
    metadata: pa.Table


# --------------------------------------------------------------------------------------------------
# sharding


def shard_of(item_ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each item: splitmix64(item_id) % shards, the same in every process and machine.

    A mixing hash rather than ``item_id % shards``: ids are often assigned in blocks or strides (per
    category, per seller), and plain modulo would put a whole stride into one shard.

    Args:
        item_ids: (n,) integer ids (negative ids hash by their two's-complement bits).
        shards: S >= 1.

    Returns:
        (n,) int64 shard numbers in [0, S).

    Example:
        >>> shard_of(np.array([0, 1, 2, 3, 1_000_000_007]), 4)
        array([3, 1, 2, 1, 2])
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1 (got {shards})")
    z = np.ascontiguousarray(item_ids, dtype=np.int64).view(np.uint64)
    # splitmix64's finaliser; uint64 array arithmetic wraps around, which is the point
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(shards)).astype(np.int64)


def split_by_shard(vectors: np.ndarray, item_ids: np.ndarray, metadata: pa.Table, shards: int) -> list[ShardData]:
    """Split a whole catalogue's embeddings and metadata into ``shards`` parts by ``shard_of``.

    Args:
        vectors: (n, d) float32; row i is the embedding of ``item_ids[i]``.
        item_ids: (n,) int64.
        metadata: rows for the same items in any order, with an ``item_id`` column.
    """
    vector_shard = shard_of(item_ids, shards)
    metadata_shard = shard_of(metadata["item_id"].to_numpy(), shards)
    return [
        ShardData(np.asarray(vectors)[vector_shard == s], np.asarray(item_ids)[vector_shard == s],
                  metadata.filter(pa.array(metadata_shard == s)))
        for s in range(shards)
    ]


# --------------------------------------------------------------------------------------------------
# one shard


def new_index(dim: int, factory: str, metric: Literal["ip"] = "ip") -> faiss.IndexIDMap2:
    """An empty ``IDMap2(<factory>)`` index: ``add_with_ids`` stores item ids, searches return them."""
    try:
        return faiss.index_factory(dim, f"IDMap2,{factory}", METRICS[metric])
    except RuntimeError as e:
        raise ValueError(f"factory {factory!r} does not fit {dim}-d vectors: {_faiss_reason(e)}") from None


def build_shard(
    vectors: np.ndarray, item_ids: np.ndarray, factory: str, metric: Literal["ip"] = "ip",
    train_sample: int = 100_000, seed: int = 0,
) -> faiss.IndexIDMap2:
    """A trained and filled Faiss index over one shard's vectors, keyed by item id.

    IVF and PQ are trained on a seeded sample of at most ``train_sample`` vectors. An IVF whose lists
    outnumber the shard's vectors is an error, not clamped: a clamped index would not be the one the
    manifest's factory string names, and the fix (fewer lists, fewer shards) belongs in the config.

    Args:
        vectors: (n, d) float32.
        item_ids: (n,) int64, unique.
        factory: Faiss index_factory string without IDMap ("Flat", "IVF1024,Flat", "HNSW32", ...).

    Example:
        >>> index = build_shard(np.eye(3, dtype=np.float32), np.array([10, 20, 30]), "Flat")
        >>> index.search(np.array([[0.0, 1.0, 0.0]], np.float32), 1)[1]
        array([[20]])
    """
    vectors, item_ids = _checked_inputs(vectors, item_ids)
    index = new_index(vectors.shape[1], factory, metric)
    if not index.is_trained:
        _train(index, vectors, factory, train_sample, seed)
    index.add_with_ids(vectors, item_ids)
    return index


def write_shard(directory: str | Path, shard_no: int, index: faiss.IndexIDMap2, metadata: pa.Table) -> ShardEntry:
    """Write a shard's index and metadata (sorted by item id) into ``directory``; returns its manifest entry.

    Raises:
        ValueError: the metadata lacks a column, or does not hold exactly the index's item ids.
    """
    directory = Path(directory)
    table = _shard_metadata(shard_no, index, metadata)
    index_file, metadata_file = f"shard-{shard_no:05d}.faiss", f"shard-{shard_no:05d}.parquet"
    faiss.write_index(index, str(directory / index_file))
    pq.write_table(table, directory / metadata_file)
    return ShardEntry(shard=shard_no, index_file=index_file, metadata_file=metadata_file, rows=index.ntotal,
                      sha256={name: sha256_file(directory / name) for name in (index_file, metadata_file)})


def build_shard_files(directory: str | Path, shard_no: int, data: ShardData, config: IndexConfig,
                      dim: int) -> ShardEntry:
    """Build shard ``shard_no`` and write its files into ``directory``: the unit of work of one Ray task.

    Args:
        directory: the staging directory of the version being built (``staging_dir(...).path``).
        data: the shard's vectors (n, dim), item ids (n,) and metadata.
        config: factory, metric, train_sample, seed (shard s trains with seed + s), shards.
        dim: the model's embedding size; every shard must have it.
    """
    start = time.perf_counter()
    vectors = np.asarray(data.vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"shard {shard_no}: vectors have shape {vectors.shape}, expected (n, {dim})")
    _check_placement(np.asarray(data.item_ids), shard_no, config.shards)
    try:
        index = build_shard(vectors, data.item_ids, config.factory, config.metric, config.train_sample,
                            config.seed + shard_no)
    except ValueError as e:
        raise ValueError(f"shard {shard_no}: {e}") from e
    entry = write_shard(directory, shard_no, index, data.metadata)
    log.info("shard %d/%d: %s items, %s, %.1f s", shard_no, config.shards, f"{entry.rows:,}", config.factory,
             time.perf_counter() - start)
    return entry


def _checked_inputs(vectors: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    item_ids = np.ascontiguousarray(item_ids, dtype=np.int64)
    if vectors.ndim != 2 or item_ids.shape != (len(vectors),):
        raise ValueError(f"need vectors (n, d) and item_ids (n,); got {vectors.shape} and {item_ids.shape}")
    unique, counts = np.unique(item_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"item ids must be unique; {unique[counts > 1][:5].tolist()} occur more than once")
    return vectors, item_ids


def _train(index: faiss.Index, vectors: np.ndarray, factory: str, train_sample: int, seed: int) -> None:
    n = len(vectors)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and n < ivf.nlist:
        raise ValueError(f"factory {factory!r} has {ivf.nlist} inverted lists but the shard has only {n} vectors; "
                         f"use at most {max(1, n // 39)} lists (Faiss wants 39 training vectors per list) "
                         "or fewer shards")
    sample = np.arange(n) if n <= train_sample else np.sort(
        np.random.default_rng(seed).choice(n, size=train_sample, replace=False))
    try:
        index.train(vectors[sample])
    except RuntimeError as e:
        raise ValueError(f"factory {factory!r} cannot be trained on {len(sample)} vectors: {_faiss_reason(e)}"
                         ) from None


def _check_placement(item_ids: np.ndarray, shard_no: int, shards: int) -> None:
    # readers find an item's metadata by shard_of, so an item in the wrong shard would be lost to them
    owner = shard_of(item_ids, shards)
    wrong = owner != shard_no
    if wrong.any():
        raise ValueError(f"shard {shard_no}: {int(wrong.sum())} item ids belong to other shards (item "
                         f"{int(item_ids[wrong][0])} -> shard {int(owner[wrong][0])}); split with split_by_shard")


def _with_optional(metadata: pa.Table) -> pa.Table:
    for name in OPTIONAL_METADATA:
        if name not in metadata.column_names:
            metadata = metadata.append_column(name, pa.nulls(metadata.num_rows, METADATA_SCHEMA.field(name).type))
    return metadata


def _shard_metadata(shard_no: int, index: faiss.IndexIDMap2, metadata: pa.Table) -> pa.Table:
    metadata = _with_optional(metadata)
    missing = [c for c in METADATA_SCHEMA.names if c not in metadata.column_names]
    if missing:
        raise ValueError(f"shard {shard_no}: metadata lacks columns {missing}")
    table = metadata.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA).sort_by("item_id")
    index_ids = np.sort(faiss.vector_to_array(index.id_map))
    table_ids = table["item_id"].to_numpy()
    if len(table_ids) != len(index_ids):
        raise ValueError(f"shard {shard_no}: metadata has {len(table_ids)} rows, the index {len(index_ids)} items")
    if not np.array_equal(table_ids, index_ids):
        stray = np.setdiff1d(table_ids, index_ids)
        raise ValueError(f"shard {shard_no}: metadata item ids differ from the index's (e.g. {stray[:5].tolist()} "
                         "are not in the index)")
    return table


def _faiss_reason(e: RuntimeError) -> str:
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(e))  # drop the C++ location


# --------------------------------------------------------------------------------------------------
def build_index_version(
    root: str | Path, version: str, shards: Sequence[ShardData] | Callable[[int], ShardData],
    config: IndexConfig, model_version: str, model_checksum: str, dim: int, make_current: bool = False,
    build_shards: ShardBuilder | None = None, bundle: str | None = None,
) -> IndexManifest:
    """Build every shard, write the manifest and move the version into place; all or nothing.

    Args:
        root: index root (``config.out`` usually).
        version: the new version's id; by the house rule the model bundle's version id.
        shards: ``config.shards`` ShardData (from ``split_by_shard``), or a function from shard number to
            ShardData, called one shard at a time so only one shard's vectors need be in memory.
        model_version, model_checksum: the bundle whose item tower made the vectors.
        dim: embedding size d of the vectors.
        make_current: point ``root/CURRENT`` at the new version once it is in place.
        build_shards: runs ``build_shard_files`` for every shard into the staging directory and returns the
            entries in shard order (the Ray layer runs them as parallel tasks); default: one after another
            in this process.
        bundle: path of the model bundle, recorded for serving.

    A failure anywhere leaves no version, no staging directory and ``CURRENT`` unchanged.
    """
    if version != model_version:
        log.warning("index version %r differs from its model's version %r; serving pairs them by id",
                    version, model_version)
    shard_data = _shard_source(shards, config.shards)
    start = time.perf_counter()
    with staging_dir(root, version) as staging:
        if build_shards is None:
            entries = [build_shard_files(staging.path, s, shard_data(s), config, dim) for s in range(config.shards)]
        else:
            entries = build_shards(staging.path, shard_data)
        manifest = IndexManifest(
            version=version, model_version=model_version, model_checksum=model_checksum, bundle=bundle,
            created_at=dt.datetime.now(dt.UTC), factory=config.factory, metric=config.metric, dim=dim,
            shards=entries, build_backend=BUILD_BACKEND, total_rows=sum(e.rows for e in entries),
            build_seconds=round(time.perf_counter() - start, 3),
        )
        path = commit_version(staging, manifest, make_current)
    log.info("index %s: %s items in %d shards (%s, d=%d) in %.1f s%s", path, f"{manifest.total_rows:,}",
             config.shards, config.factory, dim, manifest.build_seconds, "; now current" if make_current else "")
    return manifest


def _shard_source(shards: Sequence[ShardData] | Callable[[int], ShardData], n: int) -> Callable[[int], ShardData]:
    if callable(shards):
        return shards
    if len(shards) != n:
        raise ValueError(f"got {len(shards)} shards of data but config.shards is {n}")
    return shards.__getitem__


# --------------------------------------------------------------------------------------------------
# verification


def verify_index(path: str | Path) -> list[str]:
    """Every problem of the index version at ``path``; an empty list means it is sound.

    Checks each shard's files exist and match their sha256, that the Faiss index has the manifest's dim
    and row count, and that the metadata has that many rows. Each message names the shard and file.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    return [problem for entry in manifest.shards for problem in _shard_problems(path, manifest, entry)[0]]


def version_items(path: str | Path) -> pa.Table:
    """Every item of the index version at ``path``: its shards' metadata, sorted by item id (files not verified:
    ``verify_index``)."""
    path = Path(path)
    return pa.concat_tables([shard_items(path, e) for e in read_manifest(path).shards],
                            promote_options="default").sort_by("item_id")


def shard_items(path: str | Path, entry: ShardEntry) -> pa.Table:
    """The metadata of the items shard ``entry`` of the version at ``path`` serves (base files less the delta's
    removed ids, plus the delta's rows), sorted by item id (files not verified)."""
    path = Path(path)
    table = pq.read_table(path / entry.metadata_file)
    if entry.delta is None:
        return table
    removed = np.load(path / entry.delta.removed_file)
    kept = table.filter(pa.array(~np.isin(table["item_id"].to_numpy(), removed)))
    return pa.concat_tables([kept, pq.read_table(path / entry.delta.metadata_file)],
                            promote_options="default").sort_by("item_id")


def read_shard(path: str | Path, shard_no: int) -> tuple[IndexManifest, faiss.IndexIDMap2, pa.Table]:
    """Manifest, Faiss index and metadata table of one shard, after verifying that shard's files; a shard with a
    delta segment comes joined: the base index without the removed ids, with the delta's vectors added.

    Raises:
        IndexCorruptError: the shard fails verification (the message lists why).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not 0 <= shard_no < len(manifest.shards):
        raise ValueError(f"{path}: no shard {shard_no} (the index has {len(manifest.shards)})")
    entry = manifest.shards[shard_no]
    problems, index = _shard_problems(path, manifest, entry)
    if problems:
        raise IndexCorruptError(f"{path}: " + "; ".join(problems))
    if entry.delta is not None:
        d = entry.delta
        index = without(index, np.load(path / d.removed_file))
        ids = pq.read_table(path / d.metadata_file, columns=["item_id"])["item_id"].to_numpy()
        index.add_with_ids(np.load(path / d.vectors_file), ids)
    return manifest, index, shard_items(path, entry)


def without(index: faiss.IndexIDMap2, item_ids: np.ndarray) -> faiss.IndexIDMap2:
    """``index`` without the vectors of ``item_ids``.

    Flat (and any index that renumbers what it keeps): ``IndexIDMap2.remove_ids``. IVF: a copy whose inverted lists
    hold every kept entry with its code in its list, renumbered with the id map: ``remove_ids`` would leave the
    positions an IVF stores out of step with the compacted id map (the IVF does not renumber), and adding would then
    reuse positions still in use. Nothing is re-assigned to lists or re-encoded.

    Raises:
        RuntimeError: Faiss' own refusal (HNSW cannot remove vectors).
    """
    item_ids = np.ascontiguousarray(item_ids, np.int64)
    if not len(item_ids):
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        index.remove_ids(faiss.IDSelectorBatch(len(item_ids), faiss.swig_ptr(item_ids)))
        return index
    external = faiss.vector_to_array(index.id_map)
    keep = ~np.isin(external, item_ids)
    renumbered = np.cumsum(keep) - 1  # old position -> new position, for kept entries
    out = faiss.clone_index(index)
    out.reset()  # empty lists and id map; the coarse quantizer and any codebooks stay trained
    out_ivf = faiss.extract_index_ivf(out)
    lists, code_size = ivf.invlists, ivf.code_size
    for no in range(ivf.nlist):
        n = lists.list_size(no)
        if n == 0:
            continue
        positions = faiss.rev_swig_ptr(lists.get_ids(no), n).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(no), n * code_size).reshape(n, code_size)
        kept = keep[positions]
        if kept.any():
            # both arrays named: swig_ptr holds no reference, so a temporary would be freed before Faiss reads it
            ids = np.ascontiguousarray(renumbered[positions[kept]], np.int64)
            kept_codes = np.ascontiguousarray(codes[kept])
            out_ivf.invlists.add_entries(no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(kept_codes))
    out_ivf.ntotal = out.ntotal = int(keep.sum())
    faiss.copy_array_to_vector(external[keep], out.id_map)
    out.construct_rev_map()
    return out


def removable(factory: str, dim: int) -> str | None:
    """Why shards of ``factory`` cannot have vectors removed (a delta's removed and changed items), or None."""
    index = new_index(dim, factory)
    try:
        without(index, np.zeros(1, np.int64))
    except RuntimeError as e:
        return _faiss_reason(e)
    return None


def write_shard_delta(directory: str | Path, base: ShardEntry, tag: str, removed: np.ndarray, vectors: np.ndarray,
                      metadata: pa.Table) -> ShardEntry:
    """Shard ``base`` (whose base files are already in ``directory``) with a delta segment: ``removed`` (ids of its
    base files no longer served) and the items of ``metadata`` with their ``vectors`` (row for row) added; the files
    are named with ``tag`` (the new version), so a version's files never share a name with another's.

    Raises:
        ValueError: vectors and metadata differ in rows, or the metadata lacks a column.
    """
    directory = Path(directory)
    vectors = np.ascontiguousarray(vectors, np.float32)
    table = _with_optional(metadata).select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)
    order = np.argsort(table["item_id"].to_numpy(), kind="stable")
    table, vectors = table.take(pa.array(order)), vectors[order]
    if len(vectors) != table.num_rows:
        raise ValueError(f"shard {base.shard}: {len(vectors)} vectors for {table.num_rows} metadata rows")
    stem = f"shard-{base.shard:05d}"
    delta = ShardDelta(vectors_file=f"{stem}.delta-{tag}.npy", metadata_file=f"{stem}.delta-{tag}.parquet",
                       removed_file=f"{stem}.removed-{tag}.npy", rows=table.num_rows, removed=len(removed))
    np.save(directory / delta.vectors_file, vectors)
    pq.write_table(table, directory / delta.metadata_file)
    np.save(directory / delta.removed_file, np.sort(np.asarray(removed, np.int64)))
    sha = {name: base.sha256[name] for name in (base.index_file, base.metadata_file)}
    sha |= {name: sha256_file(directory / name) for name in (delta.vectors_file, delta.metadata_file,
                                                             delta.removed_file)}
    return ShardEntry(shard=base.shard, index_file=base.index_file, metadata_file=base.metadata_file,
                      rows=base.base_rows - delta.removed + delta.rows, sha256=sha, delta=delta)


def checksum_problems(path: Path, entry: ShardEntry, names: Sequence[str] | None = None) -> list[str]:
    """The files of shard ``entry`` at ``path`` (``names``, default all) that are missing or fail their sha256."""
    problems = []
    for name in entry.files if names is None else names:
        if not (path / name).is_file():
            problems.append(f"shard {entry.shard}: {name} is missing")
        elif sha256_file(path / name) != entry.sha256[name]:
            problems.append(f"shard {entry.shard}: {name} does not match its sha256 (corrupt or modified)")
    return problems


def _shard_problems(path: Path, manifest: IndexManifest, entry: ShardEntry) -> tuple[list[str], faiss.Index | None]:
    """The shard's problems, and its base index when the files are intact (read once, for ``read_shard``)."""
    label = f"shard {entry.shard}"
    problems = checksum_problems(path, entry)
    if problems:  # the contents of a damaged file say nothing more
        return problems, None
    try:
        index = faiss.read_index(str(path / entry.index_file))
    except RuntimeError as e:
        return [f"{label}: {entry.index_file} cannot be read by Faiss: {_faiss_reason(e)}"], None
    if index.d != manifest.dim:
        problems.append(f"{label}: {entry.index_file} holds {index.d}-d vectors, the manifest says dim {manifest.dim}")
    if index.ntotal != entry.base_rows:
        problems.append(f"{label}: {entry.index_file} holds {index.ntotal} vectors, the manifest says "
                        f"{entry.base_rows}")
    metadata_rows = pq.ParquetFile(path / entry.metadata_file).metadata.num_rows
    if metadata_rows != entry.base_rows:
        problems.append(f"{label}: {entry.metadata_file} has {metadata_rows} rows, the manifest says "
                        f"{entry.base_rows}")
    if entry.delta is not None:
        problems += _delta_problems(path, manifest, entry, label)
    return problems, index


def _delta_problems(path: Path, manifest: IndexManifest, entry: ShardEntry, label: str) -> list[str]:
    d = entry.delta
    assert d is not None
    try:
        vectors, removed = np.load(path / d.vectors_file, mmap_mode="r"), np.load(path / d.removed_file)
    except ValueError as e:
        return [f"{label}: its delta cannot be read by numpy: {e}"]
    problems = []
    if vectors.dtype != np.float32 or vectors.shape != (d.rows, manifest.dim):
        problems.append(f"{label}: {d.vectors_file} holds {vectors.dtype} {vectors.shape}, the manifest says "
                        f"float32 ({d.rows}, {manifest.dim})")
    if removed.dtype != np.int64 or removed.shape != (d.removed,):
        problems.append(f"{label}: {d.removed_file} holds {removed.dtype} {removed.shape}, the manifest says int64 "
                        f"({d.removed},)")
    metadata_rows = pq.ParquetFile(path / d.metadata_file).metadata.num_rows
    if metadata_rows != d.rows:
        problems.append(f"{label}: {d.metadata_file} has {metadata_rows} rows, the manifest says {d.rows}")
    return problems
