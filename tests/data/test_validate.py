"""Validation errors on deliberately broken copies of a simulated world (synthetic)."""

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_mgdspr.data.validate import validate_world


@pytest.fixture
def world(world_en: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "world"
    shutil.copytree(world_en, copy)
    return copy


def rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def set_value(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    field = table.schema.field(column).with_nullable(value is None or table.schema.field(column).nullable)
    return table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type))


def digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def problems(world: Path) -> list[str]:
    before = digest(world)
    report = validate_world(world)
    assert digest(world) == before, "validation must not modify anything"
    return [str(p) for p in report.problems]


def test_unknown_item_id_in_behaviours(world: Path) -> None:
    f = world / "behaviours" / "day-03.parquet"
    rewrite(f, lambda t: set_value(t, "item_id", 7, 99_999_999))
    assert problems(world) == [f"{f}: column 'item_id', row 7: id not found in items (value 99999999)"]


def test_unknown_item_id_inside_a_list_column(world: Path) -> None:
    f = world / "search_events" / "day-02.parquet"
    t = pq.read_table(f)
    row = next(i for i, c in enumerate(t["clicked_item_ids"].to_pylist()) if c)
    clicked = t["clicked_item_ids"].to_pylist()
    clicked[row] = [*clicked[row], 123_456_789]
    rewrite(f, lambda t: t.set_column(t.schema.get_field_index("clicked_item_ids"), t.schema.field("clicked_item_ids"),
                                      pa.array(clicked, pa.list_(pa.int64()))))
    assert f"{f}: column 'clicked_item_ids', row {row}: id not found in items (value 123456789)" in problems(world)


def test_timestamp_outside_the_files_day(world: Path) -> None:
    f = world / "behaviours" / "day-05.parquet"
    t = pq.read_table(f)
    late = pc.add(t["ts"][3], pa.scalar(3 * 86_400_000, pa.duration("ms"))).as_py()
    rewrite(f, lambda t: set_value(t, "ts", 3, late))
    out = problems(world)
    assert len(out) == 1 and out[0].startswith(f"{f}: column 'ts', row 3: timestamp outside day 5")


def test_wrong_type_and_missing_column(world: Path) -> None:
    f = world / "items.parquet"
    rewrite(f, lambda t: t.set_column(t.schema.get_field_index("price"), "price", pc.cast(t["price"], pa.string())))
    g = world / "query_history" / "day-01.parquet"
    rewrite(g, lambda t: t.drop_columns(["query_words"]))
    out = problems(world)
    assert f"{f}: column 'price': type string, expected float" in out
    assert f"{g}: column 'query_words': missing column (expected type list<item: string>)" in out


def test_null_duplicate_key_and_bad_enum(world: Path) -> None:
    f = world / "behaviours" / "day-01.parquet"
    rewrite(f, lambda t: set_value(set_value(t, "action", 2, "like"), "user_id", 4, None))
    items = world / "items.parquet"
    rewrite(items, lambda t: set_value(t, "item_id", 10, 3))
    out = problems(world)
    assert f"{f}: column 'user_id', row 4: null in a non-nullable column (value None)" in out
    assert f"{f}: column 'action', row 2: not one of ['click', 'cart', 'buy', 'collect'] (value 'like')" in out
    assert f"{items}: column 'item_id', row 10: duplicate key (value 3)" in out


def test_undeclared_day_and_missing_table(world: Path) -> None:
    shutil.copy(world / "behaviours" / "day-08.parquet", world / "behaviours" / "day-09.parquet")
    (world / "brands.parquet").unlink()
    out = problems(world)
    assert any("day-09.parquet: column 'day': day 9 is not declared in the manifest" in p for p in out)
    assert f"{world / 'brands.parquet'}: required table is missing" in out


def test_not_a_parquet_file_and_no_manifest(world: Path, tmp_path: Path) -> None:
    (world / "shops.parquet").write_text("not parquet")
    assert any("shops.parquet: not a readable Parquet file" in p for p in problems(world))
    assert problems(tmp_path) == [f"{tmp_path / 'manifest.json'}: unreadable manifest: {tmp_path / 'manifest.json'}: "
                                  f"no manifest; is {tmp_path} a world directory written by mgdspr?"]
