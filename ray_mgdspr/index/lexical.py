"""Lexical retrieval: BM25 over item titles (the paper's lexical channel, and the BM25 baseline).

Backed by bm25s (sparse-matrix BM25, Lucene scoring, k1 1.5, b 0.75). Titles and queries are word lists as
the rest of the project segments them (``title_words``, ``query_words``), lower-cased here, so zh and en work
alike. Only items that share at least one word with the query are returned: a zero BM25 score is no match,
and those slots are padded with id -1 and score -inf, as the embedding search pads.

On disk (``Bm25Index.save``): bm25s' own files plus ``item_ids.npy`` (row -> item id).
"""

from __future__ import annotations

from pathlib import Path

import bm25s
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ITEM_IDS = "item_ids.npy"


def _lowered(words: list[list[str]] | pa.Array | pa.ChunkedArray) -> list[list[str]]:
    rows = words.to_pylist() if isinstance(words, pa.Array | pa.ChunkedArray) else words
    return [[w.lower() for w in (row or []) if w.strip()] for row in rows]


_NOT_SPACE = "[^ \t\n\r\x0b\x0c\x1c-\x1f]"  # a character str.strip() keeps, in ASCII


def _token_ids(words: pa.Array | pa.ChunkedArray) -> tuple[list[list[int]], dict[str, int]] | None:
    """``_lowered(words)`` as bm25s' token ids per row and their vocabulary, computed with Arrow: the Python loop
    over every word took 12 s of a 1M-item lexical channel's load. Only for ASCII titles, where Arrow's lower case
    and whitespace are Python's; None otherwise (the caller lowers in Python)."""
    words = words.combine_chunks() if isinstance(words, pa.ChunkedArray) else words
    flat = pc.list_flatten(words)
    if not pc.all(pc.string_is_ascii(flat)).as_py() and len(flat):
        return None
    keep = pc.match_substring_regex(flat, _NOT_SPACE)
    encoded = pc.dictionary_encode(pc.ascii_lower(pc.filter(flat, keep)))
    ids = encoded.indices.to_numpy().tolist()
    counts = np.bincount(pc.filter(pc.list_parent_indices(words), keep).to_numpy(), minlength=len(words))
    ends = np.cumsum(counts).tolist()
    rows = [ids[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    return rows, {token: i for i, token in enumerate(encoded.dictionary.to_pylist())}


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
        ids = _token_ids(title_words) if isinstance(title_words, pa.Array | pa.ChunkedArray) else None
        titles = ids[0] if ids is not None else _lowered(title_words)
        if len(titles) != len(item_ids):
            raise ValueError(f"{len(item_ids)} item ids but {len(titles)} titles")
        if not titles:
            raise ValueError("cannot build a BM25 index over an empty catalogue")
        if not any(titles):
            raise ValueError(f"cannot build a BM25 index: none of the {len(titles)} items has a title word")
        retriever = bm25s.BM25()
        retriever.index(titles if ids is None else ids, show_progress=False)
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
