"""Ray Data ingest for training: search events of some days -> featurized (event, positive item) examples.

What streams
------------
:func:`training_dataset` reads the ``search_events`` day files of the training days with
``ray.data.read_parquet`` (only the columns the examples need), explodes each event into one row per positive
item in a task pool (:func:`~ray_mgdspr.data.features.explode_positives`, stateless) and featurizes batches in
a pool of actors (:class:`FeaturizeBatch`). The dataset is lazy: blocks flow through both stages into the
trainer's ``iter_torch_batches`` as they are produced, under Ray Data's backpressure. The driver never reads the
log itself, only the Parquet footers of the day files, to fail fast on a missing file, column or type.

Where memory goes
-----------------
A :class:`~ray_mgdspr.data.features.Featurizer` holds the items table and **every user's behaviours (click, buy,
collect) and query history of** ``history_days`` as numpy arrays: the part that grows with the log. With a
``share_dir`` (the trainer passes the run's directory) and ``data.share_history``, one task builds it once and
saves the arrays (:meth:`Featurizer.save`), and each :class:`FeaturizeBatch` actor memory-maps them: one copy per
node in the page cache, however many actors. Otherwise each actor builds its own: ``featurize_actors`` x
(history of ``history_days``).

Resources are configuration
---------------------------
:class:`~ray_mgdspr.config.DataConfig` sets the number of featurizer actors, their (fractional) CPUs, the rows
per featurize call and an optional repartition of the read (one Parquet file is one block, which feeds one
actor). On a 2-core machine whole CPUs per actor deadlock next to Ray Train; on a cluster they are whole CPUs.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ray_mgdspr.arrays import keep_temporaries_on_the_heap
from ray_mgdspr.artifacts import atomic_dir
from ray_mgdspr.config import DataConfig, FeatureConfig
from ray_mgdspr.data.features import (
    EXPLODE_COLUMNS,
    POSITIVE_COLUMNS,
    Featurizer,
    ItemContext,
    explode_positives,
)
from ray_mgdspr.data.schema import ITEMS, SEARCH_EVENTS, day_file_name
from ray_mgdspr.data.vocab import Vocabulary

log = logging.getLogger(__name__)


def training_dataset(world: str | Path, days: Iterable[int], vocab_path: str | Path, features: FeatureConfig,
                     data: DataConfig, history_days: Iterable[int] | None = None,
                     context: ItemContext | None = None, share_dir: str | Path | None = None) -> ray.data.Dataset:
    """Stream (search event, positive item) training examples of ``days``, featurized, as a Ray Dataset.

    The day files are checked (present, needed columns with the schema's types, at least one event) before
    anything runs; the dataset itself is lazy (the shared featurizer, when asked for, is saved here first).

    Args:
        world: a world directory, or a URI pyarrow understands (``s3://...``) for the search events; the
            featurizer actors read the rest of the world (items, histories) from a local path.
        days: day numbers of ``search_events`` (e.g. the manifest's ``train_days``).
        vocab_path: the vocabulary JSON file (each actor loads it).
        features: lengths and windows of the features.
        data: actors, CPUs per actor, rows per batch and repartitioning.
        history_days: days of behaviours and query history each actor loads (default: all days of the world).
        context: the items' price edges and popularity counts, computed once by the caller and handed to every
            actor (default: each actor computes the world's, a pass over the training days' search logs each).
        share_dir: with ``data.share_history``, a directory every node reads (the run's, on a cluster): one task
            builds the featurizer once and saves its arrays under ``share_dir/<key>`` (reused while the inputs are
            the same), and every actor memory-maps them (:meth:`Featurizer.load`), so a node holds one copy of
            the histories however many actors it runs. None: each actor builds its own.

    Returns:
        a dataset whose columns are the Featurizer's output keys (``query_chars``, ..., ``item_id``,
        ``item_title``, ``user_id``, ``ts``, ``event_id``), all int64.

    Raises:
        ValueError: ``days`` is empty or has no search events, a day file is missing or unreadable, or lacks a
            needed column or has it with another type than ``schema.SEARCH_EVENTS``.
    """
    files = search_event_files(world, days)
    cpus = {"num_cpus": data.read_cpus}  # fractional: Train workers may hold most of a small machine's CPUs
    ds = ray.data.read_parquet(files, **cpus).select_columns(EXPLODE_COLUMNS)  # projection pushed into the read
    if data.repartition is not None:
        ds = ds.repartition(data.repartition)
    ds = ds.map_batches(explode_positives, batch_format="pyarrow", **cpus)
    history_days = None if history_days is None else sorted(set(history_days))
    featurizer_args = {"world": str(world), "vocab_path": str(vocab_path), "features": features,
                       "history_days": history_days, "context": context}
    if data.share_history and share_dir is not None:
        key = _inputs_key(world, vocab_path, features, context, history_days=history_days)
        saved = _once(Path(share_dir), key, lambda tmp: ray.get(_save_featurizer.options(**cpus).remote(
            str(world), str(vocab_path), features, history_days, context, str(tmp))), "featurizer")
        featurizer_args = {"vocab_path": str(vocab_path), "saved": str(saved)}
    return ds.map_batches(FeaturizeBatch, fn_constructor_kwargs=featurizer_args,
                          compute=ray.data.ActorPoolStrategy(size=data.featurize_actors),
                          num_cpus=data.featurize_cpus, batch_size=data.batch_rows, batch_format="pyarrow")


class FeaturizeBatch:
    """Ray Data callable class: one :class:`Featurizer` per actor (it holds the users' histories), built here or
    memory-mapped from a saved one (``saved``: the histories are then shared by the actors of a node).

    Args:
        vocab_path: the vocabulary JSON file.
        world: the world directory (not with ``saved``).
        features: lengths and windows of the features (not with ``saved``).
        history_days: days of behaviours and query history to load (None: all days).
        context: the items' price edges and popularity counts (None: the world's, computed here).
        saved: a directory :meth:`Featurizer.save` wrote (with the same vocabulary), mapped read-only.
    """

    def __init__(self, vocab_path: str, world: str | None = None, features: FeatureConfig | None = None,
                 history_days: list[int] | None = None, context: ItemContext | None = None,
                 saved: str | None = None) -> None:
        keep_temporaries_on_the_heap()  # a mapped featurizer ran at 0.55x a built one without it (arrays.py)
        vocab = Vocabulary.load(vocab_path)
        if saved is not None:
            self.featurizer = Featurizer.load(saved, vocab)
        elif world is None or features is None:
            raise ValueError("FeaturizeBatch needs a world and features, or a saved featurizer")
        else:
            self.featurizer = Featurizer(world, vocab, features, history_days, context=context)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """Features of a batch of :func:`explode_positives` rows (dict of int64 arrays)."""
        return self.featurizer(batch)


@ray.remote(max_calls=1)  # the worker process exits afterwards: its peak (every history sorted) is not kept
def _save_featurizer(world: str, vocab_path: str, features: FeatureConfig, history_days: list[int] | None,
                     context: ItemContext | None, out: str) -> None:
    Featurizer(world, Vocabulary.load(vocab_path), features, history_days, context=context).save(out)


def examples_key(world: str | Path, days: Iterable[int], vocab_path: str | Path, features: FeatureConfig,
                 context: ItemContext | None, rows: int | None) -> str:
    """A digest of everything featurized training examples depend on: the world's files (path, size, mtime),
    the days, the vocabulary file's bytes, the feature config, the item context and a row limit. Two datasets of
    :func:`training_dataset` with the same key hold the same examples (:func:`materialize_in_storage` reuses one).

    Args:
        world: a world directory or URI; days, vocab_path, features, context: as :func:`training_dataset`.
        rows: the dataset's row limit (``ds.limit``), or None.
    """
    return _inputs_key(world, vocab_path, features, context, days=sorted(set(days)), rows=rows)


def _inputs_key(world: str | Path, vocab_path: str | Path, features: FeatureConfig, context: ItemContext | None,
                **more: object) -> str:
    """16 hex digits of sha256 over the world's files (path, size, mtime), the vocabulary file's bytes, the
    feature config, the item context and ``more``."""
    root = _Location.of(world)
    files = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True))
    stats = sorted((f.path, f.size, f.mtime_ns) for f in files if f.type == pafs.FileType.File)
    digest = hashlib.sha256()
    for part in (stats, Path(vocab_path).read_bytes(), features.model_dump_json(), sorted(more.items())):
        digest.update(pickle.dumps(part))
    digest.update(pickle.dumps(context))  # dataclasses of numpy arrays: the same bytes for the same values
    return digest.hexdigest()[:16]


def _once(directory: Path, key: str, write: Callable[[Path], None], what: str) -> Path:
    """``directory/key``: reused when it exists, else filled by ``write(tmp)`` in a temporary directory that is
    renamed into place (``atomic_dir``: complete or absent); then the other keys' directories (earlier inputs')
    are removed, but not another writer's work in progress (a hidden ``.`` name)."""
    final = directory / key
    if final.is_dir():
        log.info("reusing the %s in %s", what, final)
        return final
    with atomic_dir(final) as tmp:
        write(tmp)
    for old in directory.iterdir():
        if old != final and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return final


def materialize_in_storage(ds: ray.data.Dataset, directory: str | Path, key: str,
                           cpus: float = 0.25) -> ray.data.Dataset:
    """Run ``ds`` once into Parquet files under ``directory/key`` and return a dataset that reads them back.

    This is ``ds.materialize()`` for a cluster of several nodes. Ray can rebuild a block lost with its node only
    when a task made it. Actors make the featurized examples, and Ray Data frees an actor's constructor
    arguments once the dataset has run, so a lost block of a materialized dataset cannot be rebuilt
    (ray-project/ray#31794, #53727): the next epoch fails with ``ReferenceCountingAssertionError``. Files on
    the run's shared storage survive the loss of any node, and reading them is a task Ray can retry.

    The files are written to a temporary directory beside the final one and renamed into place
    (``artifacts.atomic_dir``), so the directory is complete or absent: a run that fails while writing leaves
    nothing to reuse. A directory that already holds ``key`` is reused (a resumed run does not featurize again).
    Other keys' directories under ``directory`` are removed after a write (the examples of earlier inputs).

    Args:
        ds: the dataset to run (e.g. :func:`training_dataset`).
        directory: a directory on storage every node reads (the run's directory on a cluster).
        key: :func:`examples_key` of the inputs ``ds`` was made from.
        cpus: CPUs per write and read task (fractional on a laptop).

    Returns:
        a lazy dataset that reads ``directory/key``.
    """
    final = _once(Path(directory), key, lambda tmp: ds.write_parquet(str(tmp), ray_remote_args={"num_cpus": cpus}),
                  "featurized examples")
    return ray.data.read_parquet(str(final), num_cpus=cpus)


def search_event_files(world: str | Path, days: Iterable[int]) -> list[str]:
    """The ``search_events`` day files of ``days``, after checking their Parquet footers (no data is read).

    Args:
        world: a world directory or URI.
        days: day numbers.

    Returns:
        the files, in day order, as absolute paths or URIs (what ``ray.data.read_parquet`` takes).

    Raises:
        ValueError: as :func:`training_dataset`.
    """
    days = sorted(set(days))
    if not days:
        raise ValueError(f"world {world}: no days given to read search events from")
    root = _Location.of(world)
    files, rows = [], 0
    for day in days:
        file = root.join(SEARCH_EVENTS.name, day_file_name(day))
        with file.open_parquet(f"day {day}") as pf:
            _check_columns(file.uri, pf.schema_arrow)
            rows += pf.metadata.num_rows
        files.append(file.uri)
    if not rows:
        raise ValueError(f"world {world}: search_events has no events on days {days}")
    return files


def check_item_ids(world: str | Path, days: Iterable[int]) -> None:
    """Fail when a clicked or bought item id of a search event of ``days`` is not in the ``items`` table.

    Reads only the id columns: the items' ``item_id`` and, one day file at a time, the positives.

    Args:
        world: a world directory or URI.
        days: day numbers of ``search_events``.

    Raises:
        ValueError: naming the table, the day file, the column and an unknown id (or a missing file).
    """
    root = _Location.of(world)
    items = root.join(ITEMS.path_name())
    with items.open_parquet("the catalogue") as pf:
        known = pf.read(columns=["item_id"])["item_id"].combine_chunks()
    for day in sorted(set(days)):
        file = root.join(SEARCH_EVENTS.name, day_file_name(day))
        with file.open_parquet(f"day {day}") as pf:
            columns = pf.read(columns=POSITIVE_COLUMNS)
        per_column = [pc.list_flatten(columns[c].combine_chunks()) for c in POSITIVE_COLUMNS]
        ids = pa.concat_arrays(per_column)
        unknown = pc.invert(pc.is_in(ids, value_set=known)).to_numpy(zero_copy_only=False)
        if unknown.any():
            first = int(np.argmax(unknown))
            column = POSITIVE_COLUMNS[0] if first < len(per_column[0]) else POSITIVE_COLUMNS[1]
            value = ids[first].as_py()
            raise ValueError(f"table {SEARCH_EVENTS.name}, day file {file.uri}: {int(unknown.sum())} item ids not "
                             f"in the items table {items.uri}, e.g. {value} in column {column!r}")


def _check_columns(uri: str, got: pa.Schema) -> None:
    """A ``ValueError`` naming the file and the column when a needed column is missing or mistyped."""
    for name in EXPLODE_COLUMNS:
        want = SEARCH_EVENTS.schema.field(name).type
        if name not in got.names:
            raise ValueError(f"{uri}: missing column {name!r} (expected type {want}) of table {SEARCH_EVENTS.name}")
        if not got.field(name).type.equals(want):
            raise ValueError(f"{uri}: column {name!r} has type {got.field(name).type}, expected {want} "
                             f"(table {SEARCH_EVENTS.name})")


@dataclass(frozen=True)
class _Location:
    """A path on a pyarrow filesystem, and how the user (and Ray) spells it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @classmethod
    def of(cls, world: str | Path) -> _Location:
        text = str(world)
        uri = text.rstrip("/") if "://" in text else str(Path(text).absolute())
        fs, path = pafs.FileSystem.from_uri(uri)
        return cls(fs, path.rstrip("/"), uri)

    def join(self, *parts: str) -> _Location:
        tail = "/".join(parts)
        return _Location(self.fs, f"{self.path}/{tail}", f"{self.uri}/{tail}")

    def open_parquet(self, what: str) -> pq.ParquetFile:
        """The Parquet file here; a ``ValueError`` naming ``what`` and the path when missing or unreadable."""
        if self.fs.get_file_info(self.path).type != pafs.FileType.File:
            raise ValueError(f"no file for {what}: {self.uri} does not exist")
        try:
            return pq.ParquetFile(self.path, filesystem=self.fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{self.uri} ({what}): not a readable Parquet file: {e}") from None
