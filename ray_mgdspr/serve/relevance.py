"""Relevance control after retrieval (paper §3.5): keep only items that match the query's key terms.

Embedding retrieval returns items that are close in meaning but can contradict an explicit constraint of
the query ("red dress" answered with a blue dress, "Yullux shoes" with another brand). As in the paper, the
query's key terms are extracted from the catalogue's own vocabulary and checked with boolean matching.

Key terms (``RelevanceFilter.key_terms``): the longest catalogue terms found in the query, in three kinds
(fields): ``category`` (a leaf's head term or synonym, or a first-level category name), ``brand`` (a brand
name) and ``attr:<slot>`` (an attribute value such as colour ``red``). Matching is on whole words for
space-separated languages and on substrings for Chinese (whose terms are single words in the catalogue's
jieba dictionary, while a query may be written without spaces).

An item passes (``matches``) when, for every field the query names, it matches at least one of the query's
terms of that field, either in its structured columns (leaf/cate1, brand, attribute values) or in its title.
A query without key terms keeps every item. Ray-free: the encoder extracts terms, each shard matches its
own candidates against its metadata, evaluation uses ``pass_mask``.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_mgdspr.arrays import sorted_lookup
from ray_mgdspr.data.world import read_table

_CJK = re.compile(r"[\u3400-\u9fff]")
BOUNDS_KEPT = 4096  # ItemMatcher.passing_bound: sets of key terms whose bound is kept (a few bytes each)


@dataclass(frozen=True)
class KeyTerm:
    """One catalogue term found in a query.

    Attributes:
        field: ``category``, ``brand`` or ``attr:<slot>``.
        text: the term as written in the catalogue (lower-cased).
        leaf_ids, cate1_ids: categories the term names (field ``category``).
        value_ids: brand ids (``brand``) or attribute value ids (``attr:<slot>``).
    """

    field: str
    text: str
    leaf_ids: frozenset[int] = frozenset()
    cate1_ids: frozenset[int] = frozenset()
    value_ids: frozenset[int] = frozenset()


def _key(text: str) -> str:
    """Normal form for matching: lower-case; words joined by one space, or by nothing for Chinese."""
    words = text.lower().split()
    return "".join(words) if _CJK.search(text) else " ".join(words)


@dataclass
class RelevanceFilter:
    """Key-term extraction over a catalogue's vocabulary (categories, brands, attribute values).

    Args:
        terms: normal-form term text -> the KeyTerms it stands for (one per field).
        items: optional item metadata (``item_id``, ``leaf_id``, ``cate1_id``, ``brand_id``,
            ``attr_value_ids``, ``title_words``, ``title``), sorted by item id, for ``pass_mask``.
    """

    terms: dict[str, list[KeyTerm]]
    items: pa.Table | None = None
    _by_length: list[str] = field(init=False, repr=False)
    _matcher: ItemMatcher | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._by_length = sorted(self.terms, key=lambda t: (-len(t), t))  # longest match first
        self._rank = {t: i for i, t in enumerate(self._by_length)}
        self._max_words = max((len(t.split(" ")) for t in self.terms), default=0)
        self._max_chars = max((len(t) for t in self.terms), default=0)

    @classmethod
    def from_world(cls, world: str | Path, load_items: bool = True) -> RelevanceFilter:
        """The filter of a world's catalogue (its categories, brands and attributes tables).

        Args:
            load_items: also load the items' metadata, for ``pass_mask`` (evaluation).

        Raises:
            ValueError: the world lacks one of those tables.
        """
        try:
            cats = read_table(world, "categories").to_pylist()
            brands = read_table(world, "brands", columns=["brand_id", "name"]).to_pylist()
            attrs = read_table(world, "attributes").to_pylist()
        except (FileNotFoundError, KeyError) as e:
            raise ValueError(f"world {world}: the relevance filter needs categories, brands and attributes ({e})") \
                from None
        found: dict[tuple[str, str], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        for c in cats:
            for term in c["terms"] or [c["leaf_name"]]:
                found[_key(term), "category"]["leaf"].add(c["leaf_id"])
            found[_key(c["cate1_name"]), "category"]["cate1"].add(c["cate1_id"])
        for b in brands:
            found[_key(b["name"]), "brand"]["value"].add(b["brand_id"])
        for a in attrs:
            found[_key(a["term"]), f"attr:{a['slot']}"]["value"].add(a["attr_value_id"])
        terms: dict[str, list[KeyTerm]] = defaultdict(list)
        for (text, kind), ids in found.items():
            if text:
                terms[text].append(KeyTerm(kind, text, frozenset(ids["leaf"]), frozenset(ids["cate1"]),
                                           frozenset(ids["value"])))
        items = None
        if load_items:
            items = read_table(world, "items", columns=["item_id", "leaf_id", "cate1_id", "brand_id",
                                                        "attr_value_ids", "title_words", "title"])
            items = items.take(pa.array(np.argsort(items["item_id"].to_numpy(), kind="stable")))
        return cls(dict(terms), items)

    def key_terms(self, query_words: list[str]) -> tuple[KeyTerm, ...]:
        """The catalogue terms in a query, longest first; a word is used by one term only.

        Example:
            >>> f = RelevanceFilter({"red": [KeyTerm("attr:colour", "red", value_ids=frozenset({0}))],
            ...                      "chiffon top": [KeyTerm("category", "chiffon top", leaf_ids=frozenset({2}))],
            ...                      "top": [KeyTerm("category", "top", leaf_ids=frozenset({9}))]})
            >>> [t.text for t in f.key_terms(["Red", "chiffon", "top"])]
            ['chiffon top', 'red']
        """
        cjk = any(_CJK.search(w) for w in query_words)
        text = "".join(query_words).lower() if cjk else f" {' '.join(query_words).lower()} "
        found: list[KeyTerm] = []
        for term in sorted(self._candidates(text, cjk), key=self._rank.__getitem__):
            needle = term if _CJK.search(term) else f" {term} "
            if needle in text:
                found.extend(self.terms[term])
                text = text.replace(needle, " | ")  # consumed: a shorter term inside it does not count again
        return tuple(found)

    def _candidates(self, text: str, cjk: bool) -> set[str]:
        """The catalogue terms that can match in ``text``: its substrings (Chinese) or runs of whole words that are
        terms, looked up instead of testing all of the catalogue's terms (a million-item catalogue has ~10k, and
        the scan cost 5 ms a query). Consuming a term only turns words into "|", so a term that matches after
        that was a substring, or a run of words, of the text before; ``key_terms`` tests these in the same
        longest-first order as the whole vocabulary, and so finds exactly what the scan found."""
        if cjk:  # the query's words joined without spaces: terms are its substrings
            return {text[i:j] for i in range(len(text)) for j in range(i + 1, min(len(text), i + self._max_chars) + 1)
                    if text[i:j] in self.terms}
        words = text[1:-1].split(" ")
        return {run for i in range(len(words)) for j in range(i + 1, min(len(words), i + self._max_words) + 1)
                if (run := " ".join(words[i:j])) in self.terms}

    def pass_mask(self, query_words: list[list[str]], item_ids: np.ndarray) -> np.ndarray:
        """(q, k) bool: whether each retrieved item passes its query's filter (-1 pads: False).

        Args:
            query_words: one word list per query.
            item_ids: (q, k) int64 retrieved items.
        """
        if self.items is None:
            raise ValueError("this RelevanceFilter was built without item metadata (from_world(load_items=True))")
        item_ids = np.asarray(item_ids, np.int64)
        known = self.items["item_id"].to_numpy()
        if self._matcher is None:
            self._matcher = ItemMatcher(self.items)  # the metadata's columns converted once
        out = np.zeros(item_ids.shape, bool)
        for row, (words, ids) in enumerate(zip(query_words, item_ids, strict=True)):
            pos, ok = sorted_lookup(known, ids)
            out[row, ok] = self._matcher(self.key_terms(words), pos[ok])
        return out


def matches(terms: tuple[KeyTerm, ...], metadata: pa.Table) -> np.ndarray:
    """(n,) bool: whether each item of ``metadata`` passes the key terms ``terms``: for each field the terms
    name, the item matches one of that field's terms in its structured column (category: leaf or first-level
    category; brand; an attribute's values) or in its title (whole words; a substring for Chinese).

    Args:
        terms: a query's key terms (``RelevanceFilter.key_terms``); empty keeps every item.
        metadata: item rows with ``leaf_id``, ``cate1_id``, ``brand_id``, ``attr_value_ids``, ``title_words``.
    """
    return ItemMatcher(metadata)(terms, np.arange(metadata.num_rows))


def _spaced(title_words: pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    """Each title as its words joined by one space, lower-cased (``" ".join(words).lower()``; no words: ""). With
    Arrow for ASCII titles, where its lower case is Python's, in Python otherwise: with this and the scan for
    Chinese titles below looping in Python over every item, an ``ItemMatcher`` of 1M items took 12.2-13.5 s to
    build, and takes 2.8-3.0 s (``docs/serving.md``, "Loading a version without stalling the one served
    beside it")."""
    words = title_words.combine_chunks() if isinstance(title_words, pa.ChunkedArray) else title_words
    joined = pc.binary_join(pc.cast(words, pa.large_list(pa.large_string())), pa.scalar(" ", pa.large_string()))
    joined = joined.fill_null("")
    if pc.all(pc.string_is_ascii(joined)).as_py() is not False:
        return pc.ascii_lower(joined)
    return pa.array([" ".join(t or []).lower() for t in words.to_pylist()], pa.large_string())


class _Postings:
    """Rows by value of one integer column (or of a list column's values): an inverted index in CSR form."""

    def __init__(self, values: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(values, kind="stable")
        ranked = values[order]
        starts = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1]])[:len(ranked)])  # each value's first
        self.keys, self.starts = ranked[starts], np.append(starts, len(order))
        self.rows = rows[order].astype(np.int32 if len(rows) < 2**31 else np.int64)

    def of(self, ids: frozenset[int]) -> list[np.ndarray]:
        """The rows holding each of ``ids`` (one array per id present)."""
        pos, found = sorted_lookup(self.keys, np.fromiter(ids, np.int64, len(ids)))
        return [self.rows[self.starts[p]:self.starts[p + 1]] for p in pos[found]]


class _Tokens:
    """Rows by token of a list-of-strings column (each token's rows once, ascending): ``_Postings`` of the tokens'
    dictionary codes.

    Args:
        tokens: one list of tokens per row.
        n: rows.
    """

    def __init__(self, tokens: pa.Array, n: int) -> None:
        encoded = pc.dictionary_encode(pc.list_flatten(tokens))
        token = encoded.indices.to_numpy().astype(np.int64)
        row = pc.list_parent_indices(tokens).to_numpy().astype(np.int64)
        pairs = np.sort(token * max(n, 1) + row)  # by token then row (np.unique's hashing was 10x slower)
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs  # each pair once
        self._code = {t: i for i, t in enumerate(encoded.dictionary.to_pylist())}
        self._rows = _Postings(*np.divmod(pairs, max(n, 1)))

    def get(self, token: str) -> np.ndarray | None:
        """The rows holding ``token``; None when none does."""
        code = self._code.get(token)
        return None if code is None else self._rows.of(frozenset({code}))[0]


@dataclass
class _Verdicts:
    """One key term's verdicts over an item table, as far as they are known (``ItemMatcher``)."""

    passes: np.ndarray  # (rows,) bool: the items known to match
    unchecked: np.ndarray | None  # (rows,) bool: items that hold the term's rarest word (Chinese: character) in
    #   their title and are not yet checked for the whole term there; None: ``passes`` is complete
    needle: str = ""  # what ``unchecked`` items' titles are searched for
    cjk: bool = False  # search the joined title (a substring) instead of the spaced one (whole words)


def _by_field(terms: tuple[KeyTerm, ...]) -> list[list[KeyTerm]]:
    """Key terms grouped by field: an item passes when, in every group, it matches one of the terms."""
    by_field: dict[str, list[KeyTerm]] = defaultdict(list)
    for t in terms:
        by_field[t.field].append(t)
    return list(by_field.values())


class ItemMatcher:
    """The relevance verdicts (``matches``) over one fixed item table (a shard's or the catalogue's metadata).
    Serving checks hundreds to thousands of candidates per request against each key term, and key terms repeat
    across queries, so a term's verdicts are kept per item of the table (a bounded LRU cache) and a request's are a
    gather per term (issue 16's profiles: per-item Python checks were half a shard replica's CPU, and per-request
    numpy checks of the candidates still 11 ms of a 1M-item request; tests check every verdict against a plain
    per-item reference, ``tests/helpers.py``).

    A term's verdicts: the items whose leaf / first-level category, brand or attribute values it names, or whose
    title holds it, from inverted postings (by value, by title word, by Chinese character). A term of one word is
    its word's posting. A phrase, or a Chinese term (a substring of the joined title), is checked in the titles
    that hold its rarest word or character, only for the items a request asks about, and the answer is kept: a
    common phrase ("extra large") would cost tens of ms to check over a whole 1M-item table at once.

    Args:
        metadata: item rows with ``leaf_id``, ``cate1_id``, ``brand_id``, ``attr_value_ids``, ``title_words``.
        cache_bytes: memory for cached verdicts (one or two bytes per item per term; at least 16 terms kept).
    """

    def __init__(self, metadata: pa.Table, cache_bytes: int = 64 << 20) -> None:
        n = metadata.num_rows
        self.n = n
        every = np.arange(n)
        self.leaf, self.cate1, self.brand = (
            _Postings(metadata[c].fill_null(-1).to_numpy(), every) for c in ("leaf_id", "cate1_id", "brand_id"))
        attrs = metadata["attr_value_ids"]
        lengths = pc.list_value_length(attrs).fill_null(0).to_numpy()
        self.attrs = _Postings(pc.list_flatten(attrs).to_numpy(zero_copy_only=False).astype(np.int64),
                               np.repeat(every, lengths))
        title_words = metadata["title_words"]
        self.spaced = _spaced(title_words)  # whole words: " word " in f" {title} "
        # the title words' postings with Arrow: the split is str.split(" ") (a double space gives an empty word);
        # a Python loop over every word cost ~7 us per item (14 of the ~50 s a 1M-item replica took to load)
        self.words = _Tokens(pc.split_pattern(self.spaced, " "), n)
        self.joined: dict[int, str] = {}  # the words joined, of the Chinese titles (the only ones a Chinese term is in)
        chars: dict[str, list[int]] = defaultdict(list)
        other = np.flatnonzero(~pc.string_is_ascii(self.spaced).to_numpy(zero_copy_only=False))  # may hold CJK
        for row, spaced, words in zip(other.tolist(), self.spaced.take(other).to_pylist(),
                                      title_words.take(other).to_pylist(), strict=True):
            if not _CJK.search(spaced):
                continue
            self.joined[row] = joined = "".join(words or []).lower()
            for c in set(joined):
                if _CJK.match(c):
                    chars[c].append(row)
        dtype = np.int32 if n < 2**31 else np.int64  # postings: row numbers, one per (character, item)
        self.chars = {c: np.asarray(r, dtype) for c, r in chars.items()}
        self.verdicts = functools.lru_cache(maxsize=max(16, cache_bytes // max(1, n)))(self._verdicts)
        self.passing_bound: Callable[[tuple[KeyTerm, ...]], int] = functools.lru_cache(maxsize=BOUNDS_KEPT)(
            self._passing_bound)
        """``passing_bound(terms)``: at most how many items of the table pass ``terms``: those that pass as far as
        postings tell, counting an item whose title is still to be checked for a phrase as passing (no title is
        read). Exact for terms of categories, brands, attribute values and single words. O(rows) per term the
        first time, from the kept verdicts; then kept (``BOUNDS_KEPT`` sets of terms)."""

    def __call__(self, terms: tuple[KeyTerm, ...], rows: np.ndarray) -> np.ndarray:
        """(n,) bool: whether each item at ``rows`` (row numbers of the metadata) passes ``terms``."""
        rows = np.asarray(rows, np.int64)
        keep = np.ones(len(rows), bool)
        if not terms or not len(rows):
            return keep
        for group in _by_field(terms):
            hit = self._passes(group[0], rows)
            for t in group[1:]:
                hit |= self._passes(t, rows)
            keep &= hit
        return keep

    def _passing_bound(self, terms: tuple[KeyTerm, ...]) -> int:
        """``passing_bound`` (kept per key terms: an upper bound stays one as titles are checked)."""
        if not terms:
            return self.n
        keep: np.ndarray | None = None
        for group in _by_field(terms):
            hit = np.zeros(self.n, bool)
            for t in group:
                v = self.verdicts(t)
                hit |= v.passes
                if v.unchecked is not None:
                    hit |= v.unchecked
            keep = hit if keep is None else keep & hit
        return int(np.count_nonzero(keep))

    def _passes(self, term: KeyTerm, rows: np.ndarray) -> np.ndarray:
        """Whether each item at ``rows`` matches ``term``, checking titles where the verdict is not yet known."""
        v = self.verdicts(term)
        if v.unchecked is not None:
            check = np.unique(rows[v.unchecked[rows]])
            if len(check):
                titles = (self.joined[r] for r in check.tolist()) if v.cjk else (
                    f" {t} " for t in self.spaced.take(check).to_pylist())
                ok = np.fromiter((v.needle in t for t in titles), bool, len(check))
                v.passes[check[ok]] = True  # before unchecked is cleared: a concurrent reader never misses one
                v.unchecked[check] = False
        return v.passes[rows]

    def _verdicts(self, term: KeyTerm) -> _Verdicts:
        """``term``'s verdicts as far as postings give them (``_passes`` completes them row by row)."""
        if term.field == "category":
            held = self.leaf.of(term.leaf_ids) + self.cate1.of(term.cate1_ids)
        else:
            held = (self.brand if term.field == "brand" else self.attrs).of(term.value_ids)
        passes = np.zeros(self.n, bool)
        for rows in held:
            passes[rows] = True
        text = term.text
        cjk = bool(_CJK.search(text))
        if cjk:  # a Chinese term is a substring of the titles that hold each of its Chinese characters
            postings = [self.chars.get(c) for c in set(text) if _CJK.match(c)]
        else:  # a Latin term is a run of whole words of the titles that hold each of its words
            postings = [self.words.get(w) for w in set(text.split(" "))]
        if any(p is None for p in postings):
            return _Verdicts(passes, None)
        rarest = min(postings, key=len)
        if not cjk and " " not in text:  # one word: in the title exactly when it is one of the title's words
            passes[rarest] = True
            return _Verdicts(passes, None)
        unchecked = np.zeros(self.n, bool)
        unchecked[rarest] = True
        unchecked &= ~passes
        return _Verdicts(passes, unchecked, text if cjk else f" {text} ", cjk)
