"""Vocabularies for the three granularities, with frequency cut-off and hashed out-of-vocabulary ids.

Each kind (``words``, ``chars``, ``bigrams``) has its own id space::

    0                      PAD
    1 .. n                 in-vocabulary tokens, most frequent first (ties by token, so builds are deterministic)
    n+1 .. n+oov_buckets   out-of-vocabulary tokens, by a stable hash (crc32) of the token

so an unseen word in a query still gets a consistent id, shared with other rare words of the same bucket.
Encoding maps a whole Arrow ``list<string>`` column at once (``pyarrow.compute.index_in``); only
out-of-vocabulary tokens are hashed in Python.

The vocabulary is built from the catalogue and the **training days only** (never the test days) and
saved as one JSON file with a checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_mgdspr.artifacts import write_text_atomic
from ray_mgdspr.config import VocabConfig
from ray_mgdspr.data import schema
from ray_mgdspr.data.tokenize import Tokenizer
from ray_mgdspr.data.world import read_manifest, read_table, table_files

log = logging.getLogger(__name__)

Kind = Literal["words", "chars", "bigrams"]
KINDS: tuple[Kind, ...] = ("words", "chars", "bigrams")
PAD = 0
FORMAT_VERSION = 1
DICT_LOOKUPS = 16  # Vocab.encode looks tokens up one by one when they are fewer than 1/16 of the vocabulary


def oov_bucket(token: str, buckets: int) -> int:
    """Stable bucket of an out-of-vocabulary token (the same in every process and run)."""
    return zlib.crc32(token.encode("utf-8")) % buckets


class Vocabulary:
    """Token -> id maps for words, characters and bigrams.

    Args:
        lang: the language of the tokenizer that produced the tokens.
        tokens: per kind, the in-vocabulary tokens in id order (id 1 first) with their counts.
        oov_buckets: hashed ids for tokens not in the vocabulary.
        user_words: the Chinese segmenter's user dictionary used at build time (kept so that
            encoding at serving time segments queries the same way).
    """

    def __init__(self, lang: str, tokens: dict[str, list[tuple[str, int]]], oov_buckets: int,
                 user_words: Iterable[str] = (), config: VocabConfig | None = None) -> None:
        self.lang = lang
        self.tokens = {k: list(tokens.get(k, [])) for k in KINDS}
        self.oov_buckets = oov_buckets
        self.user_words = tuple(user_words)
        self.config = config or VocabConfig()
        self._value_set = {k: pa.array([t for t, _ in self.tokens[k]], pa.string()) for k in KINDS}
        self._index = {k: {t: i + 1 for i, (t, _) in enumerate(self.tokens[k])} for k in KINDS}

    def size(self, kind: Kind) -> int:
        """In-vocabulary tokens of ``kind``."""
        return len(self.tokens[kind])

    def num_ids(self, kind: Kind) -> int:
        """Rows an embedding table for ``kind`` needs: PAD + vocabulary + OOV buckets."""
        return 1 + self.size(kind) + self.oov_buckets

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.lang, self.user_words)  # type: ignore[arg-type]

    def encode_one(self, kind: Kind, tokens: Iterable[str]) -> list[int]:
        index, n = self._index[kind], self.size(kind)
        return [index.get(t) or 1 + n + oov_bucket(t, self.oov_buckets) for t in tokens]

    def encode(self, kind: Kind, column: pa.Array | pa.ChunkedArray | list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of a ``list<string>`` column as CSR: flat int64 ids and int64 offsets (len = rows + 1)."""
        if isinstance(column, list):
            column = pa.array(column, pa.list_(pa.string()))
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        offsets = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(offsets)])
        flat = pc.list_flatten(column)
        if len(flat) * DICT_LOOKUPS < len(self._value_set[kind]):
            # few tokens (a serving request): a dict lookup each, since index_in hashes the whole vocabulary on
            # every call (0.7 ms a call at 200k words, 3 ms of a 1M-item request's encoding: issue 16)
            index = self._index[kind]
            ids = np.fromiter((index.get(t, 0) for t in flat.to_pylist()), np.int64, len(flat))
        else:
            pos = pc.index_in(flat, value_set=self._value_set[kind])
            ids = pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1  # in-vocab -> 1..n
        oov = np.flatnonzero(ids == 0)
        if len(oov):
            values = flat.take(pa.array(oov)).to_pylist()
            ids[oov] = [1 + self.size(kind) + oov_bucket(t, self.oov_buckets) for t in values]
        return ids, offsets

    # ---------------------------------------------------------------------------------- files

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "lang": self.lang,
            "oov_buckets": self.oov_buckets,
            "config": self.config.model_dump(),
            "user_words": list(self.user_words),
            "tokens": {k: [[t, c] for t, c in self.tokens[k]] for k in KINDS},
        }

    def save(self, path: str | Path) -> Path:
        """Write one JSON file atomically, with a sha256 of its content."""
        path = Path(path)
        body = self.to_dict()
        payload = json.dumps(body, ensure_ascii=False, sort_keys=True)
        body["sha256"] = hashlib.sha256(payload.encode()).hexdigest()
        return write_text_atomic(path, json.dumps(body, ensure_ascii=False, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary; a corrupt file or an unknown format is a ``ValueError`` naming the file."""
        path = Path(path)
        try:
            body = json.loads(path.read_text())
            digest = body.pop("sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}: not a vocabulary file written by mgdspr ({e})") from None
        payload = json.dumps(body, ensure_ascii=False, sort_keys=True)
        if hashlib.sha256(payload.encode()).hexdigest() != digest:
            raise ValueError(f"{path}: checksum mismatch, the vocabulary file is corrupt; rebuild it")
        if body.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: vocabulary format {body.get('format_version')} is not {FORMAT_VERSION}")
        tokens = {k: [(t, int(c)) for t, c in body["tokens"][k]] for k in KINDS}
        return cls(body["lang"], tokens, body["oov_buckets"], body["user_words"], VocabConfig(**body["config"]))


def build_vocab(rows: Iterable[tuple[list[str], str]], tokenizer: Tokenizer, config: VocabConfig) -> Vocabulary:
    """Count words from segmented word lists, characters and bigrams from the raw texts.

    Args:
        rows: ``(words, text)`` pairs: a title's true segmentation and the title, a query's words and
            the query.
        tokenizer: gives the language, the chars/bigrams rules and the segmenter's user words.
        config: cut-off, caps and OOV buckets.

    Example:
        >>> v = build_vocab([(["red", "tee"], "red tee")] * 2, Tokenizer("en"), VocabConfig(oov_buckets=10))
        >>> v.encode_one("words", ["red", "blue"])[0], v.num_ids("words")
        (1, 13)
    """
    counts: dict[Kind, Counter] = {k: Counter() for k in KINDS}
    for words, text in rows:
        counts["words"].update(w.lower() for w in words)
        counts["chars"].update(tokenizer.chars(text))
        counts["bigrams"].update(tokenizer.bigrams(text))
    caps = {"words": config.max_words, "chars": config.max_chars, "bigrams": config.max_bigrams}
    tokens = {}
    for kind in KINDS:
        kept = [(t, c) for t, c in counts[kind].items() if c >= config.min_count]
        kept.sort(key=lambda tc: (-tc[1], tc[0]))
        tokens[kind] = kept[: caps[kind]]
        log.info("vocab %s: %d tokens kept of %d seen", kind, len(tokens[kind]), len(counts[kind]))
    return Vocabulary(tokenizer.lang, tokens, config.oov_buckets, tokenizer.user_words, config)


def catalogue_terms(world: str | Path) -> list[str]:
    """Category, attribute and brand terms of a world: the segmenter's user dictionary for zh."""
    terms: list[str] = []
    for name, column in (("categories", "terms"), ("attributes", "term"), ("brands", "name")):
        if table_files(world, schema.TABLES[name]):
            col = read_table(world, name, columns=[column])[column]
            terms += pc.list_flatten(col).to_pylist() if pa.types.is_list(col.type) else col.to_pylist()
    return [t for t in terms if t]


def build_vocab_from_world(world: str | Path, config: VocabConfig) -> Vocabulary:
    """Build from the catalogue's titles and the queries of the history and training days (not test days)."""
    m = read_manifest(world)
    tokenizer = Tokenizer(m.lang, catalogue_terms(world) if m.lang == "zh" else ())  # type: ignore[arg-type]
    sources = [(schema.ITEMS, None, "title_words", "title"),
               (schema.SEARCH_EVENTS, m.train_days, "query_words", "query"),
               (schema.QUERY_HISTORY, m.history_days + m.train_days, "query_words", "query")]

    def rows() -> Iterable[tuple[list[str], str]]:
        for spec, days, words_col, text_col in sources:
            for f in table_files(world, spec, days):
                for b in pq.ParquetFile(f).iter_batches(batch_size=65_536, columns=[words_col, text_col]):
                    yield from zip(b.column(0).to_pylist(), b.column(1).to_pylist(), strict=True)

    return build_vocab(rows(), tokenizer, config)
