"""One day of a chunk of users: browsing, search sessions, result pages and the choice model.

Everything per event is vectorised with numpy over the whole chunk; only the rendering of query
strings (typos, truncations, word order) is a Python loop, once per query.

The generative story, with the config field that sets each strength:

* A session starts from an intent: a first-level category from today's mix (long-term preference,
  pulled towards a short-lived interest burst), a leaf in it, desired values for every attribute
  slot (the user's own taste with ``queries.own_taste_rate``) and sometimes a brand
  (``queries.brand_rate``, usually a favourite).
* The first query states a random subset of the desired attributes (``queries.attr_rate``); the rest
  stay hidden but still decide clicks. Follow-ups (``sessions.followup_rate``) state one more slot,
  and with ``sessions.short_followup_rate`` the follow-up is that term alone ("red"): ambiguous
  without the session's earlier queries and clicks.
* The result page mixes relevant items of the intent's leaf (``choice.relevant_share``), attractive
  off-intent items (popular or discounted, ``choice.attractive_share``) and filler from the category,
  in a noisy order (``choice.rank_noise``).
* An item at rank r is examined with probability 1/log2(r+2) and clicked with
  sigmoid(a*grade + b*brand + c*shop + d*price_fit + e*quality + f*discount + g*taste + bias + noise).
  A click is not relevance: discounted and favourite-brand items draw clicks off-intent.
* Buy after click depends on relevance, price fit and the long-term category preference; collect
  (favourite) on brand and attribute taste.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ray_mgdspr.config import ChoiceSignals, SimulateConfig
from ray_mgdspr.data.schema import TIMESTAMP
from ray_mgdspr.data.simulator.catalogue import Catalogue
from ray_mgdspr.data.simulator.relevance import grade_items
from ray_mgdspr.data.simulator.users import Users, sample_brands_in, sample_rows

SECONDS_PER_DAY = 86_400
QUERY_GAP_S = 120
BROWSE_CANDIDATES = 4


@dataclass
class ChunkOutput:
    behaviours: pa.Table
    search_events: pa.Table
    query_history: pa.Table
    stats: Counter


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _list_array(values: np.ndarray, mask: np.ndarray) -> pa.ListArray:
    """Row-wise ``values[mask]`` as a list column (row-major order is kept)."""
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[mask]))


@dataclass
class Taste:
    """Personal features of (event, candidate item) pairs, each (E, C)."""

    brand: np.ndarray
    shop: np.ndarray
    price_fit: np.ndarray
    attrs: np.ndarray
    long_term: np.ndarray

    @classmethod
    def of(cls, cat: Catalogue, users: Users, who: np.ndarray, items: np.ndarray,
           desired: np.ndarray, extra_brand: np.ndarray | None = None) -> Taste:
        """``desired``: (E, S) wanted attribute value per slot; ``extra_brand``: (E,) a brand wanted now."""
        brand_of = cat.item_brand[items]
        brand = (brand_of[..., None] == users.fav_brands[who][:, None, :]).any(-1)
        if extra_brand is not None:
            brand |= brand_of == extra_brand[:, None]
        shop = (cat.item_shop[items][..., None] == users.fav_shops[who][:, None, :]).any(-1)
        price_fit = -np.abs(cat.item_price_z[items] - users.price_pref[who][:, None])
        sv = cat.item_slot_value[items]  # (E, C, S)
        has = sv >= 0
        attrs = ((sv == desired[:, None, :]) & has).sum(-1) / np.maximum(has.sum(-1), 1)
        pref = users.cate1_pref[who[:, None], cat.item_cate1[items]]
        long_term = np.clip(np.log(pref * cat.n_cate1 + 1e-9), -3.0, 2.0)
        return cls(brand.astype(np.float64), shop.astype(np.float64), price_fit, attrs, long_term)

    def take(self, pick: np.ndarray) -> Taste:
        """The features of the columns ``pick`` (E, P) of each row."""
        return Taste(*(np.take_along_axis(getattr(self, f), pick, axis=1)
                       for f in ("brand", "shop", "price_fit", "attrs", "long_term")))

    def affinity(self, ch: ChoiceSignals) -> np.ndarray:
        """The personal part of the click logit: brand, shop, price fit and attribute taste (E, C)."""
        return ch.b_brand * self.brand + ch.c_shop * self.shop + ch.d_price * self.price_fit + ch.g_taste * self.attrs


def examination(valid: np.ndarray) -> np.ndarray:
    """P(the user looks at each shown item): position bias 1/log2(r + 2) at shown rank r (E, P)."""
    return np.where(valid, 1.0 / np.log2(np.cumsum(valid, axis=1) + 1), 0.0)


def click_probability(cat: Catalogue, ch: ChoiceSignals, page: np.ndarray, grade: np.ndarray, taste: Taste,
                      noise: np.ndarray | float = 0.0) -> np.ndarray:
    """P(click | examined) of each page item (E, P): the choice model's sigmoid; on irrelevant (grade 0) items
    ``click_noise`` multiplies the odds (0: never clicked, 1: the choice model as is)."""
    with np.errstate(divide="ignore"):  # click_noise 0: log 0 = -inf, P = 0
        log_odds = np.log(ch.click_noise) if ch.click_noise != 1 else 0.0
    logit = (ch.a_relevance * grade + taste.affinity(ch) + ch.e_quality * cat.item_quality[page]
             + ch.f_discount * cat.item_discount[page] + ch.bias + noise + np.where(grade == 0, log_odds, 0.0))
    return _sigmoid(logit)


class DaySimulator:
    """Simulates one day for chunks of users; holds the config, catalogue and users."""

    def __init__(self, cfg: SimulateConfig, cat: Catalogue, users: Users) -> None:
        self.cfg, self.cat, self.users = cfg, cat, users

    def run(self, day: int, chunk: int, who: np.ndarray, day_start_s: int, id_base: int) -> ChunkOutput:
        """Simulate ``day`` for users ``who``. Ids of events/sessions start at ``id_base``."""
        rng = np.random.default_rng([self.cfg.seed, 4, day + 100_000, chunk])
        rnd = random.Random(f"{self.cfg.seed}/{day}/{chunk}")
        stats: Counter = Counter()
        mix = self.users.daily_mix(self.cfg, who)
        browse = self._browse(who, mix, rng, stats)
        search, events, history = self._search(who, mix, day, id_base, rng, rnd, stats)
        behaviours = pa.concat_tables([browse, search])
        order = np.lexsort((behaviours["ts"].to_numpy(), behaviours["user_id"].to_numpy()))
        behaviours = behaviours.take(order)

        def stamp(t: pa.Table) -> pa.Table:
            ms = pa.array((t["ts"].to_numpy() + day_start_s) * 1000, pa.int64()).cast(TIMESTAMP)
            t = t.set_column(t.schema.get_field_index("ts"), "ts", ms)
            return t.append_column("day", pa.array(np.full(t.num_rows, day, np.int16)))

        stats["behaviours"] += behaviours.num_rows
        return ChunkOutput(stamp(behaviours), stamp(events), stamp(history), stats)

    # ------------------------------------------------------------------------------------ browsing

    def _browse(self, who: np.ndarray, mix: np.ndarray, rng: np.random.Generator, stats: Counter) -> pa.Table:
        """Clicks outside search: a category from today's mix, the most appealing of a few items."""
        cfg, cat = self.cfg, self.cat
        n = rng.poisson(self.users.activity[who] * cfg.browses_per_day)
        u = np.repeat(who, n)
        cate1 = sample_rows(np.repeat(mix, n, axis=0), rng)
        cand = cat.by_cate1.sample(np.repeat(cate1, BROWSE_CANDIDATES).reshape(-1, BROWSE_CANDIDATES), rng)
        taste = Taste.of(cat, self.users, u, cand, self.users.taste[u])
        ch = cfg.choice
        utility = taste.affinity(ch) + rng.gumbel(size=cand.shape)
        pick = utility.argmax(axis=1)[:, None]
        items = np.take_along_axis(cand, pick, axis=1)[:, 0]
        one = lambda a: np.take_along_axis(a, pick, axis=1)[:, 0]  # noqa: E731
        ts = rng.integers(0, SECONDS_PER_DAY - 600, len(items))
        stats["browse_clicks"] += len(items)
        buy = rng.random(len(items)) < _sigmoid(
            ch.buy_bias - 1.0 + ch.buy_price * one(taste.price_fit) + ch.buy_long_term * one(taste.long_term))
        collect = rng.random(len(items)) < _sigmoid(
            ch.collect_bias + ch.collect_taste * (one(taste.brand) + one(taste.attrs)))
        return self._actions(u, items, ts, None, buy, collect, "browse")

    def _actions(self, u: np.ndarray, items: np.ndarray, click_ts: np.ndarray, event: np.ndarray | None,
                 buy: np.ndarray, collect: np.ndarray, source: str) -> pa.Table:
        """Behaviour rows: a click for each item, then a buy and/or a collect where they happened."""
        def rows(sel: np.ndarray, action: str, delay: int) -> dict:
            return {
                "user_id": u[sel].astype(np.int64),
                "item_id": items[sel].astype(np.int64),
                "action": np.full(int(sel.sum()), action, dtype=object),
                "ts": click_ts[sel] + delay,
                "event_id": None if event is None else event[sel],
            }

        parts = [rows(np.ones(len(items), bool), "click", 0), rows(buy, "buy", 90), rows(collect, "collect", 20)]
        cols = {k: np.concatenate([p[k] for p in parts]) for k in ("user_id", "item_id", "action", "ts")}
        n = len(cols["ts"])
        ev = pa.nulls(n, pa.int64()) if event is None else pa.array(np.concatenate([p["event_id"] for p in parts]))
        return pa.table({
            "user_id": cols["user_id"], "item_id": cols["item_id"], "action": pa.array(cols["action"], pa.string()),
            "source": pa.array(np.full(n, source, dtype=object), pa.string()), "ts": cols["ts"].astype(np.int64),
            "event_id": ev,
        })

    # ------------------------------------------------------------------------------------ search

    def _search(self, who: np.ndarray, mix: np.ndarray, day: int, id_base: int, rng: np.random.Generator,
                rnd: random.Random, stats: Counter) -> tuple[pa.Table, pa.Table, pa.Table]:
        cfg, cat, users = self.cfg, self.cat, self.users
        qs, ss = cfg.queries, cfg.sessions
        # sessions and their intents
        n_sess = rng.poisson(users.activity[who] * cfg.searches_per_day)
        su = np.repeat(who, n_sess)
        n_s = len(su)
        cate1 = sample_rows(np.repeat(mix, n_sess, axis=0), rng)
        leaf = cat.leaves_by_cate1.sample(cate1, rng)
        applicable = cat.cate1_slot_mask[cate1]  # (S, slots)
        popular = np.stack([rng.choice(ids, size=n_s, p=cat.value_weight[ids] / cat.value_weight[ids].sum())
                            for ids in cat.slot_value_ids], axis=1)
        desired = np.where(rng.random(popular.shape) < qs.own_taste_rate, users.taste[su], popular)
        desired = np.where(applicable, desired, -1)
        brand = self._intent_brand(su, cate1, rng)
        # slot order in which the session's queries state attributes
        keys = np.where(applicable, rng.random(applicable.shape), 2.0)
        rank = keys.argsort(axis=1).argsort(axis=1)
        n_first = (keys < qs.attr_rate).sum(axis=1)
        n_q = np.minimum(rng.geometric(1.0 - ss.followup_rate, n_s), ss.max_queries)
        session_start = rng.integers(0, SECONDS_PER_DAY - QUERY_GAP_S * (ss.max_queries + 2), n_s)

        # queries
        s_of = np.repeat(np.arange(n_s), n_q)
        k = np.arange(len(s_of)) - np.repeat(np.cumsum(n_q) - n_q, n_q)
        n_q_total = len(s_of)
        stated = applicable[s_of] & (rank[s_of] < (n_first[s_of] + k)[:, None])
        added = applicable[s_of] & (rank[s_of] == (n_first[s_of] + k - 1)[:, None]) & (k[:, None] > 0)
        intent_values = np.where(stated, desired[s_of], -1)
        intent_brand = brand[s_of]
        short = (k > 0) & added.any(axis=1) & (rng.random(n_q_total) < ss.short_followup_rate)
        partial = (k == 0) & (stated.any(axis=1) | (intent_brand >= 0)) & (rng.random(n_q_total) < qs.partial_rate)
        texts, words = self._render(leaf[s_of], intent_brand, intent_values, np.where(added, desired[s_of], -1),
                                    short, partial, rnd, stats)
        q_user = su[s_of]
        q_ts = session_start[s_of] + QUERY_GAP_S * k + rng.integers(0, 30, n_q_total)
        event_id = id_base + np.arange(n_q_total, dtype=np.int64)
        stats.update(searches=n_q_total, sessions=n_s, followups=int((k > 0).sum()),
                     short_followups=int(short.sum()), partial_queries=int(partial.sum()))

        # result pages and choices
        page, valid, grade, taste = self.pages(leaf[s_of], cate1[s_of], intent_brand, intent_values, q_user,
                                               desired[s_of], rng)
        click, buy, collect = self._choose(page, valid, grade, taste, rng)
        rank_pos = np.cumsum(valid, axis=1) - 1
        click_ts = q_ts[:, None] + 5 + 3 * rank_pos + rng.integers(0, 3, page.shape)
        for g in (0, 1, 2):
            stats[f"impressions_grade{g}"] += int((valid & (grade == g)).sum())
            stats[f"clicks_grade{g}"] += int((click & (grade == g)).sum())
        stats.update(clicks=int(click.sum()), buys=int(buy.sum()), collects=int(collect.sum()))

        rows_q = np.broadcast_to(np.arange(n_q_total)[:, None], page.shape)
        sel = click.ravel()
        behaviours = self._actions(q_user[rows_q.ravel()][sel], page.ravel()[sel], click_ts.ravel()[sel],
                                   event_id[rows_q.ravel()][sel] if day >= 1 else None,
                                   buy.ravel()[sel], collect.ravel()[sel], "search")
        words_col = pa.array(words, pa.list_(pa.string()))
        history = pa.table({"user_id": q_user.astype(np.int64), "ts": q_ts.astype(np.int64),
                            "query": pa.array(texts, pa.string()), "query_words": words_col})
        events = pa.table({
            "event_id": event_id,
            "user_id": q_user.astype(np.int64),
            "session_id": (id_base + s_of).astype(np.int64),
            "ts": q_ts.astype(np.int64),
            "query": pa.array(texts, pa.string()),
            "query_words": words_col,
            "intent_leaf_id": leaf[s_of].astype(np.int32),
            "intent_brand_id": intent_brand.astype(np.int32),
            "intent_attr_value_ids": _list_array(intent_values.astype(np.int32), intent_values >= 0),
            "is_followup": k > 0,
            "impressed_item_ids": _list_array(page.astype(np.int64), valid),
            "clicked_item_ids": _list_array(page.astype(np.int64), click),
            "bought_item_ids": _list_array(page.astype(np.int64), buy),
            "collected_item_ids": _list_array(page.astype(np.int64), collect),
        })
        order = np.lexsort((q_ts, q_user))
        events = events.take(order) if day >= 1 else events.slice(0, 0)  # warm-up days feed histories only
        return behaviours, events, history.take(order)

    def _intent_brand(self, su: np.ndarray, cate1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """-1, or the brand a session asks for: usually a favourite that sells in the category."""
        qs, cat = self.cfg.queries, self.cat
        fav = self.users.fav_brands[su, rng.integers(self.users.fav_brands.shape[1], size=len(su))]
        fav_ok = cat.brand_cate1[fav, cate1] & (rng.random(len(su)) < qs.favourite_brand_rate)
        brand = np.where(fav_ok, fav, sample_brands_in(cat, cate1, rng))
        return np.where(rng.random(len(su)) < qs.brand_rate, brand, -1)

    def pages(self, leaf: np.ndarray, cate1: np.ndarray, brand: np.ndarray, values: np.ndarray, who: np.ndarray,
              desired: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, Taste]:
        """Result pages (Q, P) of the logging engine: item ids in shown order, a validity mask (duplicates removed),
        grades, and the searching users' taste features of each page item.

        The engine scores candidates by relevance, popularity and, with ``choice.page_personalisation``, the
        searching user's affinity (the click model's brand, shop, price and taste terms), as a personalised engine
        does; 0 builds pages without the user.
        """
        cat, ch = self.cat, self.cfg.choice
        p = ch.page_size
        n_rel = round(p * ch.relevant_share)
        n_attr = round(p * ch.attractive_share)
        sizes = (n_rel, n_attr, p - n_rel - n_attr)
        groups = [
            cat.by_leaf.sample(np.repeat(leaf, ch.candidates * sizes[0]).reshape(-1, ch.candidates * sizes[0]), rng),
            cat.attractive_by_cate1.sample(np.repeat(cate1, 2 * sizes[1]).reshape(-1, 2 * sizes[1]), rng),
            cat.by_cate1.sample(np.repeat(cate1, 2 * sizes[2]).reshape(-1, 2 * sizes[2]), rng),
        ]
        cand = np.concatenate(groups, axis=1)
        grade = grade_items(cat.item_leaf, cat.item_brand, cat.item_slot_value, leaf, brand, values, cand)
        taste = Taste.of(cat, self.users, who, cand, desired, extra_brand=brand)
        # the engine: relevance first, popularity next, the user's affinity, noise on top
        score = (1.5 * grade + 0.3 * np.log(cat.item_pop[cand] * cat.n_items)
                 + ch.page_personalisation * taste.affinity(ch) + rng.normal(0, ch.rank_noise, cand.shape))
        score[_duplicates(cand) | (cand < 0)] = -np.inf
        chosen, lo = [], 0
        for g, size in zip(groups, sizes, strict=True):
            block = score[:, lo:lo + g.shape[1]]
            chosen.append(lo + np.argsort(-block, axis=1, kind="stable")[:, :size])
            lo += g.shape[1]
        pick = np.concatenate(chosen, axis=1)
        page_score = np.take_along_axis(score, pick, axis=1)
        order = np.argsort(-page_score, axis=1, kind="stable")
        pick = np.take_along_axis(pick, order, axis=1)
        page = np.take_along_axis(cand, pick, axis=1)
        valid = np.isfinite(np.take_along_axis(score, pick, axis=1))
        return page, valid, np.take_along_axis(grade, pick, axis=1), taste.take(pick)

    def _choose(self, page: np.ndarray, valid: np.ndarray, grade: np.ndarray, taste: Taste,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clicks (position bias x choice model), then buys and collects among the clicks."""
        ch = self.cfg.choice
        examined = rng.random(page.shape) < examination(valid)
        p = click_probability(self.cat, ch, page, grade, taste, rng.normal(0, ch.noise, page.shape))
        click = valid & examined & (rng.random(page.shape) < p)
        buy = click & (rng.random(page.shape) < _sigmoid(
            ch.buy_bias + ch.buy_relevance * grade + ch.buy_price * taste.price_fit
            + ch.buy_long_term * taste.long_term))
        collect = click & (rng.random(page.shape) < _sigmoid(
            ch.collect_bias + ch.collect_taste * (taste.brand + taste.attrs)))
        return click, buy, collect

    # ------------------------------------------------------------------------------------ wording

    def _render(self, leaf: np.ndarray, brand: np.ndarray, values: np.ndarray, added: np.ndarray,
                short: np.ndarray, partial: np.ndarray, rnd: random.Random,
                stats: Counter) -> tuple[list[str], list[list[str]]]:
        """Query strings and their typed words, from intents, with synonyms, shuffles, typos, truncations."""
        cat, qs = self.cat, self.cfg.queries
        lex = cat.lex
        texts, words_out = [], []
        for q in range(len(leaf)):
            if short[q]:
                terms = [cat.value_terms[v] for v in added[q] if v >= 0]
            else:
                terms = [] if brand[q] < 0 else [cat.brand_names[brand[q]]]
                terms += [cat.value_terms[v] for v in values[q] if v >= 0]
                if not partial[q]:
                    leaf_terms = cat.leaf_terms[leaf[q]]
                    synonym = len(leaf_terms) > 1 and rnd.random() < qs.synonym_rate
                    terms.append(rnd.choice(leaf_terms[1:]) if synonym else leaf_terms[0])
            if len(terms) > 1 and rnd.random() < qs.shuffle_rate:
                rnd.shuffle(terms)
            words = []
            for w in (w for t in terms for w in lex.words(t)):
                r = rnd.random()
                if r < qs.typo_rate and len(w) > 1:
                    w = _typo(w, rnd)
                    stats["typo_words"] += 1
                elif r < qs.typo_rate + qs.truncate_rate and len(w) > (3 if lex.lang == "en" else 1):
                    w = w[: max(1 if lex.lang == "zh" else 3, int(len(w) * 0.6))]
                    stats["truncated_words"] += 1
                words.append(w)
            stats["query_words"] += len(words)
            sep = " " if lex.lang == "en" or rnd.random() < qs.zh_space_rate else ""
            texts.append(sep.join(words))
            words_out.append(words)
        return texts, words_out


def _typo(w: str, rnd: random.Random) -> str:
    i = rnd.randrange(len(w) - 1)
    kind = rnd.randrange(3)
    if kind == 0:  # swap two neighbours
        return w[:i] + w[i + 1] + w[i] + w[i + 2:]
    if kind == 1:  # drop one
        return w[:i] + w[i + 1:]
    return w[: i + 1] + w[i] + w[i + 1:]  # double one


def _duplicates(a: np.ndarray) -> np.ndarray:
    """True where a row already holds the same value in an earlier column."""
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    dup_sorted = np.zeros_like(a, dtype=bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    out = np.zeros_like(dup_sorted)
    np.put_along_axis(out, order, dup_sorted, axis=1)
    return out
