"""Lexical retrieval: BM25 over item titles (the paper's lexical channel, and the BM25 baseline).

Backed by bm25s (sparse-matrix BM25, Lucene scoring, k1 1.5, b 0.75): its score matrix is built here with numpy
(``_bm25``: the same scores as bm25s' own ``index``, 7x faster at 1M titles), then queried, saved and loaded by
bm25s. Titles and queries are word lists as the rest of the project segments them (``title_words``,
``query_words``), lower-cased here, so zh and en work alike. Only items that share at least one word with the
query are returned: a zero BM25 score is no match, and those slots are padded with id -1 and score -inf, as the
embedding search pads.

On disk (``Bm25Index.save``): bm25s' own files plus ``item_ids.npy`` (row -> item id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import bm25s
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ITEM_IDS = "item_ids.npy"


def _lowered(words: list[list[str]] | pa.Array | pa.ChunkedArray) -> list[list[str]]:
    rows = words.to_pylist() if isinstance(words, pa.Array | pa.ChunkedArray) else words
    return [[w.lower() for w in (row or []) if w.strip()] for row in rows]


_NOT_SPACE = "[^ \t\n\r\x0b\x0c\x1c-\x1f]"  # a character str.strip() keeps, in ASCII


class _Tokens(NamedTuple):
    """A catalogue's titles as token ids: ``ids`` (T,) every title's tokens one after another, ``lengths`` (n,)
    tokens per title, ``vocab`` token -> id."""

    ids: np.ndarray
    lengths: np.ndarray
    vocab: dict[str, int]


def _tokens(words: list[list[str]] | pa.Array | pa.ChunkedArray) -> _Tokens:
    """``_lowered(words)`` as token ids. ASCII titles in Arrow with Arrow's compute (its lower case and whitespace
    are Python's there): the Python loop over every word took 12 s of a 1M-item lexical channel's load. Other
    titles (zh, or word lists) in Python."""
    if isinstance(words, pa.Array | pa.ChunkedArray):
        words = words.combine_chunks() if isinstance(words, pa.ChunkedArray) else words
        flat = pc.list_flatten(words)
        if pc.all(pc.string_is_ascii(flat)).as_py() or not len(flat):
            keep = pc.match_substring_regex(flat, _NOT_SPACE)
            encoded = pc.dictionary_encode(pc.ascii_lower(pc.filter(flat, keep)))
            lengths = np.bincount(pc.filter(pc.list_parent_indices(words), keep).to_numpy(), minlength=len(words))
            return _Tokens(encoded.indices.to_numpy().astype(np.int64), lengths,
                           {token: i for i, token in enumerate(encoded.dictionary.to_pylist())})
    rows = _lowered(words)
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(w, len(vocab)) for row in rows for w in row]
    return _Tokens(np.asarray(ids, np.int64), np.asarray([len(r) for r in rows], np.int64), vocab)


def _bm25(tokens: _Tokens, k1: float, b: float) -> dict[str, Any]:
    """bm25s' score matrix (``BM25.scores``: CSC, one column per token, a row per title) of Lucene BM25, computed
    with numpy over all titles at once. bm25s' ``index`` computes the same scores (``tests/index/test_lexical.py``
    checks they are equal) in a Python loop over the titles: 27.6 s against 4.0 at 1M titles, during which an
    ingress replica that stages the version beside the one it serves (placement inline) made its requests wait
    for the GIL, up to 21 s (``docs/serving.md``, "Loading a version without stalling the one served beside it").

    As bm25s: idf = log(1 + (N - df + 0.5) / (df + 0.5)) in float32; tf / (k1 (1 - b + b |d| / avg|d|) + tf) in
    float64; their product stored in float32."""
    n, n_vocab = len(tokens.lengths), len(tokens.vocab)
    doc = np.repeat(np.arange(n, dtype=np.int64), tokens.lengths)
    # each (token, title) pair once, with its count, in the matrix's order: by token, then by title
    pairs, tf = np.unique(tokens.ids * n + doc, return_counts=True)
    column, row = np.divmod(pairs, n)
    df = np.bincount(column, minlength=n_vocab)
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)
    length = tokens.lengths[row]
    tfc = tf / (k1 * ((1 - b) + b * length / tokens.lengths.mean()) + tf)
    indptr = np.concatenate([[0], np.cumsum(df)])
    index_dtype = np.int32 if len(pairs) < np.iinfo(np.int32).max else np.int64  # as scipy chooses
    return {"data": (idf[column] * tfc).astype(np.float32), "indices": row.astype(np.int32),
            "indptr": indptr.astype(index_dtype), "num_docs": n}


class Bm25Index:
    """BM25 over the titles of a catalogue.

    Example:
        >>> idx = Bm25Index.build(np.array([7, 8]), [["red", "shoe"], ["blue", "shirt"]])
        >>> scores, ids = idx.search([["Red", "boots"], ["green"]], k=2)
        >>> ids.tolist()
        [[7, -1], [-1, -1]]
    """

    def __init__(self, retriever: bm25s.BM25, item_ids: np.ndarray) -> None:
        self._retriever = retriever
        self.item_ids = np.asarray(item_ids, np.int64)

    @classmethod
    def build(cls, item_ids: np.ndarray, title_words: list[list[str]] | pa.Array | pa.ChunkedArray) -> Bm25Index:
        """Index the titles ``title_words`` (one word list per item) of ``item_ids`` (n,)."""
        tokens = _tokens(title_words)
        if len(tokens.lengths) != len(item_ids):
            raise ValueError(f"{len(item_ids)} item ids but {len(tokens.lengths)} titles")
        if not len(tokens.lengths):
            raise ValueError("cannot build a BM25 index over an empty catalogue")
        if not len(tokens.ids):
            raise ValueError(f"cannot build a BM25 index: none of the {len(tokens.lengths)} items has a title word")
        retriever = bm25s.BM25()  # Lucene BM25, k1 1.5, b 0.75
        if (retriever.method, retriever.idf_method) != ("lucene", "lucene"):  # what _bm25 computes
            raise RuntimeError(f"bm25s {bm25s.__version__} defaults to {retriever.method} BM25; pin bm25s")
        # what bm25s' index() sets, with the scores from _bm25 (tests/index/test_lexical.py: the same)
        retriever.scores = _bm25(tokens, retriever.k1, retriever.b)
        retriever.vocab_dict = tokens.vocab | {"": len(tokens.vocab)}  # index() adds the empty token likewise
        retriever.unique_token_ids_set = set(retriever.vocab_dict.values())
        retriever.nonoccurrence_array = None  # Lucene BM25 has none
        return cls(retriever, item_ids)

    def __len__(self) -> int:
        return len(self.item_ids)

    def search(self, query_words: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per query by BM25.

        Args:
            query_words: one word list per query (any case).
            k: results per query, >= 1.

        Returns:
            scores (q, k) float32 best first (equal scores by item id) and item_ids (q, k) int64; slots without
            a matching item are -inf / -1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        scores = np.full((len(query_words), k), -np.inf, np.float32)
        ids = np.full((len(query_words), k), -1, np.int64)
        for i, words in enumerate(query_words):
            rows, bm25 = self.top_rows(words, k)
            scores[i, :len(rows)] = bm25
            ids[i, :len(rows)] = self.item_ids[rows]
        return scores, ids

    def top_rows(self, words: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query's top k as rows of the index (the order of the titles it was built from) and their BM25
        scores, best first (equal scores by item id): only the items that share a word with the query.

        The candidates come from the query words' posting lists (bm25s' per-word columns) when those hold at
        most a quarter of the catalogue, else from a scan of every item's score: at 1M items (k 1,000) the lists
        took 1.6 ms against the scan's 2.1 for such queries, and 4.6 against 3.6 for broader ones
        (``docs/serving.md``, "The lexical channel")."""
        vocab = self._retriever.vocab_dict
        known = [w for w in _lowered([words])[0] if w in vocab]
        if not known:  # a query of unseen words only matches nothing
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        tokens = np.asarray(self._retriever.get_tokens_ids(known))
        bm25 = self._retriever.get_scores_from_ids(tokens)  # (n,): bm25s' Lucene BM25 of every item
        columns = self._retriever.scores
        indices, indptr = columns["indices"], columns["indptr"]
        postings = [indices[indptr[t]:indptr[t + 1]] for t in tokens]  # the items of each query word
        if sum(len(p) for p in postings) > len(bm25) // 4:
            rows = np.flatnonzero(bm25 > 0)  # a zero score shares no word with the query
        else:
            rows = postings[0] if len(postings) == 1 else np.concatenate(postings)
            # an item is in at most len(postings) lists, so the k x len(postings) best entries hold the k best
            # items and every tie of the k-th: keep those, then each item once
            depth = k * len(postings)
            if len(rows) > depth:
                rows = rows[bm25[rows] >= np.partition(bm25[rows], len(rows) - depth)[len(rows) - depth]]
            if len(postings) > 1:
                rows = np.unique(rows)
            rows = rows[bm25[rows] > 0].astype(np.int64)
        if len(rows) > k:  # keep the k-th best score and every tie of it, ordered below
            rows = rows[bm25[rows] >= np.partition(bm25[rows], len(rows) - k)[len(rows) - k]]
        # best first, ties by item id. Not bm25s' own top-k: np.argpartition over the mostly-zero scores of
        # a large catalogue is pathological (160 ms per query at 1M items, against ~2 ms for this)
        rows = rows[np.lexsort((self.item_ids[rows], -bm25[rows]))[:k]]
        return rows, bm25[rows].astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write the index into directory ``path`` (created)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(path), show_progress=False)
        np.save(path / ITEM_IDS, self.item_ids)

    @classmethod
    def load(cls, path: str | Path) -> Bm25Index:
        """Read an index written by :meth:`save`."""
        path = Path(path)
        if not (path / ITEM_IDS).is_file():
            raise FileNotFoundError(f"{path}: not a BM25 index (no {ITEM_IDS})")
        retriever = bm25s.BM25.load(str(path), show_progress=False, verbosity=0)
        return cls(retriever, np.load(path / ITEM_IDS))
