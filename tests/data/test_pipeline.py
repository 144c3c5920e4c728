"""Ray Data ingest: the dataset equals the Ray-free featurizer, and bad worlds fail before any Ray job runs."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before importing ray (see shared/notes/RAY.md)

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from ray_mgdspr.config import DataConfig, FeatureConfig, VocabConfig
from ray_mgdspr.data import pipeline
from ray_mgdspr.data.features import Featurizer, ItemContext, explode_positives
from ray_mgdspr.data.pipeline import FeaturizeBatch, check_item_ids, training_dataset
from ray_mgdspr.data.schema import day_file_name
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import read_manifest

SMALL = FeatureConfig(query_chars_kept=8, query_bigrams_kept=6, query_words_kept=4, title_words_kept=5, his_queries=3,
                      realtime_len=6, short_len=5, long_len=4, short_days=2.0, long_days=5.0)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray runtime for this module (reused when another module already started one)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False
    yield
    context.enable_progress_bars = progress_bars
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def vocab_path(world_en: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vocab_from_world(world_en, VocabConfig()).save(tmp_path_factory.mktemp("vocab") / "vocab.json")


@pytest.fixture(scope="module")
def train_days(world_en: Path) -> list[int]:
    return read_manifest(world_en).train_days


@pytest.fixture(scope="module")
def reference(world_en: Path, vocab_path: Path, train_days: list[int]) -> dict[str, np.ndarray]:
    featurizer = Featurizer(world_en, Vocabulary.load(vocab_path), SMALL)
    return by_example(featurizer(featurizer.examples(train_days)))


def by_example(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The columns with rows sorted by (event_id, item_id), a unique key of the examples."""
    order = np.lexsort((columns["item_id"], columns["event_id"]))
    return {k: np.asarray(v)[order] for k, v in columns.items()}


def no_ray_job(*args: object, **kwargs: object) -> None:
    raise AssertionError("a Ray job started before the world was checked")


def copy_world(world: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world, tmp_path / "world"))


def day_file(world: Path, day: int, table: str = "search_events") -> Path:
    return world / table / day_file_name(day)


# -------------------------------------------------------------------------------------- the dataset


def columns_of(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def assert_equal_examples(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    got = by_example(got)
    for key, expected in want.items():
        assert got[key].dtype == np.int64, key
        np.testing.assert_array_equal(got[key], expected, err_msg=key)


def test_dataset_equals_the_ray_free_featurizer(ray_cluster: None, world_en: Path, vocab_path: Path,
                                                train_days: list[int], reference: dict[str, np.ndarray]) -> None:
    data = DataConfig(featurize_actors=2, featurize_cpus=0.5, batch_rows=97, repartition=3)
    ds = training_dataset(world_en, train_days, vocab_path, SMALL, data)
    assert_equal_examples(columns_of(list(ds.iter_batches(batch_size=None, batch_format="numpy"))), reference)


def test_a_context_counted_once_gives_the_same_examples(ray_cluster: None, world_en: Path, vocab_path: Path,
                                                         train_days: list[int],
                                                         reference: dict[str, np.ndarray]) -> None:
    """The trainer counts the popularity and cuts the price edges once and hands them to every actor."""
    data = DataConfig(featurize_actors=2, featurize_cpus=0.5, batch_rows=97)
    ds = training_dataset(world_en, train_days, vocab_path, SMALL, data, context=ItemContext.of_world(world_en))
    assert_equal_examples(columns_of(list(ds.iter_batches(batch_size=None, batch_format="numpy"))), reference)


def test_torch_batches_have_the_contract_shapes(ray_cluster: None, world_en: Path, vocab_path: Path,
                                                train_days: list[int], reference: dict[str, np.ndarray]) -> None:
    import torch

    ds = training_dataset(world_en, train_days, vocab_path, SMALL, DataConfig(batch_rows=128))
    batches = []
    for batch in ds.iter_torch_batches(batch_size=64):
        n = len(batch["item_id"])
        assert n <= 64
        for key, tensor in batch.items():
            assert tensor.dtype == torch.int64, key
            assert tuple(tensor.shape) == (n, *reference[key].shape[1:]), key
        batches.append({k: t.numpy() for k, t in batch.items()})
    assert_equal_examples(columns_of(batches), reference)
    assert reference["item_title"].shape[1:] == (SMALL.title_words_kept,)
    assert reference["lt_item"].shape[1:] == (3, SMALL.long_len)


def test_actors_share_one_saved_featurizer(ray_cluster: None, world_en: Path, vocab_path: Path,
                                           train_days: list[int], reference: dict[str, np.ndarray],
                                           tmp_path: Path) -> None:
    """``data.share_history``: one task saves the featurizer under ``share_dir/<key>``, the actors map it; the
    examples are the same, and a second dataset over the same inputs reuses the saved arrays."""
    data = DataConfig(featurize_actors=2, featurize_cpus=0.5, batch_rows=97)
    ds = training_dataset(world_en, train_days, vocab_path, SMALL, data, share_dir=tmp_path / "featurizer")
    [saved] = (tmp_path / "featurizer").iterdir()
    assert (saved / "featurizer.json").is_file() and len(list(saved.glob("*.npy"))) > 10
    written = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    assert_equal_examples(columns_of(list(ds.iter_batches(batch_size=None, batch_format="numpy"))), reference)
    again = training_dataset(world_en, train_days, vocab_path, SMALL, data, share_dir=tmp_path / "featurizer")
    assert [p.name for p in (tmp_path / "featurizer").iterdir()] == [saved.name]
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == written
    assert_equal_examples(columns_of(list(again.iter_batches(batch_size=None, batch_format="numpy"))), reference)
    unshared = DataConfig(featurize_actors=2, featurize_cpus=0.5, batch_rows=97, share_history=False)
    training_dataset(world_en, train_days, vocab_path, SMALL, unshared, share_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def failing_dataset() -> ray.data.Dataset:
    def boom(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("this dataset ran")

    return ray.data.range(10).map_batches(boom, num_cpus=0.25)


def test_examples_materialized_in_storage_are_the_examples_and_reused(
        ray_cluster: None, world_en: Path, vocab_path: Path, train_days: list[int],
        reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    """``data.materialize_to: storage``: the examples go to Parquet once, read back equal (int64, same shapes);
    the same key is reused without running the dataset again; a new key replaces the old directory."""
    data = DataConfig(featurize_actors=2, featurize_cpus=0.5, batch_rows=97)
    key = pipeline.examples_key(world_en, train_days, vocab_path, SMALL, None, None)
    ds = pipeline.materialize_in_storage(training_dataset(world_en, train_days, vocab_path, SMALL, data),
                                         tmp_path / "examples", key)
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == [key]  # no temporary directory left
    assert list((tmp_path / "examples" / key).glob("*.parquet"))
    assert_equal_examples(columns_of(list(ds.iter_batches(batch_size=None, batch_format="numpy"))), reference)

    again = pipeline.materialize_in_storage(failing_dataset(), tmp_path / "examples", key)
    assert again.count() == len(reference["item_id"])

    other = pipeline.examples_key(world_en, train_days, vocab_path, SMALL, None, 100)
    pipeline.materialize_in_storage(training_dataset(world_en, train_days, vocab_path, SMALL, data).limit(100),
                                    tmp_path / "examples", other)
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == [other]


def test_a_failed_write_to_storage_leaves_nothing_to_reuse(ray_cluster: None, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="this dataset ran"):
        pipeline.materialize_in_storage(failing_dataset(), tmp_path / "examples", "k")
    assert list((tmp_path / "examples").iterdir()) == []


def test_the_examples_key_follows_every_input(world_en: Path, vocab_path: Path, train_days: list[int],
                                              tmp_path: Path) -> None:
    key = pipeline.examples_key
    base = key(world_en, train_days, vocab_path, SMALL, None, None)
    assert base == key(world_en, list(reversed(train_days)), vocab_path, SMALL, None, None)
    context = ItemContext.of_world(world_en)
    assert key(world_en, train_days, vocab_path, SMALL, context, None) == key(
        world_en, train_days, vocab_path, SMALL, ItemContext.of_world(world_en), None)
    changed = [key(world_en, train_days[:-1], vocab_path, SMALL, None, None),
               key(world_en, train_days, vocab_path, SMALL.model_copy(update={"his_queries": 2}), None, None),
               key(world_en, train_days, vocab_path, SMALL, context, None),
               key(world_en, train_days, vocab_path, SMALL, None, 64)]
    vocab2 = tmp_path / "vocab.json"
    vocab2.write_bytes(vocab_path.read_bytes() + b" ")
    changed.append(key(world_en, train_days, vocab2, SMALL, None, None))
    world = copy_world(world_en, tmp_path)
    assert key(world, train_days, vocab_path, SMALL, None, None) != base  # another place is another world
    copied = key(world, train_days, vocab_path, SMALL, None, None)
    items = next(world.glob("items*"))
    item_file = items if items.is_file() else next(items.rglob("*.parquet"))
    os.utime(item_file, ns=(item_file.stat().st_atime_ns, item_file.stat().st_mtime_ns + 10**9))
    changed.append(key(world, train_days, vocab_path, SMALL, None, None))
    assert changed[-1] != copied
    assert len({base, *changed}) == len(changed) + 1


# ------------------------------------------------------------------------------- checks before running


def rewrite(path: Path, change: object) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)  # type: ignore[operator]


@pytest.mark.parametrize(("change", "column", "message"), [
    (lambda t: t.drop_columns(["clicked_item_ids"]), "clicked_item_ids", "missing column"),
    (lambda t: t.set_column(t.schema.get_field_index("ts"), "ts", t["ts"].cast(pa.int64())), "ts", "has type int64"),
], ids=["missing-column", "wrong-type"])
def test_a_bad_day_file_fails_naming_file_and_column(world_en: Path, vocab_path: Path, train_days: list[int],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     change: object, column: str, message: str) -> None:
    world = copy_world(world_en, tmp_path)
    bad = day_file(world, train_days[1])
    rewrite(bad, change)
    monkeypatch.setattr(pipeline.ray.data, "read_parquet", no_ray_job)
    with pytest.raises(ValueError, match=message) as e:
        training_dataset(world, train_days, vocab_path, SMALL, DataConfig())
    assert str(bad) in str(e.value) and repr(column) in str(e.value)


def test_a_missing_day_file_fails_naming_day_and_path(world_en: Path, vocab_path: Path, train_days: list[int],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = copy_world(world_en, tmp_path)
    gone = day_file(world, train_days[0])
    gone.unlink()
    monkeypatch.setattr(pipeline.ray.data, "read_parquet", no_ray_job)
    with pytest.raises(ValueError, match=f"day {train_days[0]}") as e:
        training_dataset(world, train_days, vocab_path, SMALL, DataConfig())
    assert str(gone) in str(e.value)


def test_days_without_search_events_fail(world_en: Path, vocab_path: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.ray.data, "read_parquet", no_ray_job)
    with pytest.raises(ValueError, match="no days"):
        training_dataset(world_en, [], vocab_path, SMALL, DataConfig())
    world = copy_world(world_en, tmp_path)
    day = read_manifest(world).train_days[0]
    rewrite(day_file(world, day), lambda t: t.slice(0, 0))
    with pytest.raises(ValueError, match=f"no events on days \\[{day}\\]"):
        training_dataset(world, [day], vocab_path, SMALL, DataConfig())


def test_uri_worlds_are_checked_like_paths(world_en: Path, train_days: list[int]) -> None:
    files = pipeline.search_event_files(f"file://{world_en}/", train_days)
    assert files == [f"file://{day_file(world_en, d)}" for d in train_days]
    with pytest.raises(ValueError, match="day 99"):
        pipeline.search_event_files(f"file://{world_en}", [99])


# ------------------------------------------------------------------------------------- item ids


def test_check_item_ids_passes_on_the_simulated_world(world_en: Path) -> None:
    m = read_manifest(world_en)
    check_item_ids(world_en, [*m.train_days, *m.test_days])


def test_check_item_ids_names_the_day_file_and_an_unknown_id(world_en: Path, train_days: list[int],
                                                             tmp_path: Path) -> None:
    world = copy_world(world_en, tmp_path)
    bad = day_file(world, train_days[2])
    table = pq.read_table(bad)
    rows = table.to_pylist()
    row = next(r for r in rows if r["clicked_item_ids"])
    row["clicked_item_ids"][0] = 10**9
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad)
    check_item_ids(world, train_days[:2])
    with pytest.raises(ValueError, match="search_events") as e:
        check_item_ids(world, train_days)
    assert str(bad) in str(e.value) and str(10**9) in str(e.value) and "'clicked_item_ids'" in str(e.value)


# ----------------------------------------------------------------------------------- explode (no Ray)


def test_featurize_batch_loads_the_history_days_it_is_given(world_en: Path, vocab_path: Path,
                                                            train_days: list[int]) -> None:
    vocab = Vocabulary.load(vocab_path)
    last_day = train_days[-1:]
    rows = Featurizer(world_en, vocab, SMALL).examples(last_day).slice(0, 300)
    got = FeaturizeBatch(str(vocab_path), str(world_en), SMALL, last_day)(rows)
    want = Featurizer(world_en, vocab, SMALL, history_days=last_day)(rows)
    for key, expected in want.items():
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    assert (got["lt_item"] == -1).all()  # L^u ends short_days before the row: nothing on the same day
    assert (Featurizer(world_en, vocab, SMALL)(rows)["lt_item"] != -1).any()



def test_explode_positives_is_clicked_union_bought_deduplicated_in_order() -> None:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    events = pa.table({
        "event_id": pa.array([9, 2, 7, 4], pa.int64()),
        "user_id": pa.array([1, 1, 2, 3], pa.int64()),
        "ts": pa.array([t0 + dt.timedelta(seconds=s) for s in (5, 1, 3, 2)], pa.timestamp("ms", tz="UTC")),
        "day": pa.array([1, 1, 1, 1], pa.int16()),
        "query": ["red shoe", "hat", "bag", "cup"],
        "query_words": [["red", "shoe"], ["hat"], ["bag"], ["cup"]],
        "clicked_item_ids": pa.array([[30, 10, 30], [], [], [5]], pa.list_(pa.int64())),
        "bought_item_ids": pa.array([[10, 50], [], [70, 70], [5]], pa.list_(pa.int64())),
    })
    out = explode_positives(events)
    assert out.schema.names == ["event_id", "user_id", "ts", "query", "query_words", "item_id"]
    assert out.schema.field("ts").type == pa.int64()
    assert list(zip(out["event_id"].to_pylist(), out["item_id"].to_pylist(), strict=True)) == [
        (9, 30), (9, 10), (9, 50), (7, 70), (4, 5)]
    ms = int(t0.timestamp() * 1000)
    assert out["ts"].to_pylist() == [ms + 5000] * 3 + [ms + 3000, ms + 2000]
    assert out["query_words"].to_pylist()[0] == ["red", "shoe"]
    assert explode_positives(events.slice(1, 1)).num_rows == 0
