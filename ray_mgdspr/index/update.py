"""Daily catalogue changes applied to an index version as a new version, without re-embedding, re-indexing or
rewriting the unchanged catalogue (``mgdspr index update``, ``jobs/update_index.py``).

```
<index root>/<base>/ (shards' metadata)              new catalogue (a world's items table)
      └── plan_delta, shard by shard: compare item by item (every column the item tower or the filter reads) ──┐
   added, changed ─▶ ItemEmbedder (the base's model and its price levels) ─▶ new vectors                      │
   each touched shard: its base files linked as they are + one delta segment (removed ids; the added and    ◀─┘
       changed items' vectors and metadata); once its changes reach IndexConfig.compact_at of the base files,
       the shard is rewritten in full instead (remove_ids + add_with_ids: a compaction)
      ─▶ staging ─▶ manifest (checksums) ─▶ <index root>/<new version>/  (CURRENT, or promote on the endpoint)
```

A delta segment (``manifest.ShardDelta``) is the small fresh segment beside a big one of LSM-style stores: the
update writes only the changed items, and a reader joins the segment to the base files when it loads the shard
(``shards.read_shard``: the base index less the removed ids, plus the delta's vectors, so Flat gives the index a full
build gives, and IVF the base's lists with the delta assigned to them). A delta applied to a version with segments
folds them into one: a shard is its base files plus at most one segment, however many days since its compaction.

What stays the same as a full build: the model (the bundle must be the base's: same version and item-tower
checksum), the shard of every item (``shard_of``), the price-level edges (the bundle's own, those it was trained
with, which a full build's embedding uses too), and the trained IVF centroids / PQ codebooks of each shard (a delta
adds to the trained index; retraining on the drifted catalogue is what a periodic full build is for). So on Flat
shards a delta gives exactly the index a full build of the new catalogue gives (tested, and measured at 1M items by
``benchmarks/bench_index_update.py``). A bundle written before it carried its edges: the delta then uses the edges
of the base's own catalogue (its metadata holds every item's leaf and price), which are the ones its vectors were
made with.

The update reads the base's metadata and delta segments (checked against their checksums first) and, to compact,
the shards it rewrites; it does not read the index files it links, so a damaged one passes into the new version
unread, where loading or promoting that version finds it by its checksum, as it would in the base. Factories whose
index cannot remove vectors (HNSW) are refused with the reason when a delta removes or changes items: rebuild those
with ``mgdspr index build``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_mgdspr.config import IndexConfig
from ray_mgdspr.data.features import ITEM_COLUMNS, ItemContext, ItemPopularity, PriceLevels
from ray_mgdspr.data.world import read_table
from ray_mgdspr.index.embed import ItemEmbedder
from ray_mgdspr.index.manifest import (
    FORMAT_VERSION,
    SEGMENTS_FORMAT,
    DeltaRecord,
    IndexManifest,
    ShardEntry,
    read_manifest,
)
from ray_mgdspr.index.shards import (
    BUILD_BACKEND,
    METADATA_SCHEMA,
    OPTIONAL_METADATA,
    IndexCorruptError,
    checksum_problems,
    read_shard,
    removable,
    shard_items,
    shard_of,
    version_items,
    without,
    write_shard,
    write_shard_delta,
)
from ray_mgdspr.index.versions import commit_version, current_version, staging_dir
from ray_mgdspr.model.bundle import item_popularity, parse_bundle_manifest, price_levels

log = logging.getLogger(__name__)

COMPARED = ("title", "title_words", "price", "leaf_id", "cate1_id", "brand_id", "shop_id", "attr_value_ids")
"""The columns whose change makes an item 'changed': every input of the item tower and of the relevance filter."""
CATALOGUE_COLUMNS = sorted(set(ITEM_COLUMNS) | set(METADATA_SCHEMA.names))


@dataclass
class Delta:
    """Item ids of a planned delta (each (n,) int64, sorted) and the new catalogue's rows to embed."""

    added: np.ndarray
    removed: np.ndarray
    changed: np.ndarray
    unchanged: int
    rows: pa.Table  # the new catalogue's rows of added + changed items (CATALOGUE_COLUMNS), by item id

    @property
    def replaced(self) -> np.ndarray:
        """Ids whose base vectors go (removed and changed)."""
        return np.union1d(self.removed, self.changed)

    @classmethod
    def join(cls, parts: list[Delta]) -> Delta:
        """One delta of the deltas of disjoint sets of items (the shards')."""
        rows = pa.concat_tables([p.rows for p in parts], promote_options="default")
        rows = rows.take(pa.array(np.argsort(rows["item_id"].to_numpy(), kind="stable")))
        return cls(*(np.sort(np.concatenate([getattr(p, f) for p in parts])) for f in ("added", "removed", "changed")),
                   sum(p.unchanged for p in parts), rows)


def base_catalogue(path: str | Path) -> pa.Table:
    """Every item of the index version at ``path`` (its shards' metadata, sorted by item id).

    Raises:
        ValueError: the version's metadata lacks ``price``/``shop_id`` (built before delta updates).
    """
    return _comparable(version_items(path), path)


def _comparable(table: pa.Table, path: str | Path) -> pa.Table:
    lacking = [c for c in OPTIONAL_METADATA if c not in table.column_names
               or (table.num_rows and table[c].null_count == table.num_rows)]
    if lacking:
        raise ValueError(f"{path}: the shards' metadata has no {' or '.join(lacking)} (a version built before delta "
                         "updates, or from a catalogue without them): build the next version in full with "
                         "`mgdspr index build`; deltas apply after that")
    return table


def differs(a: pa.Table, b: pa.Table, columns: tuple[str, ...] = COMPARED) -> np.ndarray:
    """(n,) bool: whether row i of ``a`` and row i of ``b`` differ in any of ``columns`` (a null equals a null only;
    lists compare element by element). Arrow compute kernels: about a second for a million rows.

    >>> a = pa.table({"title": ["red tee", None], "title_words": [["red", "tee"], []], "price": [9.5, None]})
    >>> b = pa.table({"title": ["red tee", None], "title_words": [["red", "tee"], None], "price": [9.5, 1.0]})
    >>> differs(a, b, ("title", "title_words", "price")).tolist()
    [False, True]
    """
    out = np.zeros(a.num_rows, bool)
    for name in columns:
        x, y = a[name], b[name]
        if pa.types.is_list(x.type) or pa.types.is_large_list(x.type):
            # a list as one string: elements joined by a separator no title word holds; "" and null kept apart
            x, y = (pc.binary_join(pc.cast(c, pa.list_(pa.string())), "\x1f") for c in (x, y))
            x, y = (pc.if_else(pc.equal(pc.list_value_length(c), 0), "\x1e", j) for c, j in ((a[name], x),
                                                                                             (b[name], y)))
        elif x.type != y.type:
            y = pc.cast(y, x.type)
        same = pc.or_kleene(pc.equal(x, y), pc.and_(pc.is_null(x), pc.is_null(y)))
        out |= ~pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    return out


def by_item_id(table: pa.Table, what: str = "the new catalogue") -> pa.Table:
    """``table`` sorted by item id (as it is, when it already is: a sort moves every row of every column).

    Raises:
        ValueError: an item id appears twice.
    """
    ids = table["item_id"].to_numpy()
    steps = np.diff(ids)
    if (steps > 0).all():
        return table
    if (steps != 0).all():
        order = np.argsort(ids, kind="stable")
        table, steps = table.take(pa.array(order)), np.diff(ids[order])
    if (steps == 0).any():
        raise ValueError(f"{what} repeats item ids (e.g. {ids[1:][steps == 0][:3].tolist()}); each item must "
                         "appear once")
    return table


def plan_delta(base: pa.Table, catalogue: pa.Table) -> Delta:
    """Compare a base version's items (``base_catalogue``, or one shard's: ``shards.shard_items``) with a new
    catalogue (rows of ``CATALOGUE_COLUMNS``); either in any order. Rows are aligned by item id in order, so sorted
    inputs are compared without moving a row.

    Raises:
        ValueError: the new catalogue repeats an item id.
    """
    catalogue, base = by_item_id(catalogue), by_item_id(base, "the base version")
    new_ids, old_ids = catalogue["item_id"].to_numpy(), base["item_id"].to_numpy()
    in_base, in_new = np.isin(new_ids, old_ids, assume_unique=True), np.isin(old_ids, new_ids, assume_unique=True)
    # both sorted: the rows of the common ids, kept in order, line up (a filter copies runs; a take moves rows)
    differs_ = differs(catalogue.select(COMPARED).filter(pa.array(in_base)),
                       base.select(COMPARED).filter(pa.array(in_new)))
    embed = ~in_base
    embed[np.flatnonzero(in_base)[differs_]] = True
    return Delta(new_ids[~in_base], old_ids[~in_new], new_ids[in_base][differs_], int((~differs_).sum()),
                 catalogue.filter(pa.array(embed)))


def embed_rows(bundle: str | Path, rows: pa.Table, context: ItemContext, batch_size: int = 1024
               ) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (n,), vectors (n, d)) of catalogue rows, embedded in this process by ``ItemEmbedder`` (the class
    Ray Data's actors run for a full build), with the model's price levels and popularity counts."""
    if rows.num_rows == 0:  # removals only: no tower to load (its id table is the size of the catalogue)
        return np.zeros(0, np.int64), np.zeros((0, parse_bundle_manifest(bundle).model.d), np.float32)
    embedder = ItemEmbedder(str(bundle), context, device="cpu")
    ids, vectors = [np.zeros(0, np.int64)], [np.zeros((0, embedder.model.cfg.d), np.float32)]
    for lo in range(0, rows.num_rows, batch_size):
        out = embedder(rows.slice(lo, batch_size).select(ITEM_COLUMNS))
        ids.append(out["item_id"])
        vectors.append(out["embedding"])
    return np.concatenate(ids), np.concatenate(vectors)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # versions are immutable, so sharing the bytes is safe
    except OSError:
        shutil.copy2(src, dst)


def _segment(base: Path, entry: ShardEntry, gone: np.ndarray, vectors: np.ndarray, rows: pa.Table
             ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Shard ``entry``'s changes since its base files once ``gone`` ids go and (``vectors``, ``rows``) come:
    (removed ids of the base files, delta vectors, delta metadata), its earlier delta segment folded in."""
    rows = rows.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)
    if entry.delta is None:
        return gone, vectors, rows
    d = entry.delta
    before = pq.read_table(base / d.metadata_file)
    before_ids = before["item_id"].to_numpy()
    stays = ~np.isin(before_ids, gone)
    # an id that goes and is not in the segment is served from the base files: it joins their removed ids
    removed = np.union1d(np.load(base / d.removed_file), gone[~np.isin(gone, before_ids)])
    return (removed, np.concatenate([np.load(base / d.vectors_file)[stays], vectors]),
            pa.concat_tables([before.filter(pa.array(stays)), rows]))


def apply_delta(root: str | Path, base: str, version: str, delta: Delta, ids: np.ndarray, vectors: np.ndarray,
                make_current: bool = False, compact_at: float = 0.1) -> IndexManifest:
    """Write ``root/version``: the base version with ``delta`` applied (``ids``/``vectors``: the embedded added and
    changed items); all or nothing, like a full build (``staging_dir`` + ``commit_version``).

    Each shard the delta touches keeps its base files (linked) and gets one delta segment with every change since
    them, unless those changes reach ``compact_at`` of the base files' items: then it is rewritten in full, as is
    an untouched shard whose segment reaches it (``compact_at=0`` compacts every shard with a change since its base
    files: a scheduled compaction).
    """
    root = Path(root)
    base_path = root / base
    manifest = read_manifest(base_path)
    shards = len(manifest.shards)
    start = time.perf_counter()
    order = np.argsort(ids)
    ids, vectors = ids[order], vectors[order]
    if not np.array_equal(ids, delta.rows["item_id"].to_numpy()):
        raise ValueError("the embedded ids differ from the delta's added and changed items")
    replaced = delta.replaced
    new_shard, old_shard = shard_of(ids, shards), shard_of(replaced, shards)
    entries, touched, compacted = [], [], []
    with staging_dir(root, version) as staging:
        for entry in manifest.shards:
            s = entry.shard
            mine, gone = new_shard == s, replaced[old_shard == s]
            changes = entry.delta.rows + entry.delta.removed if entry.delta else 0
            if not mine.any() and not len(gone) and (not changes or changes < compact_at * entry.base_rows):
                for name in entry.files:
                    _link_or_copy(base_path / name, staging.path / name)
                entries.append(entry)
                continue
            if mine.any() or len(gone):
                touched.append(s)
            removed, seg_vectors, seg_rows = _segment(base_path, entry, gone, vectors[mine],
                                                      delta.rows.filter(pa.array(mine)))
            if len(removed) + len(seg_vectors) >= compact_at * entry.base_rows:
                compacted.append(s)
                entries.append(_compact(base_path, entry, staging.path, gone, ids[mine], vectors[mine],
                                        delta.rows.filter(pa.array(mine))))
                continue
            for name in (entry.index_file, entry.metadata_file):
                _link_or_copy(base_path / name, staging.path / name)
            entries.append(write_shard_delta(staging.path, entry, version, removed, seg_vectors, seg_rows))
        record = DeltaRecord(base=base, added=len(delta.added), removed=len(delta.removed),
                             changed=len(delta.changed), unchanged=delta.unchanged, shards_touched=touched,
                             shards_compacted=compacted)
        new = IndexManifest.model_validate({  # validated again: the manifest's own checks
            **manifest.model_dump(), "version": version, "created_at": dt.datetime.now(dt.UTC),
            "shards": [e.model_dump() for e in entries], "total_rows": sum(e.rows for e in entries),
            "build_backend": BUILD_BACKEND, "delta": record, "build_seconds": round(time.perf_counter() - start, 3),
            "format_version": SEGMENTS_FORMAT if any(e.delta for e in entries) else FORMAT_VERSION})
        commit_version(staging, new, make_current)
    log.info("index %s: %s from %s (+%d, -%d, ~%d items; shards %s touched, %s compacted) in %.1f s", root / version,
             f"{new.total_rows:,}", base, len(delta.added), len(delta.removed), len(delta.changed), touched,
             compacted, time.perf_counter() - start)
    return new


def _compact(base: Path, entry: ShardEntry, staging: Path, gone: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
             rows: pa.Table) -> ShardEntry:
    """Shard ``entry`` rewritten in full as new base files: as served (its delta segment joined), less ``gone``,
    plus (``ids``, ``vectors``, ``rows``)."""
    try:
        _, index, metadata = read_shard(base, entry.shard)  # verified, and joined with its segment
    except IndexCorruptError as e:
        raise ValueError(f"cannot compact shard {entry.shard}: {e}") from None
    if len(gone):
        try:
            index = without(index, gone)
        except RuntimeError as e:
            raise ValueError(f"shard {entry.shard}: factory cannot remove vectors ({e})") from None
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
    kept = metadata.filter(pa.array(~np.isin(metadata["item_id"].to_numpy(), gone)))
    return write_shard(staging, entry.shard, index,
                       pa.concat_tables([kept, rows.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)]))


@dataclass
class UpdateResult:
    manifest: IndexManifest
    embed_seconds: float  # re-embedding the added and changed items
    apply_seconds: float  # writing the touched shards' delta segments (or compacting them)
    seconds: float  # the whole update, reading the base and the catalogue included

    @property
    def delta(self) -> DeltaRecord:
        assert self.manifest.delta is not None
        return self.manifest.delta


def update_index(catalogue: str | Path | pa.Table, bundle: str | Path, config: IndexConfig, base: str | None = None,
                 version: str | None = None, make_current: bool = True, batch_size: int = 1024,
                 progress: Callable[[str], None] | None = None) -> UpdateResult:
    """Apply a new catalogue (a world, whose items table is read, or the rows of one) to index version ``base``
    (default: ``CURRENT`` of ``config.out``) as a new version ``version`` (default ``<model version>.d<UTC time>``);
    shards whose changes reach ``config.compact_at`` are compacted.

    Raises:
        FileNotFoundError: no base version. ValueError: the bundle is not the base's model, the base predates
            delta updates or fails its checksums, or its factory cannot remove vectors. FileExistsError: ``version``
            exists.
    """
    say = progress or (lambda _: None)
    t0 = time.perf_counter()
    root = Path(config.out)
    base = base or current_version(root)
    if base is None:
        raise FileNotFoundError(f"{root}: no CURRENT index version to update; name one with --base, or build one "
                                "with `mgdspr index build`")
    manifest = read_manifest(root / base)
    model = parse_bundle_manifest(bundle)  # its files are checked once, when ItemEmbedder loads the item tower
    if model.version != manifest.model_version or model.files.get("item_tower.pt") != manifest.model_checksum:
        raise ValueError(f"{bundle}: model {model.version} is not the model of index version {base} "
                         f"({manifest.model_version}, item tower {manifest.model_checksum[:12]}); a delta re-embeds "
                         "with the base's model: use its bundle, or build a new model's index in full")
    version = version or f"{model.version}.d{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}"
    if (root / version).exists():
        raise FileExistsError(f"{root / version} exists; index versions are immutable: choose another --version")
    problems = _read_files_problems(root / base, manifest)
    if problems:
        raise ValueError(f"{root / base}: the base version fails verification: {'; '.join(problems)}")
    if not isinstance(catalogue, pa.Table):
        catalogue = read_table(catalogue, "items", columns=CATALOGUE_COLUMNS)
    catalogue = by_item_id(catalogue.select(CATALOGUE_COLUMNS))
    owner = shard_of(catalogue["item_id"].to_numpy(), len(manifest.shards))

    def plan_shard(entry: ShardEntry) -> Delta:
        return plan_delta(_comparable(shard_items(root / base, entry), root / base),
                          catalogue.filter(pa.array(owner == entry.shard)))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # Arrow's readers and kernels run without the GIL
        delta = Delta.join(list(pool.map(plan_shard, manifest.shards)))
    say(f"delta against {base}: +{len(delta.added):,} new, -{len(delta.removed):,} removed, "
        f"~{len(delta.changed):,} changed, {delta.unchanged:,} unchanged")
    if len(delta.replaced) and (why := removable(manifest.factory, manifest.dim)):
        raise ValueError(f"factory {manifest.factory!r} cannot remove vectors ({why}), and this delta removes or "
                         f"changes {len(delta.replaced):,} items; rebuild with `mgdspr index build`")
    t = time.perf_counter()
    old_items = None
    prices = price_levels(bundle, model)
    if prices is None:  # a bundle from before bundles carried their edges: the base catalogue's
        old_items = base_catalogue(root / base)
        prices = PriceLevels(old_items["leaf_id"].fill_null(-1).to_numpy(),
                             old_items["price"].to_numpy(zero_copy_only=False).astype(np.float64))
    popularity = item_popularity(bundle, model) or ItemPopularity.empty()  # a bundle from training always has it
    ids, vectors = embed_rows(bundle, delta.rows, ItemContext(prices, popularity), batch_size)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    new = apply_delta(root, base, version, delta, ids, vectors, make_current, config.compact_at)
    return UpdateResult(new, embed_s, time.perf_counter() - t, time.perf_counter() - t0)


def _read_files_problems(path: Path, manifest: IndexManifest) -> list[str]:
    """Checksum problems of the base's files a delta reads (metadata and delta segments; compaction verifies the
    shards it reads in full)."""
    return [problem for e in manifest.shards for problem in checksum_problems(
        path, e, [e.metadata_file, *((e.delta.metadata_file, e.delta.vectors_file, e.delta.removed_file)
                                     if e.delta else ())])]
