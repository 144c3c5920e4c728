"""The featurizer on real simulated worlds (synthetic): the output contract, windows against a brute-force
reference, no leakage from the future, positives, tokenization, missing data and throughput."""

from __future__ import annotations

import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_mgdspr.config import FeatureConfig
from ray_mgdspr.data.features import DAY_MS, LONG_ACTIONS, MISSING, Featurizer, ItemPopularity, PriceLevels
from ray_mgdspr.data.vocab import PAD, Vocabulary
from ray_mgdspr.data.world import read_manifest, read_table

CFG = FeatureConfig()
TINY = FeatureConfig(query_chars_kept=6, query_bigrams_kept=5, query_words_kept=3, title_words_kept=4, his_queries=3,
                     realtime_len=5, short_len=7, long_len=4, short_days=1.5, long_days=4.0)
"""Short sequences and windows, so that every truncation and window edge is hit often."""
SIDE = ("shop", "leaf", "cate1", "brand", "price")
LONG_SIDE = ("shop", "leaf", "brand", "price")
POISON = 987_654_321


def contract_keys(with_item: bool) -> dict[str, tuple[int, ...]]:
    """Every output key and its shape after the batch dimension."""
    c = CFG
    keys: dict[str, tuple[int, ...]] = {
        "user_id": (), "ts": (), "event_id": (), "query_chars": (c.query_chars_kept,),
        "query_bigrams": (c.query_bigrams_kept,), "query_words": (c.query_words_kept,),
        "his_query_words": (c.his_queries, c.query_words_kept),
    }
    for f in ("item", *SIDE):
        keys[f"rt_{f}"] = (c.realtime_len,)
        keys[f"st_{f}"] = (c.short_len,)
    for f in ("item", *LONG_SIDE):
        keys[f"lt_{f}"] = (3, c.long_len)
    if with_item:
        keys.update(item_id=(), item_title=(c.title_words_kept,), **{f"item_{f}": () for f in SIDE},
                    item_impressions=(), item_clicks=())
    return keys


@pytest.fixture(scope="module")
def feat_en(world_en: Path, vocab_en: Vocabulary) -> Featurizer:
    return Featurizer(world_en, vocab_en, CFG)


@pytest.fixture(scope="module")
def train_en(feat_en: Featurizer) -> pa.Table:
    return feat_en.examples(read_manifest(feat_en.world).train_days)


def as_numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A Ray Data numpy batch: list columns are object arrays of numpy arrays."""
    out = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_list(col.type):
            out[name] = np.empty(len(col), dtype=object)
            out[name][:] = [np.array(v, dtype=object) for v in col.to_pylist()]
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def padded(values: list[int], width: int, pad: int) -> list[int]:
    return (values + [pad] * width)[:width]


# ------------------------------------------------------------------------------------ contract


def test_example_batches_follow_the_contract(feat_en: Featurizer, train_en: pa.Table) -> None:
    batch = train_en.slice(0, 64)
    out = feat_en(batch)
    want = contract_keys(with_item=True)
    assert set(out) == set(want)
    for key, shape in want.items():
        assert out[key].dtype == np.int64, key
        assert out[key].shape == (64, *shape), key
    assert out["event_id"].tolist() == batch["event_id"].to_pylist()
    assert out["item_id"].tolist() == batch["item_id"].to_pylist()
    assert out["ts"].tolist() == batch["ts"].to_pylist()


def test_numpy_batches_give_the_same_features_as_tables(feat_en: Featurizer, train_en: pa.Table) -> None:
    batch = train_en.slice(100, 50)
    expected = feat_en(batch)
    for got in (feat_en(as_numpy_batch(batch)), feat_en(batch.combine_chunks().to_batches()[0])):
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    two_words = batch.filter(pc.equal(pc.list_value_length(batch["query_words"]), 2))
    dense = as_numpy_batch(two_words)
    dense["query_words"] = np.array([list(w) for w in dense["query_words"]], dtype=object)  # Ray's 2-D form
    assert dense["query_words"].ndim == 2
    np.testing.assert_array_equal(feat_en(dense)["query_words"], feat_en(two_words)["query_words"])


def test_serving_requests_without_item_event_or_words(feat_en: Featurizer, train_en: pa.Table) -> None:
    rows = train_en.slice(0, 20)
    ts = rows["ts"].to_numpy().astype("datetime64[ms]")  # a timestamp column works as well as epoch ms
    request = {"user_id": rows["user_id"].to_numpy(), "ts": ts,
               "query": np.array(rows["query"].to_pylist(), dtype=object)}
    out = feat_en(request)
    want = contract_keys(with_item=False)
    assert set(out) == set(want)
    for key, shape in want.items():
        assert out[key].dtype == np.int64 and out[key].shape == (20, *shape), key
    assert (out["event_id"] == -1).all()
    assert out["ts"].tolist() == rows["ts"].to_pylist()
    logged = feat_en(rows)
    for key in want:
        if key not in ("event_id", "query_words"):
            np.testing.assert_array_equal(out[key], logged[key], err_msg=key)
    tok, vocab = feat_en.vocab.tokenizer(), feat_en.vocab
    for q, row in zip(request["query"], out["query_words"], strict=True):
        assert row.tolist() == padded(vocab.encode_one("words", tok.words(q)), CFG.query_words_kept, PAD)


# ----------------------------------------------------------------------------- brute force


class Reference:
    """The contract written as plain Python loops over the world's tables."""

    def __init__(self, world: Path, vocab: Vocabulary) -> None:
        self.vocab = vocab
        items = read_table(world, "items").to_pylist()
        self.side = {r["item_id"]: {s: -1 if r[f"{s}_id"] is None else r[f"{s}_id"] for s in SIDE if s != "price"}
                     for r in items}
        prices: dict[int, list[float]] = defaultdict(list)
        for r in items:
            if r["leaf_id"] is not None and r["price"] is not None:
                prices[r["leaf_id"]].append(r["price"])
        for r in items:  # the price level: how many of the leaf's 9 decile edges lie below the price
            ps = sorted(prices.get(r["leaf_id"], []))
            edges = [ps[max(j * len(ps) // 10 - 1, 0)] for j in range(1, 10)] if ps else []
            level = sum(e < r["price"] for e in edges) if edges and r["price"] is not None else -1
            self.side[r["item_id"]]["price"] = level
        self.behaviours: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
        b = read_table(world, "behaviours")
        ts = b["ts"].cast(pa.int64()).to_pylist()
        for u, t, a, i in zip(b["user_id"].to_pylist(), ts, b["action"].to_pylist(), b["item_id"].to_pylist(),
                              strict=True):
            self.behaviours[u].append((t, a, i))
        self.queries: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)
        q = read_table(world, "query_history")
        for u, t, w in zip(q["user_id"].to_pylist(), q["ts"].cast(pa.int64()).to_pylist(),
                           q["query_words"].to_pylist(), strict=True):
            self.queries[u].append((t, w))
        for per_user in (*self.behaviours.values(), *self.queries.values()):
            per_user.sort(key=lambda r: r[0])  # stable: ties keep file order

    def row(self, user: int, ts: int, c: FeatureConfig) -> dict[str, list]:
        short, long = round(c.short_days * DAY_MS), round(c.long_days * DAY_MS)
        mine = self.behaviours.get(user, [])
        clicks = [(t, i) for t, a, i in mine if a == "click" and t < ts]
        rt = clicks[-c.realtime_len:]
        older = clicks[: len(clicks) - len(rt)]
        st = [(t, i) for t, i in older if t >= ts - short][-c.short_len:]
        out = self._sequence("rt", [i for _, i in rt], c.realtime_len, ("item", *SIDE))
        out.update(self._sequence("st", [i for _, i in st], c.short_len, ("item", *SIDE)))
        per_action = []
        for action in LONG_ACTIONS:
            items = [i for t, a, i in mine if a == action and ts - long <= t < ts - short][-c.long_len:]
            per_action.append(self._sequence("lt", items, c.long_len, ("item", *LONG_SIDE)))
        out.update({k: [p[k] for p in per_action] for k in per_action[0]})
        earlier = [w for t, w in self.queries.get(user, []) if t < ts][-c.his_queries:][::-1] if c.his_queries else []
        his = [padded(self.vocab.encode_one("words", [x.lower() for x in w]), c.query_words_kept, PAD) for w in earlier]
        out["his_query_words"] = his + [[PAD] * c.query_words_kept] * (c.his_queries - len(his))
        return out

    def _sequence(self, prefix: str, items: list[int], width: int, fields: tuple[str, ...]) -> dict[str, list]:
        out = {f"{prefix}_item": padded(items, width, -1)}
        for f in fields[1:]:
            out[f"{prefix}_{f}"] = padded([self.side[i][f] for i in items], width, -1)
        return out


@pytest.fixture(scope="module")
def reference_en(world_en: Path, vocab_en: Vocabulary) -> Reference:
    return Reference(world_en, vocab_en)


def sample_rows(train: pa.Table, test: pa.Table, n: int) -> pa.Table:
    """Random rows of train and test days plus the rows of the most active user."""
    rng = np.random.default_rng(0)
    busiest = np.bincount(train["user_id"].to_numpy()).argmax()
    parts = [train.take(rng.choice(train.num_rows, n, replace=False)),
             test.take(rng.choice(test.num_rows, n // 2, replace=False)),
             train.filter(pc.equal(train["user_id"], busiest)).slice(0, n // 2)]
    return pa.concat_tables([p.select(["user_id", "ts", "query", "query_words"]) for p in parts])


def edge_rows(world: Path, config: FeatureConfig) -> pa.Table:
    """Requests at the window edges of some behaviours: at their ts, short_days and long_days later, and 1 ms after."""
    b = read_table(world, "behaviours", days=[-2, 3])
    picked = b.take(np.random.default_rng(1).choice(b.num_rows, 15, replace=False))
    user, ts = picked["user_id"].to_numpy(), picked["ts"].cast(pa.int64()).to_numpy()
    short, long = round(config.short_days * DAY_MS), round(config.long_days * DAY_MS)
    shifts = [0, 1, short, short + 1, long, long + 1]
    n = len(user) * len(shifts)
    return pa.table({"user_id": np.tile(user, len(shifts)), "ts": np.concatenate([ts + s for s in shifts]),
                     "query": ["red tee"] * n, "query_words": [["red", "tee"]] * n})


@pytest.mark.parametrize("config", [CFG, TINY], ids=["paper", "tiny"])
def test_sequences_and_history_queries_match_a_brute_force_reference(
        world_en: Path, vocab_en: Vocabulary, train_en: pa.Table, reference_en: Reference,
        config: FeatureConfig) -> None:
    feat = Featurizer(world_en, vocab_en, config)
    rows = pa.concat_tables([sample_rows(train_en, feat.events(read_manifest(world_en).test_days), 60),
                             edge_rows(world_en, config)], promote_options="permissive")
    out = feat(rows)
    nonempty: dict[str, int] = defaultdict(int)
    for r, (user, ts) in enumerate(zip(rows["user_id"].to_pylist(), rows["ts"].to_pylist(), strict=True)):
        want = reference_en.row(user, ts, config)
        for key, value in want.items():
            assert out[key][r].tolist() == value, (key, user, ts)
            nonempty[key] += int((np.asarray(value) > 0).any())
    assert min(nonempty.values()) > 0, nonempty  # every sequence and action is exercised by some row
    if config is TINY:  # windows are full, so truncation is exercised too
        assert (out["rt_item"] >= 0).all(axis=1).sum() > 30 and (out["st_item"] >= 0).all(axis=1).any()
        assert (out["his_query_words"][:, :, 0] > 0).all(axis=1).sum() > 30


def test_nothing_at_or_after_the_request_time_is_used(world_en: Path, vocab_en: Vocabulary,
                                                      tmp_path: Path) -> None:
    """A copy of the world whose behaviours and queries from time T on are poisoned gives the same features at T."""
    b = read_table(world_en, "behaviours", days=[4])
    cut = int(b.filter(pc.equal(b["action"], "click"))["ts"].cast(pa.int64())[100].as_py())
    poisoned = tmp_path / "poisoned"
    shutil.copytree(world_en, poisoned)
    for path in (poisoned / "behaviours").glob("*.parquet"):
        t = pq.read_table(path)
        future = t["ts"].cast(pa.int64()).to_numpy() >= cut
        t = t.set_column(t.schema.get_field_index("item_id"), t.schema.field("item_id"),
                         pa.array(np.where(future, POISON, t["item_id"].to_numpy())))
        pq.write_table(t, path)
    for path in (poisoned / "query_history").glob("*.parquet"):
        t = pq.read_table(path)
        future = t["ts"].cast(pa.int64()).to_numpy() >= cut
        words = [["poisonword"] if f else w for f, w in zip(future, t["query_words"].to_pylist(), strict=True)]
        t = t.set_column(t.schema.get_field_index("query_words"), t.schema.field("query_words"),
                         pa.array(words, t.schema.field("query_words").type))
        pq.write_table(t, path)
    users = np.arange(300, dtype=np.int64)
    poison_id = vocab_en.encode_one("words", ["poisonword"])[0]

    def request(ts: int) -> dict[str, np.ndarray]:
        return {"user_id": users, "ts": np.full(len(users), ts), "query": np.array(["red tee"] * len(users))}

    clean, dirty = Featurizer(world_en, vocab_en, TINY), Featurizer(poisoned, vocab_en, TINY)
    at_cut = dirty(request(cut))
    for key, value in clean(request(cut)).items():
        np.testing.assert_array_equal(at_cut[key], value, err_msg=key)
    assert not any((at_cut[k] == POISON).any() for k in at_cut if k.endswith("_item"))
    assert not (at_cut["his_query_words"] == poison_id).any()
    assert (dirty(request(cut + 1))["rt_item"] == POISON).any()  # the click at T is seen one millisecond later
    assert (dirty(request(cut + DAY_MS))["his_query_words"] == poison_id).any()


# --------------------------------------------------------------------------------- positives


def expected_positives(world: Path, days: list[int]) -> dict[int, list[int]]:
    out = {}
    for e in read_table(world, "search_events", days=days).to_pylist():
        positives = list(dict.fromkeys(e["clicked_item_ids"] + e["bought_item_ids"]))
        if positives:
            out[e["event_id"]] = positives
    return out


def test_examples_are_one_row_per_event_and_positive(world_en: Path, feat_en: Featurizer,
                                                     train_en: pa.Table) -> None:
    m = read_manifest(world_en)
    assert train_en.schema.names == ["event_id", "user_id", "ts", "query", "query_words", "item_id"]
    assert [train_en.schema.field(n).type for n in ("event_id", "user_id", "ts", "item_id")] == [pa.int64()] * 4
    got: dict[int, list[int]] = defaultdict(list)
    for e, i in zip(train_en["event_id"].to_pylist(), train_en["item_id"].to_pylist(), strict=True):
        got[e].append(i)
    assert got == expected_positives(world_en, m.train_days)
    assert feat_en.examples(m.train_days).equals(train_en)  # deterministic
    events = read_table(world_en, "search_events", days=m.train_days)
    ts = dict(zip(events["event_id"].to_pylist(), events["ts"].cast(pa.int64()).to_pylist(), strict=True))
    assert all(ts[e] == t for e, t in zip(train_en["event_id"].to_pylist(), train_en["ts"].to_pylist(), strict=True))


def test_evaluation_events_hold_the_test_day_targets(world_en: Path, feat_en: Featurizer) -> None:
    m = read_manifest(world_en)
    test = feat_en.events(m.test_days)
    assert test.schema.names == ["event_id", "user_id", "ts", "query", "query_words", "target_item_ids"]
    assert test.schema.field("target_item_ids").type == pa.list_(pa.int64())
    got = dict(zip(test["event_id"].to_pylist(), test["target_item_ids"].to_pylist(), strict=True))
    assert got == expected_positives(world_en, m.test_days) and len(got) == test.num_rows
    train_ids = set(read_table(world_en, "search_events", days=m.train_days)["event_id"].to_pylist())
    assert not train_ids & set(got)
    first_test_ms = int(m.day_start(m.test_days[0]).timestamp() * 1000)
    assert min(test["ts"].to_pylist()) >= first_test_ms
    out = feat_en(test.slice(0, 10))
    assert "item_id" not in out and out["rt_item"].shape == (10, CFG.realtime_len)


def test_a_featurizer_of_a_few_users_gives_their_rows_the_same_features(world_en: Path, vocab_en: Vocabulary,
                                                                        feat_en: Featurizer) -> None:
    """``for_users`` (held-out evaluation) reads only those users' histories, yet featurizes their rows exactly as a
    featurizer holding every user's does; other users' rows get no history."""
    m = read_manifest(world_en)
    test = feat_en.events(m.test_days)
    rows = test.take(pa.array(np.arange(0, test.num_rows, max(1, test.num_rows // 40))))
    few = Featurizer(world_en, vocab_en, CFG, history_days=[]).for_users(rows["user_id"].to_numpy())
    want, got = feat_en(rows), few(rows)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (want["rt_item"] != MISSING).any()  # the sample has histories to compare
    others = test.filter(pc.invert(pc.is_in(test["user_id"], rows["user_id"]))).slice(0, 20)
    assert (feat_en(others)["rt_item"] != MISSING).any() and (few(others)["rt_item"] == MISSING).all()


# ------------------------------------------------------------------------------ query tokens


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_query_tokens_are_the_tokenizers_encoded(lang: str, request: pytest.FixtureRequest) -> None:
    world: Path = request.getfixturevalue(f"world_{lang}")
    vocab: Vocabulary = request.getfixturevalue(f"vocab_{lang}")
    feat = Featurizer(world, vocab, TINY)
    rows = feat.examples([1]).slice(0, 80)
    out, tok = feat(rows), vocab.tokenizer()
    for r, (q, words) in enumerate(zip(rows["query"].to_pylist(), rows["query_words"].to_pylist(), strict=True)):
        assert out["query_chars"][r].tolist() == padded(vocab.encode_one("chars", tok.chars(q)), 6, PAD)
        assert out["query_bigrams"][r].tolist() == padded(vocab.encode_one("bigrams", tok.bigrams(q)), 5, PAD)
        assert out["query_words"][r].tolist() == padded(vocab.encode_one("words", [w.lower() for w in words]), 3, PAD)
    assert (out["query_chars"][:, 0] > 0).all() and (out["query_words"][:, 0] > 0).all()


def test_item_features_encode_titles_and_unknown_items_are_pad(world_en: Path, feat_en: Featurizer) -> None:
    items = read_table(world_en, "items").slice(0, 30)
    ids = np.concatenate([items["item_id"].to_numpy()[::-1], [10**12]])
    out = feat_en.items(ids)
    assert out["item_id"].tolist() == ids.tolist() and out["item_title"].dtype == np.int64
    titles = dict(zip(items["item_id"].to_pylist(), items["title_words"].to_pylist(), strict=True))
    for i, row in zip(ids[:-1], out["item_title"][:-1], strict=True):
        want = feat_en.vocab.encode_one("words", [w.lower() for w in titles[i]])
        assert row.tolist() == padded(want, CFG.title_words_kept, PAD)
    assert (out["item_title"][-1] == PAD).all()
    side = read_table(world_en, "items").slice(0, 30).to_pylist()[::-1]
    for f in ("shop", "leaf", "cate1", "brand"):
        assert out[f"item_{f}"].tolist() == [-1 if r[f"{f}_id"] is None else r[f"{f}_id"] for r in side] + [-1], f
    assert out["item_price"][-1] == -1 and ((out["item_price"][:-1] >= 0) & (out["item_price"][:-1] < 10)).all()


def test_popularity_counts_the_training_days_and_leaves_a_training_example_out(
        world_en: Path, feat_en: Featurizer, train_en: pa.Table) -> None:
    """Impression and click counts are those of the training days' logs (the test day is never counted); an
    example's own search is left out of its item's counts; items never shown are level 0."""
    days = read_manifest(world_en).train_days
    logs = pa.concat_tables(read_table(world_en, "search_events", days=[d]) for d in days)
    shown = np.concatenate([np.asarray(v, np.int64) for v in logs["impressed_item_ids"].to_pylist()])
    clicked = np.concatenate([np.asarray(v, np.int64) for v in logs["clicked_item_ids"].to_pylist()])
    pop = ItemPopularity.of_world(world_en)
    ids = np.unique(shown)
    assert pop.counts["impressions"][np.searchsorted(pop.item_ids, ids)].tolist() == \
        [int((shown == i).sum()) for i in ids]
    top = np.bincount(clicked).argmax()
    level = feat_en.items(np.array([top, 10**9]))
    assert level["item_clicks"].tolist() == [min(int(np.log2(1 + (clicked == top).sum())), 15), 0]
    rows = train_en.slice(0, 200)
    trained, served = feat_en(rows), feat_en.items(rows["item_id"].to_numpy())
    own = pop.levels(rows["item_id"].to_numpy(), own=np.ones(200, bool))
    assert all(trained[k].tolist() == own[k].tolist() for k in own)
    assert (trained["item_clicks"] <= served["item_clicks"]).all()
    assert (trained["item_clicks"] < served["item_clicks"]).any()  # log2(1 + c - 1) < log2(1 + c) at c = 1, 3, 7...
    test_only = np.setdiff1d(np.arange(pop.item_ids.max() + 2), pop.item_ids)[:5]
    assert feat_en.items(test_only)["item_impressions"].tolist() == [0] * len(test_only)


def test_popularity_of_a_bare_catalogue_is_empty_and_round_trips(tmp_path: Path) -> None:
    """A catalogue directory without a manifest or searches has no counts (every item level 0); counts written
    to Parquet read back equal."""
    assert ItemPopularity.of_world(tmp_path).levels(np.array([1, 2]))["item_clicks"].tolist() == [0, 0]
    pop = ItemPopularity(np.array([9, 4, 6]), np.array([100, 3, 0]), np.array([7, 1, 0]))
    pop.to_parquet(tmp_path / "p.parquet")
    again = ItemPopularity.from_parquet(tmp_path / "p.parquet")
    assert again.item_ids.tolist() == [4, 6, 9] and again.count("impressions", np.array([9, 5])).tolist() == [100, 0]


def test_price_levels_are_deciles_within_each_leaf(world_en: Path, feat_en: Featurizer) -> None:
    items = read_table(world_en, "items")
    level = feat_en.items(items["item_id"].to_numpy())["item_price"]
    leaf, price = items["leaf_id"].to_numpy(zero_copy_only=False), items["price"].to_numpy(zero_copy_only=False)
    for lf in np.unique(leaf):
        mine = leaf == lf
        order = np.argsort(price[mine], kind="stable")
        assert (np.diff(level[mine][order]) >= 0).all(), f"leaf {lf}: dearer items never get a lower level"
        if mine.sum() >= 50 and len(np.unique(price[mine])) == mine.sum():
            counts = np.bincount(level[mine], minlength=10)
            assert counts.min() >= mine.sum() // 10 - 1 and counts.max() <= -(-mine.sum() // 10) + 1, counts
    unknown = PriceLevels(np.array([0, 0]), np.array([1.0, 2.0]))(np.array([3, 0, -1]), np.array([1.0, np.nan, 1.0]))
    assert unknown.tolist() == [-1, -1, -1]


# ------------------------------------------------------------------------------ missing data


def test_users_without_history_get_padding_only(feat_en: Featurizer, reference_en: Reference) -> None:
    first_ts = min(t for per_user in reference_en.behaviours.values() for t, _, _ in per_user)
    first_ts = min(first_ts, *(t for per_user in reference_en.queries.values() for t, _ in per_user))
    out = feat_en({"user_id": np.array([10**9, 0, 10**9]), "ts": np.array([first_ts + 10**10, first_ts, 0]),
                   "query": np.array(["red tee", "red tee", ""], dtype=object)})
    for key, value in out.items():
        if key[:3] in ("rt_", "st_", "lt_"):
            assert (value == -1).all(), key
    assert (out["his_query_words"] == PAD).all()
    assert (out["query_chars"][2] == PAD).all() and (out["query_bigrams"][2] == PAD).all()


def test_null_side_information_is_minus_one(world_en: Path, vocab_en: Vocabulary, tmp_path: Path) -> None:
    world = tmp_path / "nulls"
    shutil.copytree(world_en, world)
    items = pq.read_table(world / "items.parquet")
    brand = items["brand_id"].to_pylist()
    even = [i % 2 == 0 for i in items["item_id"].to_pylist()]
    items = items.set_column(items.schema.get_field_index("brand_id"), items.schema.field("brand_id"),
                             pa.array([None if e else b for e, b in zip(even, brand, strict=True)], pa.int32()))
    pq.write_table(items, world / "items.parquet")
    feat = Featurizer(world, vocab_en, CFG)
    out = feat(feat.examples([2]).slice(0, 100))
    seen = out["rt_item"] >= 0
    assert (out["rt_brand"][seen & (out["rt_item"] % 2 == 0)] == -1).all()
    assert (out["rt_brand"][seen & (out["rt_item"] % 2 == 1)] >= 0).all()
    assert (out["rt_shop"][seen] >= 0).all()


def test_a_missing_world_or_table_is_a_value_error_naming_it(world_en: Path, vocab_en: Vocabulary,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        Featurizer(tmp_path / "nowhere", vocab_en, CFG)
    world = tmp_path / "partial"
    shutil.copytree(world_en, world)
    shutil.rmtree(world / "search_events")
    feat = Featurizer(world, vocab_en, CFG)
    with pytest.raises(ValueError, match="search_events"):
        feat.examples([1])
    shutil.rmtree(world / "query_history")
    with pytest.raises(ValueError, match="query_history"):
        Featurizer(world, vocab_en, CFG)
    with pytest.raises(ValueError, match="'query'"):
        feat({"user_id": np.array([1]), "ts": np.array([1])})


# ------------------------------------------------------------------------------------ runtime


def test_pickles_for_ray_workers(feat_en: Featurizer, train_en: pa.Table) -> None:
    batch = train_en.slice(0, 32)
    again = pickle.loads(pickle.dumps(feat_en))
    expected, got = feat_en(batch), again(batch)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_saved_featurizer_maps_back_equal_and_read_only(world_en: Path, vocab_en: Vocabulary, feat_en: Featurizer,
                                                          train_en: pa.Table, tmp_path: Path) -> None:
    """``save`` / ``load``: the features of examples, of serving requests (no item) and of a few users' rows
    (``for_users``) equal the original's; the mapped arrays are read-only, so no batch can change them."""
    saved = feat_en.save(tmp_path / "featurizer")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    for mmap in (True, False):
        loaded = Featurizer.load(saved, vocab_en, mmap=mmap)
        batch = train_en.slice(0, 300)
        for want, got in ((feat_en(batch), loaded(batch)),
                          (feat_en(batch.drop_columns(["item_id", "event_id"])),
                           loaded(batch.drop_columns(["item_id", "event_id"])))):
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    mapped = Featurizer.load(saved, vocab_en)
    assert isinstance(mapped._actions["click"].keys, np.memmap) and not mapped._actions["click"].keys.flags.writeable
    few = mapped.for_users(train_en["user_id"].to_numpy()[:20])
    rows = train_en.slice(0, 20)
    for key, want in feat_en(rows).items():
        np.testing.assert_array_equal(few(rows)[key], want, err_msg=key)


def test_loading_what_is_not_a_saved_featurizer_names_the_missing_file(vocab_en: Vocabulary, feat_en: Featurizer,
                                                                       tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a saved featurizer") as e:
        Featurizer.load(tmp_path, vocab_en)
    assert "featurizer.json" in str(e.value)
    saved = feat_en.save(tmp_path / "f")
    (saved / "queries.keys.npy").unlink()
    with pytest.raises(ValueError, match=r"queries\.keys\.npy"):
        Featurizer.load(saved, vocab_en)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="glibc's mallopt: Linux")
def test_featurizer_processes_keep_numpy_temporaries_on_the_heap() -> None:
    from ray_mgdspr.arrays import keep_temporaries_on_the_heap

    assert keep_temporaries_on_the_heap()  # mallopt accepted both settings
