"""Real-time behaviour at serving time: the session's earlier clicks, appended to the store as POST /v1/events
does, reach the follow-up search's encoder, and only for those users (synthetic world_en; Ray-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from ray_mgdspr.config import ProjectConfig, ServeConfig
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.serve.engine import Retriever
from ray_mgdspr.serve.realtime import followups, realtime_recall
from ray_mgdspr.serve.store import SqliteStore, build_sqlite_store


@pytest.fixture(scope="module")
def retriever(deployment: Any) -> Retriever:
    cfg = ServeConfig(index_root=str(deployment.index_root), world=str(deployment.world),
                      store=str(deployment.store)).resolved(ProjectConfig())
    return Retriever.open(cfg, "v1", SqliteStore(deployment.store, deployment.features))


def test_store_of_some_days(deployment: Any, tmp_path: Path) -> None:
    manifest = read_manifest(deployment.world)
    before = [d for d in manifest.all_days if d < min(manifest.test_days)]
    counts = build_sqlite_store(deployment.world, tmp_path / "s.sqlite", days=before)
    assert counts["behaviours"] == read_table(deployment.world, "behaviours", days=before).num_rows
    assert counts["queries"] == read_table(deployment.world, "query_history", days=before).num_rows
    full = build_sqlite_store(deployment.world, tmp_path / "all.sqlite")
    assert full["behaviours"] > counts["behaviours"]
    last = read_table(deployment.world, "behaviours", days=before)["ts"]
    test_day = read_table(deployment.world, "behaviours", days=manifest.test_days)["ts"]
    assert pc.max(last).as_py() < pc.min(test_day).as_py()


def test_followups_carry_only_earlier_clicks(deployment: Any) -> None:
    chosen = followups(deployment.world)
    assert len(chosen) > 20 and sum(bool(f.earlier_clicks) for f in chosen) > 10
    for f in chosen:
        assert all(b.ts < f.ts and b.user_id == f.user_id and b.action == "click" for b in f.earlier_clicks)
        assert f.earlier_queries and all(q.ts < f.ts for q in f.earlier_queries)


def test_appended_clicks_change_exactly_those_users_follow_ups(retriever: Retriever, deployment: Any) -> None:
    store = retriever.encoder.store
    r = realtime_recall(retriever, deployment.world, k=50, max_followups=200)
    assert retriever.encoder.store is store  # restored
    assert r.followups > 20 and r.clicks_appended > 10
    assert r.appended.any() and not r.appended.all()
    # a follow-up's H_qu moves only when the store got that user's clicks before its time, and for most of those
    # (not always: a saturated attention can ignore new rows bit for bit)
    assert not (r.changed & ~r.appended).any()
    assert r.changed.sum() >= 0.5 * r.appended.sum()
    for value in (r.recall_without, r.recall_with_clicks, r.recall_with_clicks_and_queries):
        assert 0 <= value <= 1
    assert ((r.target_rank_without <= 50) & (r.target_rank_with <= 50)).all()
