"""The simulated catalogue: category tree, attribute values, brands, shops and items.

Everything is drawn from one seeded generator with numpy, so the same seed gives the same world in
both languages; only the words differ. Items are arrays (the activity simulation indexes them per
event); titles and tables are rendered in chunks when written.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ray_mgdspr.config import SimulateConfig
from ray_mgdspr.data.simulator.lexicon import Lexicon

PRICE_SIGMA = 0.5
"""Std of log-price around the leaf's median; a price's z-score is its offset in these units."""
DISCOUNT_RATE = 0.1


class GroupSampler:
    """Draw items of a group (a leaf, a first-level category) with probability proportional to a weight.

    Items are sorted by group once; a draw is one ``searchsorted`` on the cumulative weights, so
    millions of draws for thousands of groups stay vectorised. Empty groups draw -1.
    """

    def __init__(self, group_of_item: np.ndarray, weights: np.ndarray, n_groups: int) -> None:
        self.order = np.argsort(group_of_item, kind="stable")
        counts = np.bincount(group_of_item, minlength=n_groups)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        self.cum = np.cumsum(weights[self.order].astype(np.float64))

    def counts(self) -> np.ndarray:
        return self.end - self.start

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        groups = np.asarray(groups)
        start, end = self.start[groups], self.end[groups]
        lo = np.where(start > 0, self.cum[np.maximum(start - 1, 0)], 0.0)
        hi = np.where(end > 0, self.cum[np.maximum(end - 1, 0)], 0.0)
        x = lo + rng.random(groups.shape) * (hi - lo)
        pos = np.clip(np.searchsorted(self.cum, x, side="right"), start, np.maximum(end - 1, start))
        return np.where(end > start, self.order[np.minimum(pos, len(self.order) - 1)], -1)


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights 1/rank^s over a random permutation, normalised to sum 1."""
    w = 1.0 / np.arange(1, n + 1) ** s
    return (rng.permutation(w) / w.sum()).astype(np.float64)


@dataclass
class Catalogue:
    lex: Lexicon
    # category tree
    leaf_cate1: np.ndarray  # (L,) int32
    leaf_terms: list[tuple[str, ...]]
    leaf_log_median_price: np.ndarray  # (L,)
    cate1_names: list[str]
    cate1_slots: list[np.ndarray]  # per cate1: global slot indices
    cate1_stuffed: list[tuple[str, ...]]
    # attribute values: one global id space over all slots
    slot_names: list[str]
    value_slot: np.ndarray  # (V,) slot index of each value
    value_terms: list[str]
    value_weight: np.ndarray  # (V,) popularity within its slot, sums to 1 per slot
    # brands and shops
    brand_names: list[str]
    brand_pop: np.ndarray  # (B,)
    brand_cate1: np.ndarray  # (B, C1) bool: the brand sells in the category
    shop_names: list[str]
    shop_brands: list[list[int]]
    # items
    item_leaf: np.ndarray
    item_cate1: np.ndarray
    item_brand: np.ndarray
    item_shop: np.ndarray
    item_price: np.ndarray
    item_price_z: np.ndarray
    item_quality: np.ndarray
    item_pop: np.ndarray
    item_discount: np.ndarray
    item_slot_value: np.ndarray  # (M, n_slots) int32, -1 where the leaf has no such slot
    seed: int

    @property
    def n_items(self) -> int:
        return len(self.item_leaf)

    @property
    def n_cate1(self) -> int:
        return len(self.cate1_names)

    def __post_init__(self) -> None:
        n_leaves, n_cate1 = len(self.leaf_cate1), len(self.cate1_names)
        self.by_leaf = GroupSampler(self.item_leaf, self.item_pop, n_leaves)
        self.by_cate1 = GroupSampler(self.item_cate1, self.item_pop, n_cate1)
        attractive = self.item_pop * np.where(self.item_discount, 5.0, 1.0)
        self.attractive_by_cate1 = GroupSampler(self.item_cate1, attractive, n_cate1)
        self.leaf_items = self.by_leaf.counts()
        # Leaves are drawn for intents in proportion to their item count (never an empty leaf).
        self.leaves_by_cate1 = GroupSampler(self.leaf_cate1, self.leaf_items.astype(np.float64), n_cate1)
        self.cate1_has_items = self.by_cate1.counts() > 0
        brand_w = self.brand_cate1 * self.brand_pop[:, None]  # (B, C1)
        self.brands_by_cate1 = [np.flatnonzero(brand_w[:, c]) for c in range(n_cate1)]
        self.brand_w_by_cate1 = [brand_w[b, c] / brand_w[b, c].sum() for c, b in enumerate(self.brands_by_cate1)]
        self.slot_value_ids = [np.flatnonzero(self.value_slot == s) for s in range(len(self.slot_names))]
        self.cate1_slot_mask = np.zeros((n_cate1, len(self.slot_names)), dtype=bool)
        for c, slots in enumerate(self.cate1_slots):
            self.cate1_slot_mask[c, slots] = True
        self._brand_shops = _BrandShops(self.shop_brands, len(self.brand_names))

    def random_shop_of(self, brands: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._brand_shops.sample(brands, rng)

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, cfg: SimulateConfig, lex: Lexicon) -> Catalogue:
        rng = np.random.default_rng([cfg.seed, 1])
        cats = lex.categories
        leaves_per = [len(c.leaves) if cfg.leaves_per_category is None else min(len(c.leaves),
                      cfg.leaves_per_category) for c in cats]
        leaf_cate1 = np.repeat(np.arange(len(cats)), leaves_per).astype(np.int32)
        leaf_terms = [leaf for c, n in zip(cats, leaves_per, strict=True) for leaf in c.leaves[:n]]
        slot_names = list(lex.slots)
        value_slot = np.concatenate([np.full(len(v), i) for i, v in enumerate(lex.slots.values())]).astype(np.int32)
        value_terms = [t for v in lex.slots.values() for t in v]
        value_weight = np.concatenate([_zipf_weights(len(v), 0.8, rng) for v in lex.slots.values()])
        cate1_slots = [np.array([slot_names.index(s) for s in c.slots], dtype=np.int32) for c in cats]

        brand_pop, brand_cate1 = cls._brands(cfg, len(cats), rng)
        shop_brands = cls._shops(cfg, brand_cate1, rng)

        m = cfg.n_items
        leaf_w = rng.lognormal(0.0, 0.8, len(leaf_cate1))
        item_leaf = rng.choice(len(leaf_cate1), size=m, p=leaf_w / leaf_w.sum()).astype(np.int32)
        item_cate1 = leaf_cate1[item_leaf]
        item_brand = np.empty(m, dtype=np.int32)
        for c in range(len(cats)):
            idx = np.flatnonzero(item_cate1 == c)
            brands = np.flatnonzero(brand_cate1[:, c])
            p = brand_pop[brands] / brand_pop[brands].sum()
            item_brand[idx] = rng.choice(brands, size=len(idx), p=p)
        item_shop = _BrandShops(shop_brands, cfg.n_brands).sample(item_brand, rng)

        leaf_log_median = rng.uniform(np.log(15), np.log(1500), len(leaf_cate1))
        price_z = rng.standard_normal(m)
        price = np.round(np.exp(leaf_log_median[item_leaf] + PRICE_SIGMA * price_z), 1).clip(0.9)
        quality = rng.standard_normal(m)
        pop = rng.lognormal(0.0, cfg.item_popularity_sigma, m) * np.sqrt(brand_pop[item_brand] * len(brand_pop))
        discount = rng.random(m) < DISCOUNT_RATE

        item_slot_value = np.full((m, len(slot_names)), -1, dtype=np.int32)
        for s in range(len(slot_names)):
            has = np.flatnonzero(np.isin(item_cate1, [c for c, sl in enumerate(cate1_slots) if s in sl]))
            ids = np.flatnonzero(value_slot == s)
            item_slot_value[has, s] = rng.choice(ids, size=len(has), p=value_weight[ids])

        names_rng = np.random.default_rng([cfg.seed, 2])  # apart, so en and zh worlds draw the same items
        brand_names = _invent_names(cfg.n_brands, lex, names_rng)
        return cls(
            lex=lex,
            leaf_cate1=leaf_cate1,
            leaf_terms=leaf_terms,
            leaf_log_median_price=leaf_log_median,
            cate1_names=[c.name for c in cats],
            cate1_slots=cate1_slots,
            cate1_stuffed=[c.stuffed for c in cats],
            slot_names=slot_names,
            value_slot=value_slot,
            value_terms=value_terms,
            value_weight=value_weight,
            brand_names=brand_names,
            brand_pop=brand_pop,
            brand_cate1=brand_cate1,
            shop_names=_shop_names(shop_brands, brand_names, lex, names_rng),
            shop_brands=shop_brands,
            item_leaf=item_leaf,
            item_cate1=item_cate1,
            item_brand=item_brand,
            item_shop=item_shop,
            item_price=price.astype(np.float32),
            item_price_z=price_z.astype(np.float32),
            item_quality=quality.astype(np.float32),
            item_pop=(pop / pop.sum()).astype(np.float64),
            item_discount=discount,
            item_slot_value=item_slot_value,
            seed=cfg.seed,
        )

    @staticmethod
    def _brands(cfg: SimulateConfig, n_cate1: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Zipf popularity; each brand sells in 1-3 first-level categories and every category has brands."""
        pop = _zipf_weights(cfg.n_brands, 1.0, rng)
        sells = np.zeros((cfg.n_brands, n_cate1), dtype=bool)
        n_cats = rng.integers(1, 4, cfg.n_brands)
        for b in range(cfg.n_brands):
            sells[b, rng.choice(n_cate1, size=min(n_cats[b], n_cate1), replace=False)] = True
        sells[np.arange(n_cate1) % cfg.n_brands, np.arange(n_cate1)] = True
        return pop, sells

    @staticmethod
    def _shops(cfg: SimulateConfig, brand_cate1: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Each shop sells 1-3 brands that share a category; every brand has at least one shop."""
        n_brands = len(brand_cate1)
        shops: list[list[int]] = [[] for _ in range(cfg.n_shops)]
        for b in range(n_brands):
            shops[b % cfg.n_shops].append(b)
        for s in range(n_brands, cfg.n_shops):
            shops[s].append(int(rng.integers(n_brands)))
        for s in range(cfg.n_shops):
            cate = np.flatnonzero(brand_cate1[shops[s][0]])[0]
            peers = np.flatnonzero(brand_cate1[:, cate])
            extra = rng.choice(peers, size=min(int(rng.integers(0, 3)), len(peers)), replace=False)
            shops[s] = sorted(set(shops[s]) | {int(b) for b in extra})
        return shops

    # ---------------------------------------------------------------------------------- tables

    def category_table(self) -> pa.Table:
        return pa.table(
            {
                "leaf_id": np.arange(len(self.leaf_cate1), dtype=np.int32),
                "leaf_name": [t[0] for t in self.leaf_terms],
                "cate1_id": self.leaf_cate1,
                "cate1_name": [self.cate1_names[c] for c in self.leaf_cate1],
                "terms": [list(t) for t in self.leaf_terms],
                "attribute_slots": [[self.slot_names[s] for s in self.cate1_slots[c]] for c in self.leaf_cate1],
            }
        )

    def attribute_table(self) -> pa.Table:
        return pa.table(
            {
                "attr_value_id": np.arange(len(self.value_terms), dtype=np.int32),
                "slot": [self.slot_names[s] for s in self.value_slot],
                "term": self.value_terms,
            }
        )

    def brand_table(self) -> pa.Table:
        return pa.table(
            {
                "brand_id": np.arange(len(self.brand_names), dtype=np.int32),
                "name": self.brand_names,
                "cate1_ids": [np.flatnonzero(row).astype(np.int32) for row in self.brand_cate1],
                "popularity": self.brand_pop.astype(np.float32),
            }
        )

    def shop_table(self) -> pa.Table:
        return pa.table(
            {
                "shop_id": np.arange(len(self.shop_names), dtype=np.int32),
                "name": self.shop_names,
                "brand_ids": self.shop_brands,
            }
        )

    def item_tables(self, chunk_rows: int, title_synonym_rate: float) -> Iterator[pa.Table]:
        """The items table in chunks (titles are rendered per chunk to bound memory)."""
        for lo in range(0, self.n_items, chunk_rows):
            ids = np.arange(lo, min(lo + chunk_rows, self.n_items))
            titles, words = self._titles(ids, title_synonym_rate)
            attrs = self.item_slot_value[ids]
            yield pa.table(
                {
                    "item_id": ids.astype(np.int64),
                    "title": titles,
                    "title_words": words,
                    "leaf_id": self.item_leaf[ids],
                    "cate1_id": self.item_cate1[ids],
                    "brand_id": self.item_brand[ids],
                    "shop_id": self.item_shop[ids],
                    "price": self.item_price[ids],
                    "attr_value_ids": [row[row >= 0] for row in attrs],
                    "quality": self.item_quality[ids],
                    "popularity": (self.item_pop[ids] * self.n_items).astype(np.float32),
                    "discount": self.item_discount[ids],
                    "external_id": pa.nulls(len(ids), pa.string()),
                }
            )

    def _titles(self, ids: np.ndarray, synonym_rate: float) -> tuple[list[str], list[list[str]]]:
        """Keyword-stack titles: brand, attribute terms, head term or a synonym, stuffed terms, shuffled."""
        rnd = random.Random(self.seed * 1_000_003 + int(ids[0]))
        lex, titles, words = self.lex, [], []
        for i in ids:
            leaf_terms = self.leaf_terms[self.item_leaf[i]]
            leaf_term = rnd.choice(leaf_terms[1:]) if len(leaf_terms) > 1 and rnd.random() < synonym_rate \
                else leaf_terms[0]
            units = [self.brand_names[self.item_brand[i]], leaf_term]
            units += [self.value_terms[v] for v in self.item_slot_value[i] if v >= 0]
            stuffed = self.cate1_stuffed[self.item_cate1[i]]
            units += rnd.sample(stuffed, k=min(len(stuffed), rnd.randint(1, 3)))
            rnd.shuffle(units)
            titles.append(lex.joiner.join(units))
            words.append([w for u in units for w in lex.words(u)])
        return titles, words


class _BrandShops:
    """Which shops sell each brand, for uniform draws of a shop given a brand."""

    def __init__(self, shop_brands: list[list[int]], n_brands: int) -> None:
        pairs = np.array([(b, s) for s, bs in enumerate(shop_brands) for b in bs], dtype=np.int64)
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        self.shops = pairs[order, 1].astype(np.int32)
        self.count = np.bincount(pairs[:, 0], minlength=n_brands)
        self.start = np.cumsum(self.count) - self.count

    def sample(self, brands: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pick = (rng.random(len(brands)) * self.count[brands]).astype(np.int64)
        return self.shops[self.start[brands] + pick]


def _invent_names(n: int, lex: Lexicon, rng: np.random.Generator) -> list[str]:
    """Unique brand names from the lexicon's syllables: 2 per name, more when 2 would run out."""
    syl, names, seen = lex.brand_syllables, [], set()
    k = 2
    while len(syl) ** k < 2 * n:
        k += 1
    while len(names) < n:
        name = "".join(syl[j] for j in rng.integers(len(syl), size=k))
        name = name.capitalize() if lex.lang == "en" else name
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _shop_names(shop_brands: list[list[int]], brand_names: list[str], lex: Lexicon,
                rng: np.random.Generator) -> list[str]:
    """A shop is named after its first brand plus a suffix; a numbered suffix keeps names unique."""
    names, seen = [], set()
    for bs in shop_brands:
        base = lex.joiner.join([brand_names[bs[0]], lex.shop_suffixes[int(rng.integers(len(lex.shop_suffixes)))]])
        name, k = base, 2
        while name in seen:
            name, k = f"{base} {k}", k + 1
        seen.add(name)
        names.append(name)
    return names
