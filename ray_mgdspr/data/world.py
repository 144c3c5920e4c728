"""Reading and atomically writing a world directory (see :mod:`ray_mgdspr.data.schema` for the layout).

Writers build the whole world in a hidden temporary sibling directory and rename it into place only
when every table and the manifest are written, so a crash never leaves a half-written world behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from ray_mgdspr.artifacts import replace_dir, temp_prefix
from ray_mgdspr.data.schema import FORMAT_VERSION, MANIFEST, TABLES, TableSpec, day_file_name, parse_day_file_name

log = logging.getLogger(__name__)

SYNTHETIC_LABEL = "SYNTHETIC (simulated Taobao-like marketplace, not real user data)"


class WorldManifest(BaseModel):
    """What a world directory holds and where it came from."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    synthetic: bool
    source: str = Field(description="simulator, or the real data set a loader read")
    lang: str = "en"
    seed: int | None = None
    base_date: dt.date = Field(description="calendar date of day 1")
    history_days: list[int] = Field(default_factory=list, description="warm-up days (<= 0)")
    train_days: list[int] = Field(default_factory=list)
    test_days: list[int] = Field(default_factory=list)
    tables: dict[str, int] = Field(default_factory=dict, description="table name -> row count")
    config: dict[str, Any] = Field(default_factory=dict, description="the config that produced it")
    stats: dict[str, float] = Field(default_factory=dict, description="summary statistics of the content")
    licence: str | None = None
    notes: str | None = None
    created_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def label(self) -> str:
        return SYNTHETIC_LABEL if self.synthetic else f"real data: {self.source}"

    @property
    def all_days(self) -> list[int]:
        return sorted({*self.history_days, *self.train_days, *self.test_days})

    def day_start(self, day: int) -> dt.datetime:
        """UTC midnight that starts ``day`` (day 1 starts at ``base_date``)."""
        midnight = dt.datetime.combine(self.base_date, dt.time(), tzinfo=dt.UTC)
        return midnight + dt.timedelta(days=day - 1)


def read_manifest(world: str | Path) -> WorldManifest:
    path = Path(world) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {world} a world directory written by mgdspr?")
    return WorldManifest.model_validate_json(path.read_text())


def table_files(world: str | Path, spec: TableSpec, days: Iterable[int] | None = None) -> list[Path]:
    """Parquet files of one table, in day order for partitioned tables; [] when the table is absent."""
    root = Path(world) / spec.path_name()
    if not spec.partitioned_by_day:
        return [root] if root.is_file() else []
    if not root.is_dir():
        return []
    files = sorted(root.glob("*.parquet"), key=lambda p: parse_day_file_name(p.name))
    if days is not None:
        wanted = set(days)
        files = [p for p in files if parse_day_file_name(p.name) in wanted]
    return files


def read_table(world: str | Path, name: str, days: Iterable[int] | None = None, **kwargs: Any) -> pa.Table:
    """Read a whole table into memory (small tables and tests; pipelines stream with Ray Data)."""
    spec = TABLES[name]
    files = table_files(world, spec, days)
    if not files:
        return spec.schema.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=spec.schema, **kwargs) for f in files)


def conform(spec: TableSpec, table: pa.Table | dict[str, Any]) -> pa.Table:
    """Cast to the spec's schema exactly (column order, types, nullability, docs); errors name the table."""
    if isinstance(table, dict):
        table = pa.table(table)
    missing = [n for n in spec.schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in spec.schema.names]
    if missing or extra:
        raise ValueError(f"table {spec.name}: missing columns {missing}, unexpected columns {extra}")
    try:
        return table.select(spec.schema.names).cast(spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"table {spec.name}: does not fit its schema: {e}") from e


class WorldWriter:
    """Write a world into a temporary directory; ``commit`` renames it into place.

    Example::

        with WorldWriter(out, overwrite=True) as w:
            w.write(ITEMS, items_table)
            with w.day_writer(BEHAVIOURS, day=3) as dw:
                dw.write(chunk)           # row groups stream to disk
            w.commit(manifest)
    """

    def __init__(self, out: str | Path, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.out.name), dir=self.out.parent))
        self.rows: dict[str, int] = {}
        self.committed = False

    def __enter__(self) -> WorldWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, spec: TableSpec, table: pa.Table | dict[str, Any], day: int | None = None) -> Path:
        with self.day_writer(spec, day) as dw:
            dw.write(table)
        return dw.path

    def day_writer(self, spec: TableSpec, day: int | None = None) -> _TableWriter:
        if spec.partitioned_by_day != (day is not None):
            raise ValueError(f"table {spec.name}: partitioned_by_day={spec.partitioned_by_day} but day={day}")
        path = self.tmp / (f"{spec.name}/{day_file_name(day)}" if day is not None else spec.path_name())
        return _TableWriter(self, spec, path)

    def commit(self, manifest: WorldManifest) -> Path:
        manifest.tables = dict(sorted(self.rows.items()))
        (self.tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        replace_dir(self.tmp, self.out)
        self.committed = True
        log.info("wrote %s (%s)", self.out, manifest.label)
        return self.out


class _TableWriter:
    """Streams row groups of one table file; counts rows into the world's manifest."""

    def __init__(self, world: WorldWriter, spec: TableSpec, path: Path) -> None:
        self.world, self.spec, self.path = world, spec, path
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _TableWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.path, self.spec.schema, compression="zstd")
        return self

    def write(self, table: pa.Table | dict[str, Any]) -> None:
        assert self._writer is not None, "use the writer as a context manager"
        table = conform(self.spec, table)
        self._writer.write_table(table)
        self.world.rows[self.spec.name] = self.world.rows.get(self.spec.name, 0) + table.num_rows

    def __exit__(self, *exc: object) -> None:
        assert self._writer is not None
        self._writer.close()
        self.world.rows.setdefault(self.spec.name, 0)
