"""The words the simulated marketplace is written in (``lexicon/en.yaml`` and ``lexicon/zh.yaml``).

The two files are parallel: same categories, leaves, slots and values in the same order, so one
world (drawn from the seed) can be rendered in either language by index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml


@dataclass(frozen=True)
class Category:
    name: str
    slots: tuple[str, ...]
    stuffed: tuple[str, ...]
    leaves: tuple[tuple[str, ...], ...]
    """Each leaf: head term first, then synonyms."""


@dataclass(frozen=True)
class Lexicon:
    lang: str
    slots: dict[str, tuple[str, ...]]
    """Attribute slot -> value terms."""
    categories: tuple[Category, ...]
    brand_syllables: tuple[str, ...]
    shop_suffixes: tuple[str, ...]

    @property
    def joiner(self) -> str:
        """How words are written one after another: spaces in English, nothing in Chinese."""
        return "" if self.lang == "zh" else " "

    def words(self, term: str) -> list[str]:
        """True segmentation of one lexicon term (en terms may hold several words)."""
        return [term] if self.lang == "zh" else term.split()


@cache
def load_lexicon(lang: str) -> Lexicon:
    """Load the packaged lexicon of ``lang`` (``en`` or ``zh``)."""
    files = resources.files("ray_mgdspr.data.simulator").joinpath("lexicon")
    if not files.joinpath(f"{lang}.yaml").is_file():
        raise ValueError(f"no simulator lexicon for lang={lang!r}; available: en, zh")
    raw = yaml.safe_load(files.joinpath(f"{lang}.yaml").read_text(encoding="utf-8"))
    return Lexicon(
        lang=raw["lang"],
        slots={k: tuple(map(str, v)) for k, v in raw["attribute_slots"].items()},
        categories=tuple(
            Category(
                name=str(c["name"]),
                slots=tuple(c["slots"]),
                stuffed=tuple(map(str, c["stuffed"])),
                leaves=tuple(tuple(map(str, leaf)) for leaf in c["leaves"]),
            )
            for c in raw["categories"]
        ),
        brand_syllables=tuple(map(str, raw["brand_syllables"])),
        shop_suffixes=tuple(map(str, raw["shop_suffixes"])),
    )
