"""User behaviour store: each user's clicks, buys, collects and past queries, looked up per request.

The query encoder needs, for a (user, ts), R^u (latest clicks), S^u (recent clicks), L^u (a month of clicks,
buys, collects) and the latest queries (spec §2). A store answers exactly the rows those windows can use
(``Store.histories``) and takes new behaviours as they happen (``Store.append``), so the next request of that
user sees them. ``Featurizer.with_history`` turns the rows into features equal to the offline featurizer's.

Backends:

- ``SqliteStore`` (default, one machine): an SQLite file built from a world's logs (``build_sqlite_store``,
  written to a temporary file and renamed into place), WAL mode so several replicas read while one writes.
- ``RedisStore`` (several machines): sorted sets per user and action in a Redis server.

Rows keep their arrival order in a sequence number (SQLite rowid, a Redis counter), which orders equal
timestamps as the world's files do.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ray_mgdspr.artifacts import atomic_file
from ray_mgdspr.config import FeatureConfig
from ray_mgdspr.data.features import DAY_MS, LONG_ACTIONS
from ray_mgdspr.data.schema import epoch_ms
from ray_mgdspr.data.world import read_manifest, read_table

log = logging.getLogger(__name__)

Action = Literal["click", "buy", "collect", "cart"]
_BEHAVIOUR_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("action", pa.string()),
                               ("ts", pa.int64())])
_QUERY_SCHEMA = pa.schema([("user_id", pa.int64()), ("ts", pa.int64()), ("query_words", pa.list_(pa.string()))])
_CHUNK = 200_000


MAX_ID = 2**63 - 1  # ids are int64 in every table, the featurizer and both stores
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: later instants are not dates (numpy, SQLite, Redis)
MAX_WORDS, MAX_WORD_CHARS = 64, 64  # a past query's words

Id = Annotated[int, Field(ge=0, le=MAX_ID, description=f"a non-negative int64 (at most {MAX_ID})")]
EpochMs = Annotated[int, Field(gt=0, le=MAX_TS_MS, description="epoch milliseconds, at most year 9999")]
Word = Annotated[str, Field(min_length=1, max_length=MAX_WORD_CHARS)]


class Event(BaseModel):
    """Strict, closed: what comes from outside (``POST /v1/events``) is never coerced (no bool or "5" for an
    integer) and an unknown key is an error, as at the top level of every request body."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Behaviour(Event):
    """One user action on an item (``POST /v1/events``)."""

    user_id: Id
    item_id: Id
    action: Action
    ts: EpochMs


class PastQuery(Event):
    """One query a user searched, as words."""

    user_id: Id
    ts: EpochMs
    query_words: list[Word] = Field(max_length=MAX_WORDS)


class Store(Protocol):
    def histories(self, user_ids: Sequence[int], ts: Sequence[int]) -> tuple[pa.Table, pa.Table]: ...

    def append(self, behaviours: Iterable[Behaviour] = (), queries: Iterable[PastQuery] = ()) -> None: ...

    def close(self) -> None: ...


class Windows:
    """The limits of the rows one (user, ts) needs (spec §2 via ``FeatureConfig``)."""

    def __init__(self, config: FeatureConfig) -> None:
        self.recent = config.realtime_len + config.short_len  # R^u then S^u: the latest clicks of any age
        self.long_len, self.his_queries = config.long_len, config.his_queries
        self.short_ms, self.long_ms = round(config.short_days * DAY_MS), round(config.long_days * DAY_MS)


def _tables(behaviours: list[tuple[int, int, int, str, int]], queries: list[tuple[int, int, int, str]]
            ) -> tuple[pa.Table, pa.Table]:
    """Rows (seq, user, ...) -> the featurizer's history tables, deduplicated and in arrival order."""
    b = sorted(set(behaviours))
    q = sorted(set(queries))
    return (pa.table([[r[1] for r in b], [r[2] for r in b], [r[3] for r in b], [r[4] for r in b]],
                     schema=_BEHAVIOUR_SCHEMA),
            pa.table([[r[1] for r in q], [r[2] for r in q], [json.loads(r[3]) for r in q]], schema=_QUERY_SCHEMA))


# --------------------------------------------------------------------------------------------- SQLite

_TABLES = """
CREATE TABLE IF NOT EXISTS behaviours (user_id INTEGER NOT NULL, ts INTEGER NOT NULL, action TEXT NOT NULL,
                                       item_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS queries (user_id INTEGER NOT NULL, ts INTEGER NOT NULL, words TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# The indexes cover every column a lookup reads (an index entry also holds the rowid, the arrival order), so a
# user's rows come from one run of index pages and never from the tables' pages, where rows lie in arrival order,
# scattered over the file. On the large preset's 1.2 GB store, a request's lookups out of the OS page cache took
# p50 3.5 ms with format 1's indexes (not covering) and 1.3 ms with these; cached, 0.8 and 0.7 ms
# (benchmarks/results/store-large.md).
FORMAT = "2"
INDEXES = {"behaviours_covering": "behaviours (user_id, action, ts, item_id)",
           "queries_covering": "queries (user_id, ts, words)"}
FORMAT_1_INDEXES = {"behaviours_by_user": "behaviours (user_id, action, ts)",
                    "queries_by_user": "queries (user_id, ts)"}
"""Format 1's indexes (not covering): what a store of an earlier release has (tests and ``bench_store.py`` make
one from a store of this format)."""
# a user's latest rows of one action / of past queries in a window: (user, action, before, from, limit) and
# (user, before, limit)
BEHAVIOURS_SQL = ("SELECT rowid, user_id, item_id, action, ts FROM behaviours WHERE user_id = ? AND action = ? "
                  "AND ts < ? AND ts >= ? ORDER BY ts DESC, rowid DESC LIMIT ?")
QUERIES_SQL = "SELECT rowid, user_id, ts, words FROM queries WHERE user_id = ? AND ts < ? ORDER BY ts DESC, " \
              "rowid DESC LIMIT ?"


def _index_names(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


def create_indexes(db: sqlite3.Connection, indexes: dict[str, str]) -> None:
    """``indexes`` (name -> ``table (columns)``), each unless it exists, in the connection's transaction if any."""
    for name, on in indexes.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {on}")


class SqliteStore:
    """A behaviour store in one SQLite file (see the module docstring).

    Args:
        path: the store file (``build_sqlite_store`` makes one; a missing file is an error unless ``create``).
        config: the feature windows the encoder uses.
        create: make an empty store when ``path`` does not exist.
    """

    def __init__(self, path: str | Path, config: FeatureConfig, create: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file() and not create:
            raise FileNotFoundError(f"{self.path}: no behaviour store; build one with `mgdspr store build`")
        self.windows = Windows(config)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # an acknowledged append is on disk: each commit fsyncs the WAL (survives a killed process and a power
        # loss; WAL's default NORMAL would survive only the former)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_TABLES)
        if not _index_names(self._db) & set(FORMAT_1_INDEXES):
            create_indexes(self._db, INDEXES)  # a new store (or already this format: nothing to do)
        else:
            log.warning("%s: a behaviour store of format 1, whose indexes do not cover the lookups (about 3x "
                        "slower when the file is not in the OS page cache); `mgdspr store upgrade %s` adds the "
                        "covering ones in place, while it is served", self.path, self.path)

    def histories(self, user_ids: Sequence[int], ts: Sequence[int]) -> tuple[pa.Table, pa.Table]:
        """Every row the feature windows of each (user_ids[i], ts[i]) can use.

        Returns:
            ``behaviours`` (user_id, item_id, action, ts epoch ms) and ``query_history`` (user_id, ts,
            query_words), in arrival order, for ``Featurizer.with_history``.
        """
        w = self.windows
        behaviours, queries = [], []
        with self._lock:
            for user, t in sorted(set(zip(map(int, user_ids), map(int, ts), strict=True))):
                behaviours += self._db.execute(BEHAVIOURS_SQL, (user, "click", t, -(2**62), w.recent)).fetchall()
                for action in LONG_ACTIONS:
                    behaviours += self._db.execute(BEHAVIOURS_SQL, (user, action, t - w.short_ms, t - w.long_ms,
                                                                    w.long_len)).fetchall()
                queries += self._db.execute(QUERIES_SQL, (user, t, w.his_queries)).fetchall()
        return _tables(behaviours, queries)

    def append(self, behaviours: Iterable[Behaviour] = (), queries: Iterable[PastQuery] = ()) -> None:
        """Add behaviours and past queries (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO behaviours VALUES (?, ?, ?, ?)",
                                     [(b.user_id, b.ts, b.action, b.item_id) for b in behaviours])
                self._db.executemany("INSERT INTO queries VALUES (?, ?, ?)",
                                     [(q.user_id, q.ts, json.dumps(q.query_words)) for q in queries])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def close(self) -> None:
        self._db.close()


def build_sqlite_store(world: str | Path, out: str | Path, overwrite: bool = False,
                       days: Iterable[int] | None = None) -> dict[str, int]:
    """Build a SQLite behaviour store from every day of a world's ``behaviours`` and ``query_history``.

    Written to a temporary file beside ``out`` and renamed into place: a crash leaves no half store.

    Args:
        days: only these days of the world (e.g. those before the test day, so that replaying the test day
            through ``Store.append`` / ``POST /v1/events`` is what adds its behaviours); default every day.

    Returns:
        rows written per table.

    Raises:
        FileExistsError: ``out`` exists and not ``overwrite``.
        ValueError: ``world`` is not a world directory.
    """
    world, out = Path(world), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to rebuild it")
    try:
        manifest = read_manifest(world)
    except FileNotFoundError as e:
        raise ValueError(f"world {world}: not a world directory ({e})") from None
    chosen = sorted(manifest.all_days if days is None else set(days) & set(manifest.all_days))
    counts = {"behaviours": 0, "queries": 0}
    with atomic_file(out) as tmp:
        db = sqlite3.connect(tmp, isolation_level=None)
        db.executescript(_TABLES)  # indexes after the bulk load
        db.execute("BEGIN")
        for day in chosen:
            b = read_table(world, "behaviours", days=[day], columns=["user_id", "ts", "action", "item_id"])
            q = read_table(world, "query_history", days=[day], columns=["user_id", "ts", "query_words"])
            b_ts, q_ts = epoch_ms(b["ts"]), epoch_ms(q["ts"])
            for lo in range(0, b.num_rows, _CHUNK):
                part = b.slice(lo, _CHUNK)
                db.executemany("INSERT INTO behaviours VALUES (?, ?, ?, ?)",
                               zip(part["user_id"].to_pylist(), b_ts[lo:lo + _CHUNK].tolist(),
                                   part["action"].to_pylist(), part["item_id"].to_pylist(), strict=True))
            db.executemany("INSERT INTO queries VALUES (?, ?, ?)",
                           zip(q["user_id"].to_pylist(), q_ts.tolist(),
                               [json.dumps(w or []) for w in q["query_words"].to_pylist()], strict=True))
            counts["behaviours"] += b.num_rows
            counts["queries"] += q.num_rows
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("world", str(world.resolve())), ("format", FORMAT),
                                                         ("days", json.dumps(chosen)),
                                                         *((f"rows_{k}", str(v)) for k, v in counts.items())])
        db.execute("COMMIT")
        create_indexes(db, INDEXES)
        db.close()
    log.info("behaviour store %s: %s from %s", out, counts, world)
    return counts


def upgrade_sqlite_store(path: str | Path) -> bool:
    """Bring a SQLite store of format 1 to this format in place: add the covering indexes, drop the old ones.

    One write transaction: replicas reading the store (WAL) go on answering while it runs, then use the new
    indexes; an append waits for it (``busy_timeout``). The old indexes' pages stay in the file, free for new
    rows (``VACUUM`` it, not served, to shrink it). Returns False when the store was already this format.

    Raises:
        FileNotFoundError: no store at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no behaviour store")
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        old = _index_names(db) & set(FORMAT_1_INDEXES)
        if not old:
            return False
        db.execute("BEGIN IMMEDIATE")
        try:
            create_indexes(db, INDEXES)
            for name in sorted(old):
                db.execute(f"DROP INDEX {name}")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (FORMAT,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.close()
    log.info("behaviour store %s: upgraded to format %s (covering indexes)", path, FORMAT)
    return True


# ---------------------------------------------------------------------------------------------- Redis


class RedisStore:
    """A behaviour store in Redis: ``<prefix>:b:<user>:<action>`` and ``<prefix>:q:<user>`` sorted sets by ts.

    Members are ``<seq>|<payload>`` with ``seq`` from the counter ``<prefix>:seq``, so equal timestamps keep
    their arrival order and equal behaviours stay distinct.

    Args:
        url: a Redis URL, e.g. ``redis://host:6379/0``.
        config: the feature windows the encoder uses.
        prefix: key prefix (several stores can share a server).

    An acknowledged ``append`` is as durable as the server's settings keep it: ``appendonly yes`` with
    ``appendfsync always`` for it to survive a killed server (docs/serving.md, "Durability of events").
    """

    def __init__(self, url: str, config: FeatureConfig, prefix: str = "mgdspr") -> None:
        import redis  # the optional [redis] extra

        self.url, self.prefix, self.windows = url, prefix, Windows(config)
        self._r = redis.Redis.from_url(url, socket_timeout=5.0)
        self._r.ping()

    def _b(self, user: int, action: str) -> str:
        return f"{self.prefix}:b:{user}:{action}"

    def histories(self, user_ids: Sequence[int], ts: Sequence[int]) -> tuple[pa.Table, pa.Table]:
        """As ``SqliteStore.histories``."""
        w = self.windows
        pipe = self._r.pipeline(transaction=False)
        asked = []
        for user, t in sorted(set(zip(map(int, user_ids), map(int, ts), strict=True))):
            # ts < t is the score range "(t"; newest first, as many as the window can use
            pipe.zrevrangebyscore(self._b(user, "click"), f"({t}", "-inf", start=0, num=w.recent, withscores=True)
            for action in LONG_ACTIONS:
                pipe.zrevrangebyscore(self._b(user, action), f"({t - w.short_ms}", t - w.long_ms, start=0,
                                      num=w.long_len, withscores=True)
            pipe.zrevrangebyscore(f"{self.prefix}:q:{user}", f"({t}", "-inf", start=0, num=w.his_queries,
                                  withscores=True)
            asked.append(user)
        replies = pipe.execute()
        behaviours, queries = [], []
        per_user = 2 + len(LONG_ACTIONS)
        for i, user in enumerate(asked):
            for action, reply in zip(("click", *LONG_ACTIONS), replies[i * per_user:i * per_user + 4], strict=True):
                for member, score in reply:
                    seq, item = member.decode().split("|", 1)
                    behaviours.append((int(seq), user, int(item), action, int(score)))
            for member, score in replies[i * per_user + 4]:
                seq, words = member.decode().split("|", 1)
                queries.append((int(seq), user, int(score), words))
        return _tables(behaviours, queries)

    def append(self, behaviours: Iterable[Behaviour] = (), queries: Iterable[PastQuery] = ()) -> None:
        """Add behaviours and past queries (one pipeline)."""
        behaviours, queries = list(behaviours), list(queries)
        n = len(behaviours) + len(queries)
        if not n:
            return
        last = self._r.incrby(f"{self.prefix}:seq", n)
        seq = iter(range(last - n + 1, last + 1))
        pipe = self._r.pipeline(transaction=False)
        for b in behaviours:
            pipe.zadd(self._b(b.user_id, b.action), {f"{next(seq):015d}|{b.item_id}": b.ts})
        for q in queries:
            pipe.zadd(f"{self.prefix}:q:{q.user_id}", {f"{next(seq):015d}|{json.dumps(q.query_words)}": q.ts})
        pipe.execute()

    def load_world(self, world: str | Path) -> dict[str, int]:
        """Append every behaviour and history query of a world, day by day (initial load)."""
        manifest = read_manifest(world)
        counts = {"behaviours": 0, "queries": 0}
        for day in sorted(manifest.all_days):
            b = read_table(world, "behaviours", days=[day], columns=["user_id", "ts", "action", "item_id"])
            q = read_table(world, "query_history", days=[day], columns=["user_id", "ts", "query_words"])
            self.append(
                (Behaviour(user_id=u, item_id=i, action=a, ts=t) for u, i, a, t in zip(
                    b["user_id"].to_pylist(), b["item_id"].to_pylist(), b["action"].to_pylist(),
                    epoch_ms(b["ts"]).tolist(), strict=True)),
                (PastQuery(user_id=u, ts=t, query_words=w or []) for u, t, w in zip(
                    q["user_id"].to_pylist(), epoch_ms(q["ts"]).tolist(), q["query_words"].to_pylist(),
                    strict=True)))
            counts["behaviours"] += b.num_rows
            counts["queries"] += q.num_rows
        return counts

    def close(self) -> None:
        self._r.close()


def open_store(url: str, config: FeatureConfig) -> Store:
    """The store a URL names: ``redis://...`` or a path to an SQLite store file."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, config)
    return SqliteStore(url, config)
