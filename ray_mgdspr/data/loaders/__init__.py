"""Loaders that map real public product-search data into the project's world format.

Each loader is ``load_<name>(src, out, overwrite=False, **options) -> WorldManifest`` and writes a world
directory atomically (``WorldWriter``: temporary sibling directory, renamed into place on success, removed
on failure). Worlds they write are marked ``synthetic=False`` and carry the source, licence and the
loader's assumptions in ``manifest.json``.

* ``esci``: Amazon ESCI, the 150-query judgement subset or the full official Parquet files.
* ``wands``: WANDS queries (plus products and judgements when ``product.csv`` / ``label.csv`` exist).
* ``jdsearch``: the JDsearch personalised-search sample (search events, behaviour history, catalogue).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_mgdspr.data.loaders.esci import detect_esci, load_esci
from ray_mgdspr.data.loaders.jdsearch import load_jdsearch
from ray_mgdspr.data.loaders.wands import load_wands
from ray_mgdspr.data.world import WorldManifest

Loader = Callable[..., WorldManifest]

LOADERS: dict[str, Loader] = {
    "esci": load_esci,
    "wands": load_wands,
    "jdsearch": load_jdsearch,
}
"""Loader name -> function ``(src, out, overwrite=False, **options) -> WorldManifest`` (used by the CLI)."""


def load(
    name: str, src: str | Path, out: str | Path, overwrite: bool = False, **options: Any
) -> WorldManifest:
    """Run loader ``name``; unknown names raise ``ValueError`` listing the known ones."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](src, out, overwrite, **options)


__all__ = ["LOADERS", "Loader", "detect_esci", "load", "load_esci", "load_jdsearch", "load_wands"]
