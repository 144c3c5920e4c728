import pickle

import pytest

from ray_mgdspr.data.tokenize import Tokenizer, segment_accuracy
from ray_mgdspr.data.world import read_table


def test_english_words_keep_inner_hyphens_and_apostrophes() -> None:
    en = Tokenizer("en")
    assert en.words("Red cotton T-shirt, WOMEN'S size-XL!") == ["red", "cotton", "t-shirt", "women's", "size-xl"]
    assert en.words("  usb3.0 -- 2026  ") == ["usb3", "0", "2026"]
    assert en.words("") == []


def test_english_chars_and_bigrams_stay_within_words() -> None:
    en = Tokenizer("en")
    assert en.chars("Red Tee") == list("redtee")
    assert en.bigrams("Red Tee") == ["re", "ed", "te", "ee"]
    assert en.bigrams("a") == [] and en.bigrams("a b") == []


def test_chinese_granularities() -> None:
    zh = Tokenizer("zh")
    assert zh.chars("红色 连衣裙") == ["红", "色", "连", "衣", "裙"]
    assert zh.bigrams("红色 连衣裙") == ["红色", "色连", "连衣", "衣裙"]  # across the space: zh has no word gaps
    assert zh.bigrams("裙") == []
    assert zh.words("红色连衣裙") == ["红色", "连衣裙"]
    assert zh.words("iPhone 15 手机壳") == ["iphone", "15", "手机", "壳"]


def test_user_words_change_segmentation_of_private_instance_only() -> None:
    plain, known = Tokenizer("zh"), Tokenizer("zh", ["澜锦", "手机壳"])
    assert known.words("澜锦手机壳") == ["澜锦", "手机壳"]
    assert plain.words("澜锦手机壳") != ["澜锦", "手机壳"]  # the other instance is not contaminated


def test_pickle_round_trip_rebuilds_the_segmenter() -> None:
    t = Tokenizer("zh", ["澜锦"])
    t.words("澜锦")  # build jieba before pickling
    back = pickle.loads(pickle.dumps(t))
    assert back == t and back.words("澜锦手机壳") == t.words("澜锦手机壳")


def test_unknown_language() -> None:
    with pytest.raises(ValueError, match="unsupported lang 'fr'"):
        Tokenizer("fr")  # type: ignore[arg-type]


def test_segment_accuracy_hand_made() -> None:
    assert segment_accuracy([["红色", "连衣裙"]], [["红色", "连衣裙"]]) == 1.0
    assert segment_accuracy([["红", "色", "连衣裙"]], [["红色", "连衣裙"]]) == pytest.approx(0.4)
    assert segment_accuracy([["红色连衣裙"]], [["红色", "连衣裙"]]) == 0.0
    with pytest.raises(ValueError, match="1 predicted sentences but 2 true ones"):
        segment_accuracy([["a"]], [["a"], ["b"]])


def test_jieba_against_the_simulators_true_segmentation(world_zh) -> None:
    from ray_mgdspr.data.vocab import catalogue_terms

    items = read_table(world_zh, "items", columns=["title", "title_words"]).slice(0, 300)
    titles, truth = items["title"].to_pylist(), items["title_words"].to_pylist()
    plain_tok, known_tok = Tokenizer("zh"), Tokenizer("zh", catalogue_terms(world_zh))
    plain = segment_accuracy([plain_tok.words(t) for t in titles], truth)
    known = segment_accuracy([known_tok.words(t) for t in titles], truth)
    assert known > 0.9 and known > plain + 0.1  # the catalogue's dictionary is what makes jieba right
