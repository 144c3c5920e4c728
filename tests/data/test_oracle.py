"""Oracle rankings from the simulator's ground truth (SYNTHETIC worlds): calibrated against the logged clicks, and
the personalisation headroom of the eval preset at the default page personalisation and at zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from helpers import small_config

from ray_mgdspr.config import load_preset
from ray_mgdspr.data.simulator.oracle import ORACLES, Oracle
from ray_mgdspr.data.simulator.simulate import simulate
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.metrics import recall_at_k


def _clicked_searches(world: Path, n: int | None = None):
    days = read_manifest(world).test_days
    events = read_table(world, "search_events", days=days)
    events = events.filter(pc.greater(pc.list_value_length(events["clicked_item_ids"]), 0))
    return events if n is None else events.slice(0, n)


def _targets(events) -> list[np.ndarray]:
    return [np.asarray(c, np.int64) for c in events["clicked_item_ids"].to_pylist()]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = tmp_path_factory.mktemp("oracle") / "world"
    simulate(small_config(leaves_per_category=2), world)
    return world


def test_expected_clicks_match_the_logged_clicks(small_world: Path) -> None:
    """Summed over the catalogue, the oracle's P(click) is the expected number of clicks of a search: it must match
    the clicks the simulator logged for the same searches (every search of the test day, clicked or not)."""
    oracle = Oracle.from_world(small_world)
    events = read_table(small_world, "search_events", days=read_manifest(small_world).test_days)
    stated = oracle.stated_values(events["intent_attr_value_ids"].to_pylist())
    p = oracle.target_probability(events["user_id"].to_numpy(), events["intent_leaf_id"].to_numpy(),
                                  events["intent_brand_id"].to_numpy(), stated, aware=True, replications=16)
    logged = pc.list_value_length(events["clicked_item_ids"]).to_numpy().mean()
    expected = p.sum(axis=1).mean()
    assert abs(expected - logged) < 0.08 * logged, (expected, logged)
    # items of other first-level categories are never on the page
    cat = oracle.cat
    other = cat.item_cate1[None, :] != cat.leaf_cate1[events["intent_leaf_id"].to_numpy()][:, None]
    assert p[other].max() == 0.0


def test_oracle_rankings_are_ordered_by_what_they_know(small_world: Path) -> None:
    oracle = Oracle.from_world(small_world)
    events = _clicked_searches(small_world, 300)
    recall = {m: recall_at_k(oracle.topk(events, m, 10), _targets(events), 10) for m in ORACLES}
    print({m: round(r, 3) for m, r in recall.items()}, "(SYNTHETIC)")
    assert recall["oracle_aware"] > recall["oracle_agnostic"] > 0.3
    grades = oracle.topk(events, "oracle_grade", 5)
    assert (oracle.cat.item_leaf[grades[:, 0]] == events["intent_leaf_id"].to_numpy()).all()  # relevant first
    with pytest.raises(ValueError, match="unknown oracle"):
        oracle.topk(events, "oracle_psychic", 5)


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.0, None])
def test_personalisation_headroom_of_the_eval_world(tmp_path: Path, strength: float | None) -> None:
    """Issue 14's target, a property of the world measured without any model: on the eval preset the user-aware
    oracle beats the user-agnostic one by >= 0.10 Recall@50 at the default page personalisation, and by ~0 when
    pages are built without the user and
    the click model has no personal terms."""
    cfg = load_preset("eval").simulate
    if strength is not None:  # every personal strength: the page's and the click model's
        personal = {k: strength for k in ("page_personalisation", "b_brand", "c_shop", "d_price", "g_taste")}
        cfg = cfg.model_copy(update={"choice": cfg.choice.model_copy(update=personal)})
    simulate(cfg, tmp_path / "world")
    oracle = Oracle.from_world(tmp_path / "world")
    events = _clicked_searches(tmp_path / "world")
    events = events.take(np.random.default_rng(0).choice(events.num_rows, 800, replace=False))
    aware, agnostic = (recall_at_k(oracle.topk(events, m, 50), _targets(events), 50)
                       for m in ("oracle_aware", "oracle_agnostic"))
    print(f"page_personalisation {cfg.choice.page_personalisation}: Recall@50 aware {aware:.3f}, agnostic "
          f"{agnostic:.3f}, headroom {aware - agnostic:.3f} (SYNTHETIC)")
    if strength == 0.0:
        assert abs(aware - agnostic) < 0.02
    else:
        assert aware - agnostic >= 0.10
