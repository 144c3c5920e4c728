import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_mgdspr.config import VocabConfig
from ray_mgdspr.data.tokenize import Tokenizer
from ray_mgdspr.data.vocab import PAD, Vocabulary, build_vocab, build_vocab_from_world, oov_bucket
from ray_mgdspr.data.world import read_manifest, read_table

ROWS = [(["red", "tee"], "red tee")] * 3 + [(["blue", "tee"], "blue tee")] * 2 + [(["rare"], "rare")]


def vocab(**cfg: int) -> Vocabulary:
    return build_vocab(ROWS, Tokenizer("en"), VocabConfig(**{"oov_buckets": 10, **cfg}))


def test_ids_by_frequency_with_pad_zero_and_cut_off() -> None:
    v = vocab()
    assert [t for t, _ in v.tokens["words"]] == ["tee", "red", "blue"]  # 'rare' is below min_count=2
    assert v.encode_one("words", ["tee", "red", "blue"]) == [1, 2, 3]
    assert PAD == 0 and v.num_ids("words") == 1 + 3 + 10
    rare = v.encode_one("words", ["rare"])[0]
    assert rare == 1 + 3 + zlib.crc32(b"rare") % 10
    assert 4 <= rare < v.num_ids("words")


def test_ties_are_broken_by_token_so_builds_are_deterministic() -> None:
    rows = [(["b"], "b"), (["a"], "a")] * 2
    v = build_vocab(rows, Tokenizer("en"), VocabConfig())
    assert [t for t, _ in v.tokens["words"]] == ["a", "b"]


def test_oov_bucket_is_stable_across_processes() -> None:
    code = "from ray_mgdspr.data.vocab import oov_bucket; print(oov_bucket('blåbär', 1000))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == oov_bucket("blåbär", 1000) == zlib.crc32("blåbär".encode()) % 1000


def test_encode_ragged_column_as_csr() -> None:
    v = vocab()
    col = pa.array([["red", "tee"], [], None, ["unseen", "blue", "tee"]], pa.list_(pa.string()))
    ids, offsets = v.encode("words", col)
    assert offsets.tolist() == [0, 2, 2, 2, 5]
    assert ids.tolist() == [2, 1, 1 + 3 + oov_bucket("unseen", 10), 3, 1]
    ids2, offsets2 = v.encode("words", [["red", "tee"], [], [], ["unseen", "blue", "tee"]])
    assert np.array_equal(ids, ids2) and np.array_equal(offsets, offsets2)
    chars, _ = v.encode("chars", [list("red")])
    assert (chars > 0).all()


def test_caps_limit_the_vocabulary() -> None:
    assert vocab(max_words=1).size("words") == 1


def test_save_load_round_trip_and_corruption(tmp_path: Path) -> None:
    v = vocab()
    path = v.save(tmp_path / "vocab.json")
    back = Vocabulary.load(path)
    assert back.tokens == v.tokens and back.lang == "en" and back.oov_buckets == 10
    assert back.encode_one("bigrams", ["ee", "zz"]) == v.encode_one("bigrams", ["ee", "zz"])
    body = json.loads(path.read_text())
    body["tokens"]["words"][0][0] = "tampered"
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=rf"{path}: checksum mismatch"):
        Vocabulary.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path}: not a vocabulary file"):
        Vocabulary.load(path)


def test_world_vocab_uses_catalogue_and_training_days_only(world_en: Path) -> None:
    v = build_vocab_from_world(world_en, VocabConfig(min_count=1))
    m = read_manifest(world_en)
    test_words = {w for ws in read_table(world_en, "search_events", days=m.test_days)["query_words"].to_pylist()
                  for w in ws}
    train_words = {w for ws in read_table(world_en, "query_history", days=m.history_days + m.train_days)
                   ["query_words"].to_pylist() for w in ws}
    titles = {w.lower() for ws in read_table(world_en, "items")["title_words"].to_pylist() for w in ws}
    known = {t for t, _ in v.tokens["words"]}
    leaked = test_words - train_words - titles
    assert leaked, "the test day should contain some words (typos) seen nowhere else"
    assert not (leaked & known)
    assert {"dress", "red"} <= known


def test_zh_world_vocab_keeps_segmenter_dictionary(world_zh: Path, tmp_path: Path) -> None:
    v = build_vocab_from_world(world_zh, VocabConfig())
    assert "连衣裙" in v.user_words and v.lang == "zh"
    back = Vocabulary.load(v.save(tmp_path / "v.json"))
    assert back.tokenizer().words("红色连衣裙") == ["红色", "连衣裙"]


@pytest.mark.parametrize("dict_lookups", [0, 10**9])  # Arrow's index_in for many tokens, a dict for few
def test_encode_gives_the_same_ids_by_either_lookup(monkeypatch: pytest.MonkeyPatch, dict_lookups: int) -> None:
    import ray_mgdspr.data.vocab as vocab_module

    v = vocab()
    col = pa.array([["red", "tee"], [], None, ["unseen", "blue", "tee"], ["rare"]], pa.list_(pa.string()))
    monkeypatch.setattr(vocab_module, "DICT_LOOKUPS", dict_lookups)
    ids, offsets = v.encode("words", col)
    assert offsets.tolist() == [0, 2, 2, 2, 5, 6]
    assert ids.tolist() == v.encode_one("words", ["red", "tee", "unseen", "blue", "tee", "rare"])
