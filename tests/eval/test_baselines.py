"""The untrained baselines rank a tiny catalogue sensibly: real BM25 (bm25s) and the real packaged MiniLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_mgdspr.eval.baselines import bm25_topk, load_minilm, minilm_topk
from ray_mgdspr.index.lexical import Bm25Index
from ray_mgdspr.model.retrieval import exact_topk

IDS = np.array([10, 11, 12, 13, 14, 15])
TITLES = ["red running shoes for men", "blue cotton t-shirt", "leather office chair with wheels",
          "chocolate birthday cake", "comfortable three seat couch", "stainless steel kitchen knife set"]


def test_bm25_ranks_word_matches_first_and_pads_non_matches() -> None:
    words = [t.split() for t in TITLES]
    topk = bm25_topk(IDS, words, [["Running", "shoes"], ["office", "chair"], ["laptop"]], k=3)
    assert topk[0, 0] == 10 and topk[1, 0] == 12
    assert (topk[0, 1:] == -1).all()  # only one title shares a word with "running shoes"
    assert (topk[2] == -1).all()  # no shared word: nothing retrieved


WORDS = ["red", "blue", "shoe", "shirt", "cake", "chair", "set", "new", "large"]


@settings(max_examples=60, deadline=None)
@given(titles=st.lists(st.lists(st.sampled_from(WORDS), max_size=6), min_size=1, max_size=40),
       query=st.lists(st.sampled_from([*WORDS[:5], "lamp"]), min_size=1, max_size=3),
       k=st.integers(1, 12))
def test_bm25_top_k_is_bm25s_scores_best_first_ties_by_item_id(titles: list[list[str]], query: list[str],
                                                              k: int) -> None:
    """``Bm25Index.search`` ranks by bm25s' own scores (no top-k of bm25s': its argpartition is pathological on
    mostly-zero scores), best first, equal scores by item id, matches only, padded after."""
    ids = np.random.default_rng(len(titles)).permutation(10_000)[:len(titles)]
    if not any(titles):
        with pytest.raises(ValueError, match="none of the"):
            Bm25Index.build(ids, titles)
        return
    index = Bm25Index.build(ids, titles)
    scores, found = index.search([query], k)
    known = [w for w in query if w in index._retriever.vocab_dict]
    bm25 = index._retriever.get_scores(known) if known else np.zeros(len(ids), np.float32)
    want = sorted((-float(s), int(i)) for s, i in zip(bm25, ids, strict=True) if s > 0)[:k]
    assert [int(i) for i in found[0] if i >= 0] == [i for _, i in want]
    np.testing.assert_allclose(scores[0][:len(want)], [-s for s, _ in want], rtol=1e-6)
    assert (found[0][len(want):] == -1).all() and np.isneginf(scores[0][len(want):]).all()


@pytest.mark.parametrize("query", [["rare"], ["common"], ["rare", "w3"], ["common", "rare", "rare"], ["w1", "w2"]])
def test_bm25_top_rows_reads_posting_lists_or_scans_with_the_same_answer(query: list[str]) -> None:
    """``top_rows`` takes its candidates from the query words' posting lists when they are short (``rare``: a
    tenth of the titles) and scans every score when they are long (``common``: all of them): the same top k."""
    titles = [["common", *(["rare"] if i % 10 == 0 else []), f"w{i % 7}"] for i in range(200)]
    index = Bm25Index.build(np.arange(200)[::-1] + 1000, titles)
    bm25 = index._retriever.get_scores(query)
    want = sorted((-float(s), int(i)) for s, i in zip(bm25, index.item_ids, strict=True) if s > 0)[:7]
    rows, scores = index.top_rows(query, 7)
    assert [int(i) for i in index.item_ids[rows]] == [i for _, i in want]
    np.testing.assert_allclose(scores, [-s for s, _ in want], rtol=1e-6)


def test_exact_topk_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    q, items = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(40, 5)).astype(np.float32)
    ids = rng.permutation(1000)[:40]
    expected = ids[np.argsort(-(q @ items.T), axis=1)[:, :6]]
    np.testing.assert_array_equal(exact_topk(q, items, ids, 6, batch_size=3), expected)


@pytest.fixture(scope="module")
def minilm() -> object:
    return load_minilm()


def test_minilm_matches_meaning_without_shared_words(minilm: object) -> None:
    queries = ["sofa", "sneakers", "dessert", "cutlery"]
    topk = minilm_topk(IDS, TITLES, queries, k=6, model=minilm)
    assert topk[:, 0].tolist() == [14, 10, 13, 15]  # couch, running shoes, cake, knife set
    assert sorted(topk[0].tolist()) == sorted(IDS.tolist())  # exact search ranks the whole catalogue
