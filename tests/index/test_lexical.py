"""``index/lexical.py`` builds bm25s' score matrix with numpy (``_bm25``): the same scores as bm25s' own ``index``,
for titles as Arrow lists (ASCII and not) and as Python word lists (Ray-free)."""

from __future__ import annotations

import bm25s
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_mgdspr.index.lexical import Bm25Index, _lowered

WORDS = ["red", "Red", "blue", "shoe", "shirt", "cake", "chair", "set", "new", "large", "红色", "鞋", " ", ""]


def bm25s_own(titles: list[list[str]]) -> bm25s.BM25:
    retriever = bm25s.BM25()
    retriever.index(_lowered(titles), show_progress=False)
    return retriever


@settings(max_examples=80, deadline=None)
@given(titles=st.lists(st.lists(st.sampled_from(WORDS), max_size=8), min_size=1, max_size=60),
       as_arrow=st.booleans())
def test_the_score_matrix_equals_bm25s_own_index(titles: list[list[str]], as_arrow: bool) -> None:
    lowered = _lowered(titles)
    if not any(lowered):
        return  # refused by build (test_baselines.py)
    words = pa.array(titles, pa.list_(pa.string())) if as_arrow else titles
    ours = Bm25Index.build(np.arange(len(titles)), words)._retriever
    theirs = bm25s_own(titles)
    vocab = {w for row in lowered for w in row}
    assert set(ours.vocab_dict) == set(theirs.vocab_dict) == vocab | {""}
    for word in vocab:  # each word's column: the same titles, the same float32 scores
        np.testing.assert_array_equal(ours.get_scores([word]), theirs.get_scores([word]), err_msg=word)
    assert ours.scores["num_docs"] == theirs.scores["num_docs"]
    assert len(ours.scores["data"]) == len(theirs.scores["data"])


@pytest.mark.parametrize("rows", [[["Red", "red", "shoe"], [], ["shoe"]], [["  "], ["cake", "cake", "cake"]]])
def test_repeated_words_and_empty_titles_score_as_bm25s_scores_them(rows: list[list[str]]) -> None:
    ours = Bm25Index.build(np.arange(len(rows)), pa.array(rows, pa.list_(pa.string())))._retriever
    theirs = bm25s_own(rows)
    for word in {w for row in _lowered(rows) for w in row}:
        np.testing.assert_array_equal(ours.get_scores([word]), theirs.get_scores([word]))
