"""The simulated world (synthetic): determinism, schemas, and the signals each model component needs."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import small_config

from ray_mgdspr.data import schema
from ray_mgdspr.data.simulator.lexicon import load_lexicon
from ray_mgdspr.data.simulator.relevance import RelevanceJudge
from ray_mgdspr.data.simulator.simulate import simulate
from ray_mgdspr.data.validate import validate_world
from ray_mgdspr.data.world import read_manifest, read_table, table_files


def test_world_validates_and_is_labelled_synthetic(world_en: Path) -> None:
    report = validate_world(world_en)
    assert report.ok, report.problems
    m = read_manifest(world_en)
    assert m.synthetic and "SYNTHETIC" in m.label
    assert m.train_days == list(range(1, 8)) and m.test_days == [8]
    assert [f.name for f in table_files(world_en, schema.SEARCH_EVENTS)] == [f"day-0{d}.parquet" for d in range(1, 9)]
    assert len(table_files(world_en, schema.BEHAVIOURS)) == 18  # 10 warm-up days + 8


def test_same_seed_same_world_other_seed_other_world(world_en: Path, tmp_path: Path) -> None:
    again = simulate(small_config(lang="en"), tmp_path / "again")
    assert again.tables == read_manifest(world_en).tables
    for name in ("items", "search_events", "behaviours", "query_history"):
        assert read_table(tmp_path / "again", name).equals(read_table(world_en, name)), name
    other = simulate(small_config(lang="en", seed=1), tmp_path / "other")
    assert not read_table(tmp_path / "other", "items").equals(read_table(world_en, "items"))
    assert other.tables["behaviours"] != again.tables["behaviours"]


def test_chunking_users_does_not_break_ids_or_validity(tmp_path: Path) -> None:
    simulate(small_config(users_per_chunk=64), tmp_path / "w")
    assert validate_world(tmp_path / "w").ok  # unique event ids across chunks are part of validation


def test_en_and_zh_worlds_are_the_same_world_in_two_languages(world_en: Path, world_zh: Path) -> None:
    cols = ["item_id", "leaf_id", "brand_id", "shop_id", "price", "attr_value_ids"]
    assert read_table(world_en, "items", columns=cols).equals(read_table(world_zh, "items", columns=cols))
    zh = read_table(world_zh, "items").slice(0, 200).to_pylist()
    for row in zh:
        assert " " not in row["title"]
        assert "".join(row["title_words"]) == row["title"]  # the true segmentation is known
    en = read_table(world_en, "items").slice(0, 200).to_pylist()
    assert all(" ".join(r["title_words"]) == r["title"] for r in en)


def test_titles_are_keyword_stacks(world_en: Path) -> None:
    items = read_table(world_en, "items").to_pylist()
    cats = {r["leaf_id"]: r for r in read_table(world_en, "categories").to_pylist()}
    brands = {r["brand_id"]: r["name"] for r in read_table(world_en, "brands").to_pylist()}
    attrs = {r["attr_value_id"]: r["term"] for r in read_table(world_en, "attributes").to_pylist()}
    for it in items[:300]:
        title = f" {it['title']} "
        assert f" {brands[it['brand_id']]} " in title
        assert any(f" {t} " in title for t in cats[it["leaf_id"]]["terms"])
        assert all(f" {attrs[v]} " in title for v in it["attr_value_ids"])


def test_clicks_depend_on_relevance_but_are_not_relevance(world_en: Path) -> None:
    s = read_manifest(world_en).stats
    assert s["ctr_grade2"] > 2 * s["ctr_grade1"] > 0
    assert s["ctr_grade1"] > s["ctr_grade0"] > 0
    assert 0.03 < s["irrelevant_click_share"] < 0.3  # click noise exists, but relevance dominates


def test_logged_grades_agree_with_the_exported_relevance_function(world_en: Path) -> None:
    ev = read_table(world_en, "search_events", days=[8])
    judge = RelevanceJudge.from_world(world_en)
    impressed = ev["impressed_item_ids"].to_pylist()
    width = max(map(len, impressed))
    ids = np.array([row + [-1] * (width - len(row)) for row in impressed])
    grades = judge.grades(ev["intent_leaf_id"], ev["intent_brand_id"], ev["intent_attr_value_ids"], ids)
    assert grades.shape == ids.shape
    assert (grades[ids < 0] == 0).all()
    clicked = set()
    for r, row in enumerate(ev["clicked_item_ids"].to_pylist()):
        clicked |= {(r, i) for i in row}
    click_grade = [grades[r, impressed[r].index(i)] for r, i in clicked]
    shown_grade = grades[ids >= 0]
    assert np.mean(np.array(click_grade) == 2) > 2 * np.mean(shown_grade == 2)


def test_relevance_function_on_hand_made_items() -> None:
    # items: 0 exact, 1 wrong colour, 2 wrong leaf, 3 wrong brand; slots: 0 colour (values 0,1), 1 material (2,3)
    judge = RelevanceJudge(np.arange(4), leaf=np.array([5, 5, 6, 5]), brand=np.array([1, 1, 1, 2]),
                           attr_value_ids=[[0, 2], [1, 2], [0, 2], [0, 2]], value_slot=np.array([0, 0, 1, 1]))
    ids = np.array([[0, 1, 2, 3, -1]])
    assert judge.grades([5], [1], [[0]], ids).tolist() == [[2, 1, 0, 1, 0]]
    assert judge.grades([5], [None], [[]], ids).tolist() == [[2, 2, 0, 2, 0]]
    assert judge.grades([5], [-1], [[0, 3]], ids).tolist() == [[1, 1, 0, 1, 0]]


def test_preferences_show_in_behaviours(world_en: Path) -> None:
    users = read_table(world_en, "users").to_pandas()
    items = read_table(world_en, "items", columns=["item_id", "cate1_id", "brand_id"]).to_pandas()
    beh = read_table(world_en, "behaviours", columns=["user_id", "item_id", "action", "source"]).to_pandas()
    beh = beh.merge(items, on="item_id")
    top = {u: int(np.argmax(p)) for u, p in zip(users.user_id, users.cate1_pref, strict=True)}
    beh["in_top"] = [top[u] == c for u, c in zip(beh.user_id, beh.cate1_id, strict=True)]
    global_share = beh.cate1_id.value_counts(normalize=True)
    expected = np.mean([global_share.get(top[u], 0) for u in beh.user_id])
    assert beh.in_top.mean() > 2 * expected  # users act in their own categories
    fav = {u: set(b) for u, b in zip(users.user_id, users.fav_brand_ids, strict=True)}
    beh["fav_brand"] = [b in fav[u] for u, b in zip(beh.user_id, beh.brand_id, strict=True)]
    n_brands = read_manifest(world_en).tables["brands"]
    assert beh.fav_brand.mean() > 5 * 3 / n_brands  # favourite brands are over-represented


def test_long_term_habits_differ_from_recent_browsing(world_en: Path) -> None:
    users = read_table(world_en, "users").to_pandas()
    items = read_table(world_en, "items", columns=["item_id", "cate1_id"]).to_pandas()
    beh = read_table(world_en, "behaviours", columns=["user_id", "item_id", "action", "day"]).to_pandas()
    beh = beh.merge(items, on="item_id")
    pref = dict(zip(users.user_id, users.cate1_pref, strict=True))
    beh["pref"] = [pref[u][c] for u, c in zip(beh.user_id, beh.cate1_id, strict=True)]
    buys = beh[beh.action == "buy"]
    recent_clicks = beh[(beh.action == "click") & (beh.day >= 6)]
    # purchases follow the long-term preference more than the last days' clicks, which bursts pull away
    assert buys.pref.mean() > recent_clicks.pref.mean() + 0.02


def test_followups_are_ambiguous_alone_and_clear_in_context(world_en: Path) -> None:
    ev = read_table(world_en, "search_events").to_pandas().sort_values(["session_id", "ts"])
    lex = load_lexicon("en")
    leaf_words = {w for c in lex.categories for leaf in c.leaves for t in leaf for w in t.split()}
    follow = ev[ev.is_followup]
    assert 0.2 < len(follow) / len(ev) < 0.6
    alone = follow[[not (set(w) & leaf_words) and len(w) <= 2 for w in follow.query_words]]
    assert len(alone) > 0.3 * len(follow)  # many follow-ups carry no category word at all
    prev = ev.groupby("session_id").intent_leaf_id.transform("first")
    assert (follow.intent_leaf_id == prev[follow.index]).all()  # ... yet the session's intent is known
    grown = [len(a) >= 1 for a in follow.intent_attr_value_ids]
    assert np.mean(grown) > 0.8


def test_queries_have_typos_truncations_and_synonyms(world_en: Path) -> None:
    s = read_manifest(world_en).stats
    assert 0.03 < s["typo_word_share"] < 0.15 and 0.02 < s["truncated_word_share"] < 0.12
    lex = load_lexicon("en")
    vocab = {w for c in lex.categories for leaf in c.leaves for t in leaf for w in t.split()}
    vocab |= {w for vals in lex.slots.values() for t in vals for w in t.split()}
    brands = {n.lower() for n in read_table(world_en, "brands")["name"].to_pylist()}
    words = pc.list_flatten(read_table(world_en, "query_history")["query_words"]).to_pylist()
    unknown = [w for w in words if w not in vocab and w.lower() not in brands]
    assert 0.05 < len(unknown) / len(words) < 0.3
    synonyms = {t for c in lex.categories for leaf in c.leaves for t in leaf[1:]}
    queries = read_table(world_en, "query_history")["query"].to_pylist()
    assert sum(any(f" {t} " in f" {q} " for t in synonyms) for q in queries) > 0.05 * len(queries)


def test_zh_queries_mix_spaced_and_unspaced(world_zh: Path) -> None:
    q = read_table(world_zh, "query_history")
    multi = [t for t, w in zip(q["query"].to_pylist(), q["query_words"].to_pylist(), strict=True) if len(w) > 1]
    spaced = np.mean([" " in t for t in multi])
    assert 0.1 < spaced < 0.6


def test_tables_have_exact_schemas(world_en: Path) -> None:
    for name, spec in schema.TABLES.items():
        files = table_files(world_en, spec)
        if name in ("queries", "judgements"):
            assert files == []
            continue
        assert files, name
        import pyarrow.parquet as pq

        assert pq.read_schema(files[0]).remove_metadata().equals(spec.schema.remove_metadata()), name


@pytest.mark.parametrize("field", ["n_items", "n_users"])
def test_scales_with_config(field: str, tmp_path: Path) -> None:
    small = simulate(small_config(warmup_days=0, train_days=1), tmp_path / "a")
    big = simulate(small_config(warmup_days=0, train_days=1, **{field: 2 * getattr(small_config(), field)}),
                   tmp_path / "b")
    key = "items" if field == "n_items" else "users"
    assert big.tables[key] == 2 * small.tables[key]
    assert pa.types.is_timestamp(read_table(tmp_path / "b", "behaviours").schema.field("ts").type)
