"""Simulated users: latent preferences that decide what they search, click, buy and collect.

Each user has a long-term preference over first-level categories (a concentrated Dirichlet), favourite
brands and shops, a price band and an attribute taste (a preferred value per slot). Two things move
day by day: favourite brands drift, and short-lived interest bursts pull browsing and searching to a
new category for a few days, so recent behaviour differs from month-long purchase habits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ray_mgdspr.config import SimulateConfig
from ray_mgdspr.data.simulator.catalogue import Catalogue

ACTIVITY_CAP = 20.0
"""No user is more than this many times as active as the average one."""


def sample_rows(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of an (n, k) matrix of non-negative weights."""
    cum = np.cumsum(p, axis=1)
    u = rng.random(len(p))[:, None] * cum[:, -1:]
    return np.minimum((cum <= u).sum(axis=1), p.shape[1] - 1)


def sample_brands_in(cat: Catalogue, cate1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A brand per entry, drawn by popularity among the brands that sell in that first-level category."""
    out = np.empty(cate1.shape, dtype=np.int32)
    for c in np.unique(cate1):
        where = cate1 == c
        out[where] = rng.choice(cat.brands_by_cate1[c], size=int(where.sum()), p=cat.brand_w_by_cate1[c])
    return out


@dataclass
class Users:
    activity: np.ndarray  # (N,) mean 1
    cate1_pref: np.ndarray  # (N, C1) long-term preference, rows sum to 1
    price_pref: np.ndarray  # (N,) preferred price z-offset
    taste: np.ndarray  # (N, n_slots) preferred attribute value id per slot
    fav_brands: np.ndarray  # (N, K)
    fav_shops: np.ndarray  # (N, K)
    burst_cate1: np.ndarray  # (N,) category of the current interest burst, -1 when none
    burst_until: np.ndarray  # (N,) last day of the burst

    @property
    def n(self) -> int:
        return len(self.activity)

    @classmethod
    def build(cls, cfg: SimulateConfig, cat: Catalogue) -> Users:
        rng = np.random.default_rng([cfg.seed, 3])
        us, n = cfg.users, cfg.n_users
        ranks = rng.permutation(np.arange(1, n + 1))
        activity = 1.0 / ranks**us.activity_zipf
        activity = np.minimum(activity / activity.mean(), ACTIVITY_CAP)
        activity /= activity.mean()
        alive = cat.cate1_has_items.astype(np.float64)
        pref = rng.dirichlet(np.full(cat.n_cate1, us.cate_concentration), size=n) * alive + 1e-9 * alive
        pref /= pref.sum(axis=1, keepdims=True)
        taste = np.stack(
            [rng.choice(ids, size=n, p=cat.value_weight[ids] / cat.value_weight[ids].sum())
             for ids in cat.slot_value_ids], axis=1).astype(np.int32)
        users = cls(
            activity=activity,
            cate1_pref=pref,
            price_pref=rng.normal(0.0, us.price_pref_std, n),
            taste=taste,
            fav_brands=np.zeros((n, us.fav_brands), dtype=np.int32),
            fav_shops=np.zeros((n, us.fav_shops), dtype=np.int32),
            burst_cate1=np.full(n, -1, dtype=np.int32),
            burst_until=np.full(n, -(10**6), dtype=np.int32),
        )
        for k in range(us.fav_brands):
            users.fav_brands[:, k] = users.draw_brand(cat, np.arange(n), rng)
        for k in range(us.fav_shops):
            brand = users.fav_brands[:, k % us.fav_brands]
            users.fav_shops[:, k] = cat.random_shop_of(brand, rng)
        return users

    def draw_brand(self, cat: Catalogue, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A brand in a category the user likes, by popularity."""
        return sample_brands_in(cat, sample_rows(self.cate1_pref[users], rng), rng)

    def advance_day(self, cfg: SimulateConfig, cat: Catalogue, day: int, rng: np.random.Generator) -> None:
        """Drift: favourite brands are replaced now and then; interest bursts start and end."""
        us = cfg.users
        drift = rng.random(self.fav_brands.shape) < us.brand_drift
        rows, cols = np.nonzero(drift)
        if len(rows):
            self.fav_brands[rows, cols] = self.draw_brand(cat, rows, rng)
        ended = self.burst_until < day
        self.burst_cate1[ended] = -1
        start = ended & (rng.random(self.n) < us.interest_burst_rate)
        alive = np.flatnonzero(cat.cate1_has_items)
        self.burst_cate1[start] = rng.choice(alive, size=int(start.sum()))
        self.burst_until[start] = day + us.interest_burst_days - 1

    def daily_mix(self, cfg: SimulateConfig, users: np.ndarray) -> np.ndarray:
        """Today's category mix of some users: long-term preference, pulled towards a burst if any."""
        mix = self.cate1_pref[users].copy()
        bursting = np.flatnonzero(self.burst_cate1[users] >= 0)
        w = cfg.users.interest_burst_weight
        mix[bursting] *= 1.0 - w
        mix[bursting, self.burst_cate1[users[bursting]]] += w
        return mix

    @classmethod
    def from_table(cls, table: pa.Table) -> Users:
        """The users of a world's ``users`` table (the test day's state; interest bursts are not recorded)."""
        t = table.sort_by("user_id")
        stack = lambda c, dt: np.stack(t[c].to_numpy(zero_copy_only=False)).astype(dt)  # noqa: E731
        n = t.num_rows
        return cls(activity=t["activity"].to_numpy().astype(np.float64), cate1_pref=stack("cate1_pref", np.float64),
                   price_pref=t["price_pref"].to_numpy().astype(np.float64),
                   taste=stack("taste_attr_value_ids", np.int32), fav_brands=stack("fav_brand_ids", np.int32),
                   fav_shops=stack("fav_shop_ids", np.int32), burst_cate1=np.full(n, -1, np.int32),
                   burst_until=np.full(n, -(10**6), np.int32))

    def table(self) -> pa.Table:
        return pa.table(
            {
                "user_id": np.arange(self.n, dtype=np.int64),
                "activity": self.activity.astype(np.float32),
                "cate1_pref": list(self.cate1_pref.astype(np.float32)),
                "price_pref": self.price_pref.astype(np.float32),
                "taste_attr_value_ids": list(self.taste),
                "fav_brand_ids": list(self.fav_brands),
                "fav_shop_ids": list(self.fav_shops),
            }
        )
