"""Daily catalogue changes applied to an index version as a new version, without re-embedding or re-indexing the
unchanged catalogue (``mgdspr index update``, ``jobs/update_index.py``).

```
<index root>/<base>/ (shards: vectors + metadata)     new catalogue (a world's items table)
        └──────────── plan_delta: compare item by item (every column the item tower or the filter reads) ──┐
   added, changed ─▶ ItemEmbedder (the base's model and its price levels) ─▶ new vectors               │
   removed, changed ─▶ remove_ids; new vectors ─▶ add_with_ids; metadata rows replaced, per shard  ◀─────┘
        ─▶ staging ─▶ manifest (checksums) ─▶ <index root>/<new version>/  (CURRENT, or promote on the endpoint)
```

What stays the same as a full build: the model (the bundle must be the base's: same version and item-tower
checksum), the shard of every item (``shard_of``), the price-level edges (the bundle's own, those it was trained
with, which a full build's embedding uses too), and the trained IVF centroids / PQ codebooks of each shard (a delta
adds to the trained index; retraining on the drifted catalogue is what a periodic full build is for). So on Flat
shards a delta gives exactly the index a full build of the new catalogue gives (tested, and measured at 1M items by
``benchmarks/bench_index_update.py``). A bundle written before it carried its edges: the delta then uses the edges
of the base's own catalogue (its metadata holds every item's leaf and price), which are the ones its vectors were
made with.

Shards the delta does not touch are linked (or copied) into the new version unchanged. Factories whose index cannot
remove vectors (HNSW) are refused with the reason: rebuild those with ``mgdspr index build``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_mgdspr.config import IndexConfig
from ray_mgdspr.data.features import ITEM_COLUMNS, ItemContext, ItemPopularity, PriceLevels
from ray_mgdspr.data.world import read_table
from ray_mgdspr.index.embed import ItemEmbedder
from ray_mgdspr.index.manifest import DeltaRecord, IndexManifest, ShardEntry, read_manifest
from ray_mgdspr.index.shards import (
    BUILD_BACKEND,
    METADATA_SCHEMA,
    OPTIONAL_METADATA,
    _faiss_reason,
    shard_of,
    verify_index,
    version_items,
    write_shard,
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
    rows: pa.Table  # the new catalogue's rows of added + changed items (CATALOGUE_COLUMNS)

    @property
    def replaced(self) -> np.ndarray:
        """Ids whose base vectors go (removed and changed)."""
        return np.union1d(self.removed, self.changed)


def base_catalogue(path: str | Path) -> pa.Table:
    """Every item of the index version at ``path`` (its shards' metadata, sorted by item id).

    Raises:
        ValueError: the version's metadata lacks ``price``/``shop_id`` (built before delta updates).
    """
    table = version_items(path)
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


def plan_delta(base: pa.Table, catalogue: pa.Table) -> Delta:
    """Compare a base version's items (``base_catalogue``) with a new catalogue (rows of ``CATALOGUE_COLUMNS``).

    Raises:
        ValueError: the new catalogue repeats an item id.
    """
    catalogue = catalogue.sort_by("item_id")
    new_ids, old_ids = catalogue["item_id"].to_numpy(), base["item_id"].to_numpy()
    if len(np.unique(new_ids)) != len(new_ids):
        raise ValueError("the new catalogue repeats item ids; each item must appear once")
    common, new_at, old_at = np.intersect1d(new_ids, old_ids, assume_unique=True, return_indices=True)
    differs_ = differs(catalogue.take(pa.array(new_at)), base.take(pa.array(old_at)))
    added = np.setdiff1d(new_ids, old_ids, assume_unique=True)
    changed = common[differs_]
    embed = np.union1d(added, changed)
    rows = catalogue.take(pa.array(np.searchsorted(new_ids, embed)))
    return Delta(added, np.setdiff1d(old_ids, new_ids, assume_unique=True), changed, int((~differs_).sum()), rows)


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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # versions are immutable, so sharing the bytes is safe
    except OSError:
        shutil.copy2(src, dst)


def _apply_to_shard(base: Path, entry: ShardEntry, metadata: pa.Table, staging: Path, replaced: np.ndarray,
                    ids: np.ndarray, vectors: np.ndarray, rows: pa.Table, factory: str) -> ShardEntry:
    """Shard ``entry`` of ``base`` (``metadata``: its rows) with ``replaced`` ids removed and (``ids``, ``vectors``,
    ``rows``) added."""
    index = faiss.read_index(str(base / entry.index_file))
    if len(replaced):
        try:
            index = without(index, replaced)
        except RuntimeError as e:
            raise ValueError(f"shard {entry.shard}: factory {factory!r} cannot remove vectors "
                             f"({_faiss_reason(e)}); rebuild with `mgdspr index build`") from None
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
    keep = pc.invert(pc.is_in(metadata["item_id"], pa.array(replaced, pa.int64())))
    metadata = pa.concat_tables([metadata.filter(keep), rows.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)])
    return write_shard(staging, entry.shard, index, metadata)


def apply_delta(root: str | Path, base: str, old: pa.Table, version: str, delta: Delta, ids: np.ndarray,
                vectors: np.ndarray, make_current: bool = False) -> IndexManifest:
    """Write ``root/version``: the base version (``old``: its items, ``base_catalogue``, read once) with ``delta``
    applied (``ids``/``vectors``: the embedded added and changed items); all or nothing, like a full build
    (``staging_dir`` + ``commit_version``)."""
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
    old_items_shard = shard_of(old["item_id"].to_numpy(), shards)
    entries, touched = [], []
    with staging_dir(root, version) as staging:
        for entry in manifest.shards:
            s = entry.shard
            mine, gone = new_shard == s, replaced[old_shard == s]
            if not mine.any() and not len(gone):
                for name in entry.sha256:
                    _link_or_copy(base_path / name, staging.path / name)
                entries.append(entry)
                continue
            touched.append(s)
            entries.append(_apply_to_shard(base_path, entry, old.filter(pa.array(old_items_shard == s)),
                                           staging.path, gone, ids[mine], vectors[mine],
                                           delta.rows.filter(pa.array(mine)), manifest.factory))
        record = DeltaRecord(base=base, added=len(delta.added), removed=len(delta.removed),
                             changed=len(delta.changed), unchanged=delta.unchanged, shards_touched=touched)
        new = IndexManifest.model_validate({  # validated again: the manifest's own checks
            **manifest.model_dump(), "version": version, "created_at": dt.datetime.now(dt.UTC), "shards": entries,
            "total_rows": sum(e.rows for e in entries), "build_backend": BUILD_BACKEND, "delta": record,
            "build_seconds": round(time.perf_counter() - start, 3)})
        commit_version(staging, new, make_current)
    log.info("index %s: %s from %s (+%d, -%d, ~%d items; shards %s rewritten) in %.1f s", root / version,
             f"{new.total_rows:,}", base, len(delta.added), len(delta.removed), len(delta.changed), touched,
             time.perf_counter() - start)
    return new


@dataclass
class UpdateResult:
    manifest: IndexManifest
    embed_seconds: float  # re-embedding the added and changed items
    apply_seconds: float  # removing, adding and writing the touched shards
    seconds: float  # the whole update, reading the base and the catalogue included

    @property
    def delta(self) -> DeltaRecord:
        assert self.manifest.delta is not None
        return self.manifest.delta


def update_index(catalogue: str | Path | pa.Table, bundle: str | Path, config: IndexConfig, base: str | None = None,
                 version: str | None = None, make_current: bool = True, batch_size: int = 1024,
                 progress: Callable[[str], None] | None = None) -> UpdateResult:
    """Apply a new catalogue (a world, whose items table is read, or the rows of one) to index version ``base``
    (default: ``CURRENT`` of ``config.out``) as a new version ``version`` (default ``<model version>.d<UTC time>``).

    Raises:
        FileNotFoundError: no base version. ValueError: the bundle is not the base's model, the base predates
            delta updates, or its factory cannot remove vectors. FileExistsError: ``version`` exists.
    """
    say = progress or (lambda _: None)
    t0 = time.perf_counter()
    root = Path(config.out)
    base = base or current_version(root)
    if base is None:
        raise FileNotFoundError(f"{root}: no CURRENT index version to update; name one with --base, or build one "
                                "with `mgdspr index build`")
    problems = verify_index(root / base)
    if problems:
        raise ValueError(f"{root / base}: the base version fails verification: {'; '.join(problems)}")
    manifest = read_manifest(root / base)
    model = parse_bundle_manifest(bundle)  # its files are checked once, when ItemEmbedder loads the item tower
    if model.version != manifest.model_version or model.files.get("item_tower.pt") != manifest.model_checksum:
        raise ValueError(f"{bundle}: model {model.version} is not the model of index version {base} "
                         f"({manifest.model_version}, item tower {manifest.model_checksum[:12]}); a delta re-embeds "
                         "with the base's model: use its bundle, or build a new model's index in full")
    version = version or f"{model.version}.d{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}"
    old = base_catalogue(root / base)
    if not isinstance(catalogue, pa.Table):
        catalogue = read_table(catalogue, "items", columns=CATALOGUE_COLUMNS)
    delta = plan_delta(old, catalogue.select(CATALOGUE_COLUMNS))
    say(f"delta against {base}: +{len(delta.added):,} new, -{len(delta.removed):,} removed, "
        f"~{len(delta.changed):,} changed, {delta.unchanged:,} unchanged")
    t = time.perf_counter()
    prices = price_levels(bundle, model) or PriceLevels(  # the model's edges, else the base catalogue's
        old["leaf_id"].fill_null(-1).to_numpy(), old["price"].to_numpy(zero_copy_only=False).astype(np.float64))
    popularity = item_popularity(bundle, model) or ItemPopularity.empty()  # a bundle from training always has it
    ids, vectors = embed_rows(bundle, delta.rows, ItemContext(prices, popularity), batch_size)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    new = apply_delta(root, base, old, version, delta, ids, vectors, make_current)
    return UpdateResult(new, embed_s, time.perf_counter() - t, time.perf_counter() - t0)
