"""Tokenization for the model's three query granularities (spec §2.1, §9.5).

* **characters** (``q_1gram``): every non-space character of the whole query, lower-cased.
* **character bigrams** (``q_2gram``): consecutive character pairs. Chinese: over the whole query with
  spaces removed (a Chinese query has no reliable word boundaries). Latin scripts: within each word
  only, since a pair across a space ("d r" in "red rose") carries no lexical signal. A
  one-character query has no bigrams (the model's q_2gram is then zero).
* **words** (``q_seg``, ``q_seg_seq``, titles, historical queries): Latin scripts are lower-cased and
  split on anything that is not a letter or digit, keeping inner hyphens and apostrophes
  ("t-shirt", "women's"). Chinese is segmented with jieba; the catalogue's own terms (categories,
  attribute values, brands) can be added as a user dictionary, as a production segmenter knows the
  product vocabulary. Latin runs inside Chinese text ("iPhone 15 手机壳") become lower-cased words.

Each :class:`Tokenizer` owns a private ``jieba.Tokenizer`` so tokenizers with different user
dictionaries never contaminate each other; it is built lazily and dropped when pickled (Ray ships
tokenizers to workers), then rebuilt on first use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

Lang = Literal["en", "zh"]

_LATIN_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_SPACE = re.compile(r"\s+")


class Tokenizer:
    """Characters, bigrams and words of a text, for one language.

    Args:
        lang: ``"en"`` (any Latin-script language) or ``"zh"``.
        user_words: extra words for the Chinese segmenter (ignored for ``en``).

    Example:
        >>> Tokenizer("en").words("Red cotton T-shirt, women's")
        ['red', 'cotton', 't-shirt', "women's"]
        >>> Tokenizer("en").bigrams("red tee")
        ['re', 'ed', 'te', 'ee']
        >>> Tokenizer("zh").chars("红色 连衣裙")
        ['红', '色', '连', '衣', '裙']
    """

    def __init__(self, lang: Lang, user_words: Iterable[str] = ()) -> None:
        if lang not in ("en", "zh"):
            raise ValueError(f"unsupported lang {lang!r}; use 'en' or 'zh'")
        self.lang = lang
        self.user_words = tuple(sorted({w for w in user_words if w and not _SPACE.search(w)}))
        self._jieba: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"lang": self.lang, "user_words": self.user_words, "_jieba": None}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and (self.lang, self.user_words) == (other.lang, other.user_words)

    def __hash__(self) -> int:
        return hash((self.lang, self.user_words))

    def __repr__(self) -> str:
        return f"Tokenizer(lang={self.lang!r}, user_words=<{len(self.user_words)} words>)"

    def _segmenter(self) -> Any:
        if self._jieba is None:
            import jieba

            logging.getLogger("jieba").setLevel(logging.WARNING)
            jieba.setLogLevel(logging.WARNING)
            seg = jieba.Tokenizer()
            seg.initialize()
            for w in self.user_words:
                seg.add_word(w, freq=None)
            self._jieba = seg
        return self._jieba

    def words(self, text: str) -> list[str]:
        """Segmented, lower-cased words of ``text``."""
        text = text.lower()
        if self.lang == "en" or not _HAN.search(text):
            return _LATIN_WORD.findall(text)
        out = []
        for piece in self._segmenter().lcut(text, HMM=True):
            if _HAN.search(piece):
                out.append(piece)
            else:
                out.extend(_LATIN_WORD.findall(piece))
        return out

    def chars(self, text: str) -> list[str]:
        """The characters of the whole text, whitespace removed, lower-cased."""
        return list(_SPACE.sub("", text.lower()))

    def bigrams(self, text: str) -> list[str]:
        """Consecutive character pairs: over the whole text for zh, within words for Latin scripts."""
        text = text.lower()
        if self.lang == "zh":
            return _pairs(_SPACE.sub("", text))
        return [b for w in _SPACE.split(text) for b in _pairs(w)]

def _pairs(s: str) -> list[str]:
    return [s[i : i + 2] for i in range(len(s) - 1)]


def segment_accuracy(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> float:
    """Word-level F1 of a segmentation against the truth, averaged over sentences.

    Words are compared as character spans (the standard measure for Chinese word segmentation):
    a predicted word counts when a true word covers exactly the same characters.

    Example:
        >>> segment_accuracy([["红色", "连衣裙"]], [["红色", "连衣裙"]])
        1.0
        >>> round(segment_accuracy([["红", "色", "连衣裙"]], [["红色", "连衣裙"]]), 3)
        0.4
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted sentences but {len(truth)} true ones")
    if not truth:
        return 1.0
    scores = []
    for p, t in zip(predicted, truth, strict=True):
        ps, ts = _spans(p), _spans(t)
        hit = len(ps & ts)
        if not ps and not ts:
            scores.append(1.0)
            continue
        precision = hit / len(ps) if ps else 0.0
        recall = hit / len(ts) if ts else 0.0
        scores.append(0.0 if hit == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)


def _spans(words: Sequence[str]) -> set[tuple[int, int]]:
    out, pos = set(), 0
    for w in words:
        out.add((pos, pos + len(w)))
        pos += len(w)
    return out
