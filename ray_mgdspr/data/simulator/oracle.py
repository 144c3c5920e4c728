"""Oracle rankings from a simulated world's ground truth: the ceilings a retriever is judged against.

The simulator knows why every logged click happened: the engine that built the result page (its exposure) and
the choice model that turned an examined item into a click. An item is a target of a held-out search (clicked or
bought) with probability

    P(target) = E[ examination(rank on the page) x P(click | examined) ],

the expectation over the engine's page (sampling and rank noise), the click noise and whatever the searching
user wanted but did not type (the attribute values the query leaves unstated). The oracles rank the whole
catalogue by a Monte Carlo estimate of that probability (``replications`` pages per search, through the
simulator's own ``DaySimulator.pages`` and ``click_probability``, so they can never drift from it):

* ``oracle_aware``: knows the searching user's latent state on the test day (``users.parquet``): the ceiling
  of a personalised retriever.
* ``oracle_agnostic``: knows the stated intent but not the user: each replication draws another user from
  those who search the intent's category (activity x category preference). The ceiling of a retriever that
  ignores who searches.
* ``oracle_grade``: ranks by the ground-truth grade alone (exact, partial, irrelevant; popularity breaks ties):
  relevance without exposure or personal taste.

The personalisation headroom of a world is Recall@K(aware) - Recall@K(agnostic): how much knowing the user can
add at all. A personalised model's share of it is (full model - no personalisation) / headroom.

Everything here is SYNTHETIC ground truth; a real world has no oracle (``from_world`` refuses it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_mgdspr.config import SimulateConfig
from ray_mgdspr.data.simulator.activity import DaySimulator, click_probability, examination
from ray_mgdspr.data.simulator.catalogue import Catalogue
from ray_mgdspr.data.simulator.lexicon import load_lexicon
from ray_mgdspr.data.simulator.relevance import grade_items
from ray_mgdspr.data.simulator.users import Users
from ray_mgdspr.data.world import read_manifest, read_table

ORACLES = ("oracle_aware", "oracle_agnostic", "oracle_grade")


class Oracle:
    """The simulator of one world, rebuilt from its manifest and its test-day users, ranking by ground truth.

    Example (a tiny synthetic world)::

        oracle = Oracle.from_world("runs/demo/world")
        top = oracle.topk(events, "oracle_aware", k=50)   # (E, 50) item ids
    """

    def __init__(self, cfg: SimulateConfig, cat: Catalogue, users: Users) -> None:
        self.cfg, self.cat, self.users = cfg, cat, users
        self.sim = DaySimulator(cfg, cat, users)
        # who searches a category: activity x long-term preference (the agnostic oracle's population)
        self._searchers = users.activity[:, None] * users.cate1_pref  # (N, C1)

    @classmethod
    def from_world(cls, world: str | Path) -> Oracle:
        manifest = read_manifest(world)
        if not manifest.synthetic:
            raise ValueError(f"world {world}: oracle rankings need the simulator's ground truth; "
                             f"{manifest.label} has none")
        missing = {"page_personalisation", "candidates", "click_noise"} - manifest.config.get("choice", {}).keys()
        if missing:  # its generative story differs from this simulator's: an oracle would rank the wrong world
            raise ValueError(f"world {world} was simulated before the simulator had {sorted(missing)}; simulate it "
                             "again (`mgdspr simulate --overwrite`) to get oracle rankings")
        cfg = SimulateConfig.model_validate(manifest.config)
        cat = Catalogue.build(cfg, load_lexicon(cfg.lang))
        users = Users.from_table(read_table(world, "users"))
        if users.n != cfg.n_users:
            raise ValueError(f"world {world}: users.parquet has {users.n} rows, the manifest's config {cfg.n_users}")
        return cls(cfg, cat, users)

    def stated_values(self, value_lists: list[list[int]]) -> np.ndarray:
        """(E, S) the attribute value each search states per slot, -1 where it states none."""
        out = np.full((len(value_lists), len(self.cat.slot_names)), -1, np.int32)
        for row, values in enumerate(value_lists):
            for v in values or ():
                out[row, self.cat.value_slot[v]] = v
        return out

    def target_probability(self, user: np.ndarray, leaf: np.ndarray, brand: np.ndarray, stated: np.ndarray,
                           aware: bool, replications: int = 32, seed: int = 0) -> np.ndarray:
        """(E, N) Monte Carlo estimate of P(item is clicked) for each search (user, leaf, brand, stated values)."""
        cat, cfg = self.cat, self.cfg
        n_e, r = len(leaf), replications
        rng = np.random.default_rng([seed, 7, n_e])
        rows = np.repeat(np.arange(n_e), r)
        cate1 = cat.leaf_cate1[leaf][rows]
        if aware:
            who = np.asarray(user, np.int64)[rows]
        else:  # a searcher of the category, not this user
            who = np.empty(len(rows), np.int64)
            for c in np.unique(cate1):
                at = np.flatnonzero(cate1 == c)
                w = self._searchers[:, c]
                who[at] = rng.choice(len(w), size=len(at), p=w / w.sum())
        applicable = cat.cate1_slot_mask[cate1]
        popular = np.stack([rng.choice(ids, size=len(rows), p=cat.value_weight[ids] / cat.value_weight[ids].sum())
                            for ids in cat.slot_value_ids], axis=1)
        hidden = np.where(rng.random(popular.shape) < cfg.queries.own_taste_rate, self.users.taste[who], popular)
        desired = np.where(stated[rows] >= 0, stated[rows], np.where(applicable, hidden, -1))
        page, valid, grade, taste = self.sim.pages(leaf[rows], cate1, brand[rows], stated[rows], who, desired, rng)
        p = examination(valid) * click_probability(cat, cfg.choice, page, grade, taste,
                                                   rng.normal(0, cfg.choice.noise, page.shape))
        out = np.zeros((n_e, cat.n_items), np.float64)
        np.add.at(out, (np.broadcast_to(rows[:, None], page.shape)[valid], page[valid]), p[valid])
        return out / r

    def topk(self, events: pa.Table, mode: str, k: int, replications: int = 32, chunk: int = 256,
             seed: int = 0) -> np.ndarray:
        """(E, k) item ids of each search ranked by the oracle ``mode`` (one of ``ORACLES``).

        ``events`` needs ``user_id``, ``intent_leaf_id``, ``intent_brand_id``, ``intent_attr_value_ids``.
        """
        if mode not in ORACLES:
            raise ValueError(f"unknown oracle {mode!r}; choose one of {ORACLES}")
        cat = self.cat
        k = min(k, cat.n_items)
        user = events["user_id"].to_numpy()
        leaf = events["intent_leaf_id"].to_numpy().astype(np.int64)
        brand = events["intent_brand_id"].to_numpy().astype(np.int64)
        stated = self.stated_values(events["intent_attr_value_ids"].to_pylist())
        popularity = np.argsort(np.argsort(cat.item_pop)) / cat.n_items  # rank in [0, 1): ties broken by popularity
        out = []
        for lo in range(0, len(leaf), chunk):
            sl = slice(lo, lo + chunk)
            items = np.broadcast_to(np.arange(cat.n_items), (len(leaf[sl]), cat.n_items))
            grade = grade_items(cat.item_leaf, cat.item_brand, cat.item_slot_value, leaf[sl], brand[sl], stated[sl],
                                items)
            if mode == "oracle_grade":
                key = grade + 0.5 * popularity
            else:
                p = self.target_probability(user[sl], leaf[sl], brand[sl], stated[sl], mode == "oracle_aware",
                                            replications, seed + lo)
                key = p + 1e-9 * (grade + popularity)  # never-shown items: by grade, then popularity
            top = np.argpartition(-key, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(key, top, axis=1), axis=1, kind="stable")
            out.append(np.take_along_axis(top, order, axis=1).astype(np.int64))
        return np.concatenate(out) if out else np.zeros((0, k), np.int64)
