from pathlib import Path

import pyarrow as pa
import pytest

from ray_mgdspr.data import schema
from ray_mgdspr.data.world import WorldManifest, WorldWriter, conform, read_manifest, read_table

ATTRS = {"attr_value_id": pa.array([0, 1], pa.int32()), "slot": ["colour", "colour"], "term": ["red", "blue"]}


def manifest() -> WorldManifest:
    import datetime as dt

    return WorldManifest(synthetic=True, source="test", base_date=dt.date(2020, 12, 1))


def test_commit_writes_tables_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "w"
    with WorldWriter(out) as w:
        w.write(schema.ATTRIBUTES, ATTRS)
        w.commit(manifest())
    assert read_manifest(out).tables == {"attributes": 2}
    assert read_table(out, "attributes").schema == schema.ATTRIBUTES.schema
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary left behind


def test_crash_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "w"
    with pytest.raises(RuntimeError), WorldWriter(out) as w:
        w.write(schema.ATTRIBUTES, ATTRS)
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []


def test_existing_world_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "w"
    with WorldWriter(out) as w:
        w.write(schema.ATTRIBUTES, ATTRS)
        w.commit(manifest())
    with pytest.raises(FileExistsError, match="--overwrite"):
        WorldWriter(out)
    with pytest.raises(RuntimeError), WorldWriter(out, overwrite=True) as w:  # a failed rewrite keeps the old
        raise RuntimeError
    assert read_manifest(out).tables == {"attributes": 2}
    with WorldWriter(out, overwrite=True) as w:
        w.write(schema.ATTRIBUTES, {**ATTRS, "attr_value_id": pa.array([5, 6], pa.int32())})
        w.commit(manifest())
    assert read_table(out, "attributes")["attr_value_id"].to_pylist() == [5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_conform_names_table_and_columns() -> None:
    with pytest.raises(ValueError, match=r"table attributes: missing columns \['term'\]"):
        conform(schema.ATTRIBUTES, {k: v for k, v in ATTRS.items() if k != "term"})
    with pytest.raises(ValueError, match="table attributes: does not fit its schema"):
        conform(schema.ATTRIBUTES, {**ATTRS, "attr_value_id": ["a", "b"]})


def test_day_partitioned_tables_need_a_day(tmp_path: Path) -> None:
    with WorldWriter(tmp_path / "w") as w, pytest.raises(ValueError, match="partitioned_by_day"):
        w.day_writer(schema.BEHAVIOURS)


@pytest.mark.parametrize("day", [-30, -1, 0, 1, 8, 12])
def test_day_file_names_round_trip_and_sort(day: int) -> None:
    assert schema.parse_day_file_name(schema.day_file_name(day)) == day


def test_bad_day_file_name() -> None:
    with pytest.raises(ValueError, match=r"'day-x\.parquet' is not a day file"):
        schema.parse_day_file_name("day-x.parquet")


def test_schema_docs_cover_every_column() -> None:
    text = schema.describe_tables()
    for spec in schema.TABLES.values():
        for f in spec.schema:
            assert spec.field_doc(f.name), f"{spec.name}.{f.name} has no doc"
            assert f"`{f.name}`" in text
