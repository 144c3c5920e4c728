"""Versioned model bundles: both towers, the vocabulary and the configs in one directory.

```
bundle/
  manifest.json      version id, configs, parameter counts, sha256 of every file, training metadata
  query_tower.pt     state dict of the query tower (with the embedding tables it reads)
  item_tower.pt      state dict of the item tower (item ID and word tables, W_t)
  vocab.json         the vocabulary (its own checksum inside)
  price_levels.json  the price levels' edges the model was trained with
  item_popularity.parquet  the items' impression and click counts of the training days
```

A bundle is written into a temporary sibling directory and renamed into place when complete, so a crash
never leaves a half-written bundle. Loading checks every file's checksum before use. Each tower loads on
its own (the embedder needs only the item tower, the query encoder only the query tower).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from ray_mgdspr.artifacts import atomic_dir, sha256_file
from ray_mgdspr.config import FeatureConfig, LossConfig, ModelConfig
from ray_mgdspr.data.features import ItemContext, ItemPopularity, PriceLevels
from ray_mgdspr.data.vocab import KINDS, Vocabulary

if TYPE_CHECKING:  # torch only where weights are saved or loaded: reading a manifest does not load it
    import torch

    from ray_mgdspr.model.mgdspr import TwoTower

FORMAT_VERSION = 3
"""2: the item tower may read side information (``model.item_side_info``, ``model.price_level``); 3: and the
items' popularity (``model.item_popularity``, ``POPULARITY_FILE``), and item ID rows became optional
(``model.item_ids``). Older bundles are read with what they predate
switched off, which is what they were trained with."""
_PREDATES = {1: {"item_side_info": False, "price_level": False, "item_popularity": False, "item_ids": True},
             2: {"item_popularity": False, "item_ids": True}}
"""Model switches an older format predates, by format: read as off."""
MANIFEST = "manifest.json"
TOWER_FILES = {"query": "query_tower.pt", "item": "item_tower.pt"}
VOCAB_FILE = "vocab.json"
PRICE_LEVELS_FILE = "price_levels.json"
"""The price levels' edges the model was trained with (cut from the training world's catalogue): embedding, serving
and delta updates read prices through them, so an item's level does not move with tomorrow's catalogue. Bundles
written before it have none: readers then cut edges from the catalogue at hand."""
POPULARITY_FILE = "item_popularity.parquet"
"""The impression and click counts of the training days (``ItemPopularity``) the model was trained with: embedding
and delta updates read an item's popularity levels from them (an item the training days never showed is level 0),
so an index built from a bundle is reproducible whatever the logs hold later."""


class BundleManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    version: str = Field(description="version id shared by the model and the index built from it")
    created_at: dt.datetime
    model: ModelConfig
    features: FeatureConfig
    loss: LossConfig
    parameters: dict[str, int] = Field(description="trainable parameters per tower (shared tables in both)")
    files: dict[str, str] = Field(description="file name -> sha256")
    metadata: dict[str, Any] = Field(default_factory=dict, description="training run: data, steps, metrics")


def _towers(model: TwoTower) -> dict[str, torch.nn.Module]:
    return {"query": model.query_tower, "item": model.item_tower}


def save_bundle(
    out: str | Path, model: TwoTower, vocab: Vocabulary, features: FeatureConfig, loss: LossConfig,
    metadata: dict[str, Any] | None = None, version: str | None = None, overwrite: bool = False,
    context: ItemContext | None = None,
) -> BundleManifest:
    """Write ``model`` as a bundle at ``out`` (atomically); returns its manifest.

    Args:
        context: the price levels and popularity counts the model was trained with (``PRICE_LEVELS_FILE``,
            ``POPULARITY_FILE``).
        version: the version id; default ``<UTC time>-<first 8 hex of the weights' checksum>``.
        overwrite: replace an existing bundle at ``out``; otherwise an existing ``out`` is an error.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    import torch

    with atomic_dir(out) as tmp:
        for tower, name in TOWER_FILES.items():
            torch.save(_towers(model)[tower].state_dict(), tmp / name)
        vocab.save(tmp / VOCAB_FILE)
        if context is not None:
            (tmp / PRICE_LEVELS_FILE).write_text(context.prices.to_json())
            context.popularity.to_parquet(tmp / POPULARITY_FILE)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        now = dt.datetime.now(dt.UTC)
        digest = hashlib.sha256("".join(files[n] for n in TOWER_FILES.values()).encode()).hexdigest()
        manifest = BundleManifest(
            version=version or f"{now:%Y%m%d-%H%M%S}-{digest[:8]}",
            created_at=now,
            model=model.cfg,
            features=features,
            loss=loss,
            parameters={t: sum(p.numel() for p in m.parameters()) for t, m in _towers(model).items()},
            files=files,
            metadata=metadata or {},
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def parse_bundle_manifest(path: str | Path) -> BundleManifest:
    """The manifest of the bundle at ``path`` (an older format read as the current one), without checking its
    files."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: not a model bundle (no {MANIFEST})")
    raw = json.loads((path / MANIFEST).read_text())
    if isinstance(raw, dict) and raw.get("format_version") in _PREDATES:
        raw = {**raw, "format_version": FORMAT_VERSION,
               "model": {**_PREDATES[raw["format_version"]], **raw.get("model", {})}}
    manifest = BundleManifest.model_validate(raw)
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(f"{path}: bundle format {manifest.format_version}, this code reads {FORMAT_VERSION}")
    return manifest


def read_bundle_manifest(path: str | Path) -> BundleManifest:
    """The manifest of the bundle at ``path``, after checking every file against its checksum."""
    path = Path(path)
    manifest = parse_bundle_manifest(path)
    for name, sha in manifest.files.items():
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: bundle file {name} is missing")
        if sha256_file(path / name) != sha:
            raise ValueError(f"{path}: bundle file {name} does not match its checksum (corrupt or modified)")
    return manifest


def load_bundle(
    path: str | Path, towers: tuple[Literal["query", "item"], ...] = ("query", "item"), map_location: str = "cpu"
) -> tuple[TwoTower, Vocabulary, BundleManifest]:
    """The model (with the requested towers' weights loaded, in eval mode), its vocabulary and manifest.

    A tower not in ``towers`` keeps its fresh initialisation: load only what a stage uses.
    """
    import torch

    from ray_mgdspr.model.mgdspr import build_model

    path = Path(path)
    manifest = read_bundle_manifest(path)
    vocab = Vocabulary.load(path / VOCAB_FILE)
    model = build_model(manifest.model, {k: vocab.num_ids(k) for k in KINDS})
    for tower in towers:
        state = torch.load(path / TOWER_FILES[tower], map_location=map_location, weights_only=True)
        _towers(model)[tower].load_state_dict(state)
    return model.eval(), vocab, manifest


def price_levels(path: str | Path, manifest: BundleManifest | None = None) -> PriceLevels | None:
    """The price levels a bundle was trained with (checked against its checksum), or None for a bundle without."""
    checked = _checked_file(path, PRICE_LEVELS_FILE, manifest)
    return None if checked is None else PriceLevels.from_json(checked.read_text())


def item_popularity(path: str | Path, manifest: BundleManifest | None = None) -> ItemPopularity | None:
    """The popularity counts a bundle was trained with (checked against its checksum), or None for a bundle whose
    model does not read them."""
    checked = _checked_file(path, POPULARITY_FILE, manifest)
    return None if checked is None else ItemPopularity.from_parquet(checked)


def item_context(path: str | Path, manifest: BundleManifest | None = None,
                 world: str | Path | None = None) -> ItemContext:
    """The price levels and popularity counts a bundle was trained with; what it lacks (a bundle written without
    them) comes from ``world``'s catalogue and training days (``ItemContext.of_world``).

    Raises:
        ValueError: a bundle file does not match its checksum, or the bundle lacks one and no ``world`` is given.
    """
    prices, popularity = price_levels(path, manifest), item_popularity(path, manifest)
    if (prices is None or popularity is None) and world is None:
        raise ValueError(f"{path}: bundle has no {PRICE_LEVELS_FILE} or {POPULARITY_FILE}; name the world it "
                         "was trained on")
    return ItemContext(prices or PriceLevels.of_world(world), popularity or ItemPopularity.of_world(world))


def _checked_file(path: str | Path, name: str, manifest: BundleManifest | None) -> Path | None:
    """``path / name`` after checking it against the manifest's checksum; None when the bundle has no such file."""
    path = Path(path)
    manifest = parse_bundle_manifest(path) if manifest is None else manifest
    if name not in manifest.files:
        return None
    if sha256_file(path / name) != manifest.files[name]:
        raise ValueError(f"{path}: bundle file {name} does not match its checksum (corrupt or modified)")
    return path / name


def bundle_summary(manifest: BundleManifest) -> str:
    """One line: version, kind, size, parameters."""
    params = ", ".join(f"{t} tower {n:,}" for t, n in manifest.parameters.items())
    return f"model {manifest.version} ({manifest.model.kind}, d={manifest.model.d}; {params} parameters)"

