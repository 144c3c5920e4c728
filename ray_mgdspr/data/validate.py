"""Check a world directory against the schemas and its own manifest, without modifying anything.

Checks, per table file: the columns and types of :mod:`ray_mgdspr.data.schema`, no nulls where the
schema forbids them, unique keys, allowed values of enum columns, reference integrity (every item id
in events exists in the catalogue, ...), and for day files that the ``day`` column and the timestamps
fall on the file's day and the day is one the manifest declares. Each problem names the file, the
column, the row and the value. Files are read in record batches, so memory stays bounded.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from ray_mgdspr.data.schema import MANIFEST, TABLES, TableSpec, parse_day_file_name
from ray_mgdspr.data.world import WorldManifest, read_manifest, table_files

MAX_PROBLEMS_PER_CHECK = 5
BATCH_ROWS = 262_144


@dataclass(frozen=True)
class Problem:
    file: str
    column: str | None
    row: int | None
    value: object
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.column is not None:
            where += f": column {self.column!r}"
        if self.row is not None:
            where += f", row {self.row}"
        value = "" if self.value is None and self.row is None else f" (value {self.value!r})"
        return f"{where}: {self.message}{value}"


@dataclass
class ValidationReport:
    world: Path
    manifest: WorldManifest | None = None
    problems: list[Problem] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, *args: object) -> None:
        self.problems.append(Problem(*args))  # type: ignore[arg-type]


def validate_world(world: str | Path) -> ValidationReport:
    """Validate every table of ``world``; the report lists each problem found (empty when valid)."""
    world = Path(world)
    report = ValidationReport(world)
    try:
        report.manifest = manifest = read_manifest(world)
    except (FileNotFoundError, ValidationError, ValueError) as e:
        report.add(str(world / MANIFEST), None, None, None, f"unreadable manifest: {e}")
        return report
    present = {name: table_files(world, spec) for name, spec in TABLES.items()}
    for name, spec in TABLES.items():
        if not present[name] and spec.required and manifest.synthetic:
            report.add(str(world / spec.path_name()), None, None, None, "required table is missing")
    keys: dict[tuple[str, str], pa.Array] = {}
    for name, files in present.items():
        spec = TABLES[name]
        rows = sum(_check_file(report, spec, f, manifest) for f in files)
        report.rows[name] = rows
        declared = manifest.tables.get(name)
        if files and declared is not None and declared != rows:
            report.add(str(world / MANIFEST), None, None, declared,
                       f"declares {declared} rows for {name}, found {rows}")
    if report.problems:  # references are only meaningful on tables that fit their schemas
        return report
    for name, files in present.items():
        for ref in TABLES[name].references:
            if (ref.table, ref.target_column) not in keys and present[ref.table]:
                keys[(ref.table, ref.target_column)] = _column_values(present[ref.table], ref.target_column)
            for f in files:
                _check_reference(report, f, ref.column, ref.table, keys.get((ref.table, ref.target_column)))
    return report


def _check_file(report: ValidationReport, spec: TableSpec, path: Path, manifest: WorldManifest) -> int:
    """Schema, nulls, keys, enums and days of one file; returns its row count."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        report.add(str(path), None, None, None, f"not a readable Parquet file: {e}")
        return 0
    got = pf.schema_arrow
    bad_schema = False
    for f in spec.schema:
        if f.name not in got.names:
            report.add(str(path), f.name, None, None, f"missing column (expected type {f.type})")
            bad_schema = True
        elif not got.field(f.name).type.equals(f.type):
            report.add(str(path), f.name, None, None, f"type {got.field(f.name).type}, expected {f.type}")
            bad_schema = True
    for name in got.names:
        if name not in spec.schema.names:
            report.add(str(path), name, None, None, f"unexpected column; table {spec.name} has {spec.schema.names}")
            bad_schema = True
    if bad_schema:
        return pf.metadata.num_rows
    day = None
    if spec.partitioned_by_day:
        try:
            day = parse_day_file_name(path.name)
        except ValueError as e:
            report.add(str(path), None, None, None, str(e))
        if day is not None and day not in manifest.all_days:
            report.add(str(path), "day", None, day, f"day {day} is not declared in the manifest {manifest.all_days}")
    seen_keys: list[np.ndarray] = []
    offset = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=spec.schema.names):
        for f in spec.schema:
            col = batch.column(f.name)
            if not f.nullable and col.null_count:
                _first(report, path, f.name, offset, pc.is_null(col), col, "null in a non-nullable column")
        for column, allowed in spec.enums.items():
            col = batch.column(column)
            bad = pc.invert(pc.is_in(col, value_set=pa.array(allowed)))
            _first(report, path, column, offset, bad, col, f"not one of {list(allowed)}")
        if day is not None:
            _check_day(report, path, batch, offset, day, manifest)
        if spec.key is not None:
            seen_keys.append(batch.column(spec.key).to_numpy(zero_copy_only=False))
        offset += batch.num_rows
    if seen_keys:
        _check_unique(report, path, spec.key, np.concatenate(seen_keys))
    return offset


def _check_day(report: ValidationReport, path: Path, batch: pa.RecordBatch, offset: int, day: int,
               manifest: WorldManifest) -> None:
    _first(report, path, "day", offset, pc.not_equal(batch.column("day"), day), batch.column("day"),
           f"day differs from the file's day {day}")
    lo, hi = manifest.day_start(day), manifest.day_start(day) + dt.timedelta(days=1)
    ts = batch.column("ts")
    outside = pc.or_(pc.less(ts, pa.scalar(lo, ts.type)), pc.greater_equal(ts, pa.scalar(hi, ts.type)))
    _first(report, path, "ts", offset, outside, ts, f"timestamp outside day {day} [{lo:%Y-%m-%d %H:%M}, {hi:%H:%M})")


def _first(report: ValidationReport, path: Path, column: str, offset: int, bad: pa.Array, values: pa.Array,
           message: str) -> None:
    """Report the first few rows where ``bad`` is true."""
    bad = bad.fill_null(False)
    if not pc.any(bad).as_py():
        return
    rows = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
    for r in rows[:MAX_PROBLEMS_PER_CHECK]:
        report.add(str(path), column, offset + int(r), values[int(r)].as_py(), message)
    if len(rows) > MAX_PROBLEMS_PER_CHECK:
        report.add(str(path), column, None, None, f"... and {len(rows) - MAX_PROBLEMS_PER_CHECK} more such rows")


def _check_unique(report: ValidationReport, path: Path, column: str, values: np.ndarray) -> None:
    order = np.argsort(values, kind="stable")
    dup = np.flatnonzero(values[order][1:] == values[order][:-1])
    for i in dup[:MAX_PROBLEMS_PER_CHECK]:
        row = int(order[i + 1])
        report.add(str(path), column, row, values[row].item(), "duplicate key")


def _column_values(files: list[Path], column: str) -> pa.Array:
    return pa.concat_arrays([pq.read_table(f, columns=[column]).column(column).combine_chunks() for f in files])


def _check_reference(report: ValidationReport, path: Path, column: str, table: str, target: pa.Array | None) -> None:
    """Every non-null id of ``column`` (flattened when it is a list) must exist in ``target``."""
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    rows = None
    if pa.types.is_list(col.type):
        rows = pc.list_parent_indices(col)
        col = pc.list_flatten(col)
    col_nonneg = pc.and_(pc.is_valid(col), pc.greater_equal(col, 0))  # -1 stands for "none"
    if target is None:
        if pc.any(col_nonneg).as_py():
            report.add(str(path), column, None, None, f"refers to table {table!r}, which the world lacks")
        return
    missing = pc.and_(col_nonneg, pc.invert(pc.is_in(col, value_set=target)))
    if not pc.any(missing).as_py():
        return
    idx = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    for i in idx[:MAX_PROBLEMS_PER_CHECK]:
        row = int(rows[int(i)].as_py()) if rows is not None else int(i)
        report.add(str(path), column, row, col[int(i)].as_py(), f"id not found in {table}")
    if len(idx) > MAX_PROBLEMS_PER_CHECK:
        report.add(str(path), column, None, None, f"... and {len(idx) - MAX_PROBLEMS_PER_CHECK} more unknown ids")
