"""Relevance filter (key terms + boolean match) and the BM25 lexical channel, Ray-free."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import reference_matches
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.index.lexical import Bm25Index
from ray_mgdspr.serve.relevance import ItemMatcher, KeyTerm, RelevanceFilter, matches

RED = KeyTerm("attr:colour", "red", value_ids=frozenset({0}))
DRESS = KeyTerm("category", "dress", leaf_ids=frozenset({5}))
BRAND = KeyTerm("brand", "yullux", value_ids=frozenset({9}))


def meta(rows: list[dict]) -> pa.Table:
    cols = ["leaf_id", "cate1_id", "brand_id", "attr_value_ids", "title_words"]
    return pa.table({c: [r.get(c) for r in rows] for c in cols},
                    schema=pa.schema([("leaf_id", pa.int32()), ("cate1_id", pa.int32()), ("brand_id", pa.int32()),
                                      ("attr_value_ids", pa.list_(pa.int32())),
                                      ("title_words", pa.list_(pa.string()))]))


def test_match_needs_every_field_and_one_term_per_field() -> None:
    items = meta([
        {"leaf_id": 5, "brand_id": 9, "attr_value_ids": [0], "title_words": []},  # all fields structured
        {"leaf_id": 5, "brand_id": 3, "attr_value_ids": [0], "title_words": ["Yullux"]},  # brand in the title
        {"leaf_id": 5, "brand_id": 3, "attr_value_ids": [1], "title_words": ["red"]},  # colour in title, no brand
        {"leaf_id": 7, "brand_id": 9, "attr_value_ids": [0], "title_words": ["shirt"]},  # wrong category
        {"leaf_id": None, "brand_id": None, "attr_value_ids": None, "title_words": None},  # nulls
    ])
    assert matches((RED, DRESS, BRAND), items).tolist() == [True, True, False, False, False]
    assert matches((), items).all()  # no key terms: nothing is filtered
    blue = KeyTerm("attr:colour", "blue", value_ids=frozenset({1}))
    assert matches((RED, blue), items).tolist() == [True, True, True, True, False]  # OR within a field


def test_key_terms_longest_match_whole_words_and_chinese() -> None:
    f = RelevanceFilter({"red": [RED], "dress": [DRESS], "t-shirt": [KeyTerm("category", "t-shirt")],
                         "连衣裙": [KeyTerm("category", "连衣裙")], "红色": [KeyTerm("attr:colour", "红色")]})
    assert [t.text for t in f.key_terms(["Red", "dresses"])] == ["red"]  # whole words only
    assert [t.text for t in f.key_terms(["t-shirt", "dress"])] == ["t-shirt", "dress"]
    assert sorted(t.text for t in f.key_terms(["红色连衣裙"])) == ["红色", "连衣裙"]  # zh: substrings
    assert f.key_terms([]) == ()


@pytest.mark.parametrize("world_name", ["world_en", "world_zh"])
def test_exact_relevant_items_pass_and_irrelevant_ones_mostly_do_not(world_name: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """Against the simulator's ground truth: an item of the intended leaf, brand and attributes passes the
    filter of the query the simulated user typed (typos and truncations can hide a term, never add one)."""
    world: Path = request.getfixturevalue(world_name)
    f = RelevanceFilter.from_world(world)
    items = read_table(world, "items").to_pylist()
    events = read_table(world, "search_events", days=read_manifest(world).test_days).slice(0, 150).to_pylist()
    rng = np.random.default_rng(0)
    exact_pass, exact_n, other_pass, other_n = 0, 0, 0, 0
    for e in events:
        exact = [i["item_id"] for i in items if i["leaf_id"] == e["intent_leaf_id"]
                 and e["intent_brand_id"] in (None, -1, i["brand_id"])
                 and set(e["intent_attr_value_ids"]) <= set(i["attr_value_ids"] or [])]
        other = [i["item_id"] for i in rng.choice(items, 20) if i["leaf_id"] != e["intent_leaf_id"]]
        if not exact or not f.key_terms(e["query_words"]):
            continue
        mask = f.pass_mask([e["query_words"]] * 2, np.array([exact[:20] + [-1] * (20 - len(exact[:20])),
                                                            other + [-1] * (20 - len(other))]))
        exact_pass, exact_n = exact_pass + mask[0].sum(), exact_n + min(len(exact), 20)
        other_pass, other_n = other_pass + mask[1].sum(), other_n + len(other)
    assert exact_n > 100 and other_n > 500
    assert exact_pass / exact_n >= 0.95, exact_pass / exact_n
    assert other_pass / other_n <= 0.2, other_pass / other_n


def test_bm25_ranks_title_matches_pads_and_round_trips(tmp_path: Path) -> None:
    titles = [["red", "dress"], ["blue", "shirt"], ["red", "shirt"], ["red", "hat"], []]
    idx = Bm25Index.build(np.array([10, 11, 12, 13, 14]), titles)
    scores, ids = idx.search([["RED", "shirt"], ["unknown"], []], k=6)
    # both words, then the rarer word (shirt), then the commoner (red); no match: padded
    assert ids[0, :2].tolist() == [12, 11] and set(ids[0, 2:4].tolist()) == {10, 13}
    assert ids[0, 4:].tolist() == [-1, -1] and np.isinf(scores[0, 4:]).all()
    assert (ids[1:] == -1).all() and np.isinf(scores[1:]).all()
    assert scores[0, 0] > scores[0, 1] > scores[0, 2] > 0
    idx.save(tmp_path / "bm25")
    again = Bm25Index.load(tmp_path / "bm25")
    np.testing.assert_array_equal(again.search([["red", "shirt"]], 3)[1], ids[:1, :3])
    with pytest.raises(ValueError, match="k must be >= 1"):
        idx.search([["red"]], 0)
    with pytest.raises(FileNotFoundError, match="not a BM25 index"):
        Bm25Index.load(tmp_path)


# ItemMatcher (the vectorised verdicts behind matches) against the plain per-item reference, on tables and
# terms drawn to hit the edge cases: Latin words and phrases, empty words and double spaces, Chinese substrings
# across title words, mixed-script terms, missing brands, titles and attribute lists.
_WORDS = ["red", "Red", "dress", "cotton", "", "a", "red dress", "红", "色", "连衣裙", "红色", "iphone手机", "手机"]
_TEXTS = [*_WORDS, "red  dress", " red", "色连", "d"]
_ITEM = st.fixed_dictionaries({
    "leaf_id": st.integers(0, 3), "cate1_id": st.integers(0, 2), "brand_id": st.none() | st.integers(1, 3),
    "attr_value_ids": st.none() | st.lists(st.integers(0, 9), max_size=4),
    "title_words": st.none() | st.lists(st.sampled_from(_WORDS), max_size=6)})
_TERM = st.builds(KeyTerm, field=st.sampled_from(["category", "brand", "attr:color", "attr:size"]),
                  text=st.sampled_from(_TEXTS), leaf_ids=st.frozensets(st.integers(0, 3), max_size=2),
                  cate1_ids=st.frozensets(st.integers(0, 2), max_size=1),
                  value_ids=st.frozensets(st.integers(0, 9), max_size=3))
_SCHEMA = pa.schema([("leaf_id", pa.int64()), ("cate1_id", pa.int64()), ("brand_id", pa.int64()),
                     ("attr_value_ids", pa.list_(pa.int64())), ("title_words", pa.list_(pa.string()))])


@settings(max_examples=300, deadline=None)
@given(items=st.lists(_ITEM, min_size=1, max_size=30), terms=st.lists(_TERM, max_size=3), data=st.data())
def test_item_matcher_gives_exactly_the_reference_verdicts(items: list[dict], terms: list[KeyTerm],
                                                           data: st.DataObject) -> None:
    table = pa.Table.from_pylist(items, schema=_SCHEMA)
    rows = np.array(data.draw(st.lists(st.integers(0, len(items) - 1), max_size=60)), np.int64)
    want = reference_matches(tuple(terms), table.take(pa.array(rows, pa.int64())))
    matcher = ItemMatcher(table, cache_bytes=0)  # the smallest cache: 16 term masks
    np.testing.assert_array_equal(matcher(tuple(terms), rows), want)
    np.testing.assert_array_equal(matcher(tuple(terms), rows[::-1]), want[::-1])  # verdicts from the cache
    every = np.arange(len(items))  # some verdicts kept from the calls above, the others checked now
    np.testing.assert_array_equal(matcher(tuple(terms), every), reference_matches(tuple(terms), table))


def scanned_key_terms(f: RelevanceFilter, query_words: list[str]) -> tuple[KeyTerm, ...]:
    """``key_terms`` written as the plain scan of the whole vocabulary, longest term first."""
    cjk = any(re.search(r"[\u3400-\u9fff]", w) for w in query_words)
    text = "".join(query_words).lower() if cjk else f" {' '.join(query_words).lower()} "
    found: list[KeyTerm] = []
    for term in sorted(f.terms, key=lambda t: (-len(t), t)):
        needle = term if re.search(r"[\u3400-\u9fff]", term) else f" {term} "
        if needle in text:
            found.extend(f.terms[term])
            text = text.replace(needle, " | ")
    return tuple(found)


_VOCAB = ["red", "dress", "red dress", "t-shirt", "a", "a a", "b a", "shirt", "连衣裙", "红色", "红", "色连",
          "iphone", "iphone手机", "手机", "x y z", "y"]


@settings(max_examples=400, deadline=None)
@given(vocab=st.lists(st.sampled_from(_VOCAB), min_size=1, max_size=10, unique=True),
       words=st.lists(st.sampled_from([*_VOCAB, "", "Red", "z", "x", "DRESS", "衣裙", "|"]), max_size=7))
def test_key_terms_are_exactly_the_whole_vocabulary_scan(vocab: list[str], words: list[str]) -> None:
    """``key_terms`` looks up the query's word runs (or substrings) instead of scanning every catalogue term,
    and must find exactly what the scan finds, consumed words and ties included."""
    f = RelevanceFilter({t: [KeyTerm("category", t, leaf_ids=frozenset({i}))] for i, t in enumerate(vocab)})
    assert f.key_terms(words) == scanned_key_terms(f, words)


_TITLE_WORDS = ["red", "Red", "RED", "dress", "shirt", " ", "", "\t", "a", "blue", "x-1", "\x1c"]


@settings(max_examples=200, deadline=None)
@given(titles=st.lists(st.none() | st.lists(st.sampled_from(_TITLE_WORDS), max_size=5), min_size=1, max_size=20),
       queries=st.lists(st.lists(st.sampled_from(_TITLE_WORDS), max_size=3), min_size=1, max_size=4),
       k=st.integers(1, 25))
def test_bm25_built_from_arrow_equals_built_from_lists(titles: list, queries: list, k: int) -> None:
    """``Bm25Index.build`` of an Arrow column (token ids from Arrow, for ASCII titles) ranks exactly as the build
    of the same titles as Python lists (lower-cased and stripped word by word in Python)."""
    ids = np.arange(len(titles)) * 7 + 3
    column = pa.array(titles, pa.list_(pa.string()))
    try:
        plain = Bm25Index.build(ids, [t or [] for t in titles])
    except ValueError:  # no title word at all: both refuse
        with pytest.raises(ValueError, match="none of the"):
            Bm25Index.build(ids, column)
        return
    arrow = Bm25Index.build(ids, column)
    for got, want in zip(arrow.search(queries, k), plain.search(queries, k), strict=True):
        np.testing.assert_array_equal(got, want)
