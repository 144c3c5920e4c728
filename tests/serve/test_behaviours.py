"""A user's recent behaviours as ``GET /v1/users/{user_id}/behaviours`` answers them (Ray-free): the rows the
encoder's windows read, most recent first, titles from the served version, and the strict query-string schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from ray_mgdspr.config import FeatureConfig, IndexConfig
from ray_mgdspr.data.features import DAY_MS
from ray_mgdspr.index.shards import build_index_version, split_by_shard
from ray_mgdspr.serve.engine import LexicalChannel, recent_behaviours
from ray_mgdspr.serve.schemas import MAX_BEHAVIOURS, BehavioursRequest
from ray_mgdspr.serve.store import Behaviour, SqliteStore

WINDOWS = FeatureConfig(realtime_len=2, short_len=2, long_len=2)  # 4 latest clicks; L^u: 2 per action, 10-30 days
NOW = 1_700_000_000_000
USER = 7
TITLES = {1: "red dress", 2: "blue shoes", 3: "green hat", 4: "black bag", 5: "white shirt"}


def titles(item_ids: np.ndarray) -> list[str | None]:
    return [TITLES.get(int(i)) for i in item_ids]


def click(item: int, ts: int, action: str = "click", user: int = USER) -> Behaviour:
    return Behaviour(user_id=user, item_id=item, action=action, ts=ts)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "behaviours.sqlite", WINDOWS, create=True)


def test_the_windows_rows_most_recent_first_with_titles(store: SqliteStore) -> None:
    store.append([
        click(1, NOW - 5_000), click(99, NOW - 1_000),  # 99: an item the version does not serve
        click(2, NOW - 3_000), click(3, NOW - 3_000),  # equal times: 3 arrived later, so it comes first
        click(4, NOW + 1_000),  # after the request: no window reads it
        click(5, NOW - 15 * DAY_MS, "buy"),  # in L^u (10 to 30 days back)
        click(1, NOW - 2 * DAY_MS, "buy"),  # a recent buy: in no window (L^u starts 10 days back)
        click(2, NOW - 40 * DAY_MS, "collect"),  # older than L^u
        click(3, NOW - 1_000, "cart"),  # not an action the encoder reads
        click(1, NOW - 500, user=USER + 1),  # another user
    ])
    got = recent_behaviours(store, titles, USER, NOW, MAX_BEHAVIOURS)
    assert [(b["item_id"], b["action"], b["ts"], b["title"]) for b in got] == [
        (99, "click", NOW - 1_000, None),
        (3, "click", NOW - 3_000, "green hat"),
        (2, "click", NOW - 3_000, "blue shoes"),
        (1, "click", NOW - 5_000, "red dress"),
        (5, "buy", NOW - 15 * DAY_MS, "white shirt"),
    ]
    assert recent_behaviours(store, titles, USER, NOW, 2) == got[:2]
    # the click after NOW counts for a later request; R^u + S^u keep the 4 latest clicks of any age
    later = recent_behaviours(store, titles, USER, NOW + 2_000, MAX_BEHAVIOURS)
    assert [(b["item_id"], b["action"]) for b in later] == [(4, "click"), (99, "click"), (3, "click"), (2, "click"),
                                                            (5, "buy")]


def test_a_click_in_both_windows_is_listed_once(store: SqliteStore) -> None:
    store.append([click(1, NOW - 12 * DAY_MS)])  # read by the latest-clicks query and the long-term one
    assert [b["item_id"] for b in recent_behaviours(store, titles, USER, NOW, 10)] == [1]


def test_a_user_without_behaviours_gets_none(store: SqliteStore) -> None:
    assert recent_behaviours(store, titles, 12345, NOW, 10) == []


def test_lexical_channel_titles_are_the_versions(tmp_path: Path) -> None:
    ids = np.arange(40, dtype=np.int64) * 3 + 1_000
    meta = pa.table({"item_id": ids, "leaf_id": (ids % 97).astype(np.int32), "cate1_id": (ids % 7).astype(np.int32),
                     "brand_id": (ids % 31).astype(np.int32), "attr_value_ids": [[int(i % 5)] for i in ids],
                     "title_words": [[f"w{i}"] for i in ids], "title": [f"item w{i}" for i in ids]})
    vectors = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    build_index_version(tmp_path, "v1", split_by_shard(vectors, ids, meta, 2), IndexConfig(shards=2), "v1", "sha", 8)
    lexical = LexicalChannel(tmp_path / "v1")
    asked = np.array([1_003, 0, 1_001, 1_117, 5_000, 1_000], np.int64)  # served, below, between, last, above, first
    assert lexical.titles(asked) == ["item w1003", None, None, "item w1117", None, "item w1000"]
    assert lexical.titles(np.zeros(0, np.int64)) == []
    hits = lexical.search([["w1042"]], 3, [()])[0]  # the search's titles come from the same lookup
    assert hits.item_ids[0] == 1_042 and hits.titles == lexical.titles(hits.item_ids)


@pytest.mark.parametrize(("given", "field", "problem"), [
    ({"user_id": "abc"}, "user_id", "decimal digits"),
    ({"user_id": " 5"}, "user_id", "decimal digits"),
    ({"user_id": "+5"}, "user_id", "decimal digits"),
    ({"user_id": "5.0"}, "user_id", "decimal digits"),
    ({"user_id": "5_000"}, "user_id", "decimal digits"),
    ({"user_id": "-1"}, "user_id", "greater than or equal to 0"),
    ({"user_id": str(2**63)}, "user_id", "less than or equal to 9223372036854775807"),
    ({"user_id": "9" * 65}, "user_id", "decimal digits"),
    ({"user_id": "1", "limit": "0"}, "limit", "greater than or equal to 1"),
    ({"user_id": "1", "limit": str(MAX_BEHAVIOURS + 1)}, "limit", f"less than or equal to {MAX_BEHAVIOURS}"),
    ({"user_id": "1", "limit": ""}, "limit", "decimal digits"),
    ({"user_id": "1", "ts": "0"}, "ts", "greater than 0"),
    ({"user_id": "1", "colour": "red"}, "colour", "Extra inputs"),
])
def test_the_request_schema_refuses_what_is_not_a_plain_bounded_integer(given: dict, field: str, problem: str
                                                                         ) -> None:
    with pytest.raises(ValidationError) as e:
        BehavioursRequest.model_validate(given)
    (error,) = e.value.errors()
    assert error["loc"] == (field,) and problem in error["msg"], error


def test_the_request_schema_reads_decimal_strings() -> None:
    req = BehavioursRequest.model_validate({"user_id": str(2**63 - 1), "limit": "7", "ts": str(NOW)})
    assert (req.user_id, req.limit, req.ts) == (2**63 - 1, 7, NOW)
    assert BehavioursRequest.model_validate({"user_id": "0"}).limit == 20
