"""``engine.QueryEncoder``: the query tower runs as ``serve.query_tower`` asks (ONNX Runtime by default), gives the
module's H_qu on real requests with histories, and falls back to the next kind when a graph cannot be made
(synthetic world_en; Ray-free)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

import ray_mgdspr.model.trace as trace
from ray_mgdspr.config import ProjectConfig, ServeConfig
from ray_mgdspr.data.world import read_table
from ray_mgdspr.serve.engine import QueryEncoder, Retriever, verify_release
from ray_mgdspr.serve.store import SqliteStore


def encoder(deployment: Any, tower: str) -> QueryEncoder:
    release = verify_release(deployment.index_root, "v1")
    return QueryEncoder(release.bundle_path, deployment.world, SqliteStore(deployment.store, deployment.features),
                        tower=tower)


def test_every_kind_of_tower_encodes_the_module_s_h_qu(deployment: Any) -> None:
    searches = read_table(deployment.world, "search_events", days=[1], columns=["user_id", "ts", "query_words"])
    n = 40
    queries = [" ".join(w) or "dress" for w in searches["query_words"].to_pylist()[:n]]
    users, ts = searches["user_id"].to_pylist()[:n], searches["ts"].to_numpy()[:n].astype("int64").tolist()
    users[::7] = [None] * len(users[::7])  # some anonymous requests: empty histories
    encoders = {kind: encoder(deployment, kind) for kind in ("onnx", "torchscript", "module")}
    assert {kind: e.tower_kind for kind, e in encoders.items()} == \
        {"onnx": "onnx", "torchscript": "torchscript", "module": "module"}
    module = encoders["module"]
    behaviours, _ = module.store.histories(*zip(*[(u, t) for u, t in zip(users, ts, strict=True) if u is not None],
                                                strict=True))
    assert behaviours.num_rows > 0  # the requests have histories for the tower to read
    want = np.stack([e.embedding for e in module.encode(queries, users, ts)])
    for kind in ("onnx", "torchscript"):
        batch = np.stack([e.embedding for e in encoders[kind].encode(queries, users, ts)])
        one_by_one = np.stack([encoders[kind].encode([q], [u], [t])[0].embedding
                               for q, u, t in zip(queries, users, ts, strict=True)])
        np.testing.assert_allclose(batch, want, atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(one_by_one, want, atol=1e-5, err_msg=kind)


def test_a_tower_that_cannot_be_exported_runs_as_the_next_kind(deployment: Any, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no ONNX form for this op")

    monkeypatch.setattr(trace, "onnx_tower", broken)
    with caplog.at_level(logging.WARNING, logger="ray_mgdspr.serve.engine"):
        assert encoder(deployment, "onnx").tower_kind == "torchscript"
    assert "could not be made a graph of kind onnx" in caplog.text and "no ONNX form for this op" in caplog.text
    monkeypatch.setattr(trace, "trace_tower", broken)
    assert encoder(deployment, "onnx").tower_kind == "module"


def test_the_old_trace_setting_is_read_as_query_tower_with_a_warning() -> None:
    """Configs written before serve.query_tower (every run's config.yaml holds the whole serve section) still load:
    false is the module, true (a compiled graph, the old default) the new default."""
    with pytest.warns(FutureWarning, match=r"serve\.trace_query_tower \(False\) is replaced by serve\.query_tower: "
                      r"read as query_tower 'module'"):
        assert ServeConfig(trace_query_tower=False).query_tower == "module"
    with pytest.warns(FutureWarning, match=r"read as query_tower 'onnx'"):
        assert ServeConfig.model_validate({"trace_query_tower": True}).query_tower == "onnx"
    with pytest.warns(FutureWarning):
        assert ServeConfig(trace_query_tower=False, query_tower="torchscript").query_tower == "torchscript"
    assert ServeConfig().resolved(ProjectConfig()).query_tower == "onnx"
    assert "trace_query_tower" not in ServeConfig().model_dump()


def test_a_setting_read_at_open_cannot_be_changed_between_requests(deployment: Any) -> None:
    """``Retriever.cfg`` is settable for request-time settings (an A/B in one process) but refuses the ones its
    encoder and shards were opened with, which would otherwise be silently ignored."""
    cfg = ServeConfig(index_root=str(deployment.index_root), world=str(deployment.world),
                      store=str(deployment.store)).resolved(ProjectConfig())
    retriever = Retriever.open(cfg, "v1", SqliteStore(deployment.store, deployment.features))
    retriever.cfg = cfg.model_copy(update={"early_fallback": 0.0, "search_threads": 2, "filter_depth": 100,
                                           "fallback": "none"})
    assert retriever.cfg.early_fallback == 0.0 and retriever.stages.search_threads == 2
    for field, value in (("query_tower", "module"), ("nprobe", 3), ("torch_threads", 2), ("verdict_cache_mb", 1)):
        with pytest.raises(ValueError, match=rf"serve {field}: read when a version is opened"):
            retriever.cfg = cfg.model_copy(update={field: value})
    assert retriever.cfg.early_fallback == 0.0
