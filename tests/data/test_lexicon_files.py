"""The simulator's lexicon files (``lexicon/en.yaml``, ``lexicon/zh.yaml``): well formed and parallel."""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources
from typing import Any

import pytest
import yaml

from ray_mgdspr.data.tokenize import Tokenizer

LANGS = ("en", "zh")
N_CATEGORIES = 20
MIN_LEAVES = 10
_ZH_TERM = re.compile(r"[\u4e00-\u9fff]+|[0-9]+")  # Han only, or digits only (e.g. "2026")


def _raw(lang: str) -> dict[str, Any]:
    path = resources.files("ray_mgdspr.data.simulator").joinpath(f"lexicon/{lang}.yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def raw() -> dict[str, dict[str, Any]]:
    return {lang: _raw(lang) for lang in LANGS}


def _scalars(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (k, *_scalars(v))]
    if isinstance(node, list):
        return [s for v in node for s in _scalars(v)]
    return [node]


def _terms(d: dict[str, Any]) -> list[str]:
    """Every term of the vocabulary (not slot names or the language code)."""
    out = [t for vals in d["attribute_slots"].values() for t in vals]
    for c in d["categories"]:
        out += [c["name"], *c["stuffed"], *(t for leaf in c["leaves"] for t in leaf)]
    return out + d["brand_syllables"] + d["shop_suffixes"]


def _leaf_terms(d: dict[str, Any]) -> list[str]:
    return [t for c in d["categories"] for leaf in c["leaves"] for t in leaf]


def _values(d: dict[str, Any]) -> list[str]:
    return [t for vals in d["attribute_slots"].values() for t in vals]


@pytest.mark.parametrize("lang", LANGS)
def test_every_scalar_is_a_non_empty_string(raw: dict[str, dict[str, Any]], lang: str) -> None:
    d = raw[lang]
    assert set(d) == {"lang", "attribute_slots", "categories", "brand_syllables", "shop_suffixes"}
    assert d["lang"] == lang
    bad = [s for s in _scalars(d) if not isinstance(s, str) or not s.strip() or s != s.strip()]
    assert bad == []
    for c in d["categories"]:
        assert set(c) == {"name", "slots", "stuffed", "leaves"}
        assert all(isinstance(leaf, list) and leaf for leaf in c["leaves"])


def test_files_are_parallel(raw: dict[str, dict[str, Any]]) -> None:
    en, zh = raw["en"], raw["zh"]
    assert list(en["attribute_slots"]) == list(zh["attribute_slots"])
    for slot, vals in en["attribute_slots"].items():
        assert len(vals) == len(zh["attribute_slots"][slot]), slot
    assert len(en["categories"]) == len(zh["categories"])
    for ce, cz in zip(en["categories"], zh["categories"], strict=True):
        assert ce["slots"] == cz["slots"], ce["name"]
        assert len(ce["stuffed"]) == len(cz["stuffed"]), ce["name"]
        assert [len(leaf) for leaf in ce["leaves"]] == [len(leaf) for leaf in cz["leaves"]], ce["name"]
    assert len(en["brand_syllables"]) == len(zh["brand_syllables"])
    assert len(en["shop_suffixes"]) == len(zh["shop_suffixes"])


@pytest.mark.parametrize("lang", LANGS)
def test_categories_leaves_and_slots(raw: dict[str, dict[str, Any]], lang: str) -> None:
    d = raw[lang]
    cats = d["categories"]
    assert len(cats) == N_CATEGORIES
    assert len({c["name"] for c in cats}) == N_CATEGORIES
    for c in cats:
        assert len(c["leaves"]) >= MIN_LEAVES, c["name"]
        assert c["slots"] and set(c["slots"]) <= set(d["attribute_slots"]), c["name"]
        assert len(set(c["slots"])) == len(c["slots"]), c["name"]
        assert len(set(c["stuffed"])) == len(c["stuffed"]), c["name"]
    assert len(set(d["brand_syllables"])) == len(d["brand_syllables"])
    assert len(set(d["shop_suffixes"])) == len(d["shop_suffixes"])


@pytest.mark.parametrize("lang", LANGS)
def test_terms_are_unambiguous(raw: dict[str, dict[str, Any]], lang: str) -> None:
    d = raw[lang]
    leaves, values = _leaf_terms(d), _values(d)
    assert [t for t, n in Counter(leaves).items() if n > 1] == []  # head terms and synonyms, file-wide
    assert [t for t, n in Counter(values).items() if n > 1] == []  # one slot per value term
    assert set(values) & set(leaves) == set()
    stuffed = {t for c in d["categories"] for t in c["stuffed"]}
    assert stuffed & (set(leaves) | set(values)) == set()
    # No invented brand name (two syllables) reads as a lexicon term.
    syl = d["brand_syllables"]
    assert {a + b for a in syl for b in syl} & {t.replace(" ", "") for t in _terms(d)} == set()


def test_en_terms_are_lower_case_and_tokenize_as_written(raw: dict[str, dict[str, Any]]) -> None:
    tok = Tokenizer("en")
    for t in _terms(raw["en"]):
        assert t == t.lower(), t
        assert tok.words(t) == t.split(), t  # the simulator's true words are the space-separated ones


def test_zh_terms_are_single_words(raw: dict[str, dict[str, Any]]) -> None:
    for t in _terms(raw["zh"]):
        assert not re.search(r"\s", t), t
        # Latin letters inside a zh term would be lower-cased and split off by the tokenizer.
        assert _ZH_TERM.fullmatch(t), t
