"""Fixtures of the serving tests: released versions (a briefly trained bundle + a sharded index) of world_en."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ray_mgdspr.config import FeatureConfig, IndexConfig, LossConfig, ModelConfig, OptimConfig, VocabConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.vocab import build_vocab_from_world
from ray_mgdspr.data.world import read_manifest, read_table
from ray_mgdspr.index.shards import METADATA_SCHEMA, build_index_version, split_by_shard
from ray_mgdspr.model.bundle import read_bundle_manifest, save_bundle
from ray_mgdspr.model.retrieval import CatalogueFeatures, item_vectors
from ray_mgdspr.serve.store import build_sqlite_store
from ray_mgdspr.train.loop import fit_local

FEATURES = FeatureConfig(realtime_len=5, short_len=8, long_len=8)


@dataclass
class Deployment:
    """What a serving test needs: the world, the index root with its versions, the behaviour store."""

    world: Path
    index_root: Path
    store: Path
    versions: list[str]
    features: FeatureConfig = field(default_factory=lambda: FEATURES)

    def private_copy(self, tmp: Path) -> dict[str, str]:
        """The ``serve:`` overrides of an endpoint on a copy of the index root and the store in ``tmp``, so that
        its promotions move ``CURRENT`` of that copy only (the world is shared: nothing writes it)."""
        shutil.copy(self.store, tmp / "behaviours.sqlite")
        shutil.copytree(self.index_root, tmp / "index")
        return {"index_root": str(tmp / "index"), "world": str(self.world), "store": str(tmp / "behaviours.sqlite")}


def release(world: Path, index_root: Path, bundles: Path, version: str, steps: int, seed: int,
            shards: int = 2) -> str:
    """Train ``steps`` steps (in process), save the bundle, embed the catalogue, build its index version."""
    vocab = build_vocab_from_world(world, VocabConfig())
    featurizer = Featurizer(world, vocab, FEATURES)
    run = fit_local(featurizer, vocab, world, read_manifest(world).train_days,
                    ModelConfig(d=16, heads=2), LossConfig(pool_size=128, n_hard=32),
                    OptimConfig(), steps=steps, batch_size=64, seed=seed)
    bundle = bundles / version
    save_bundle(bundle, run.model, vocab, FEATURES, LossConfig(), version=version)
    items = read_table(world, "items", columns=METADATA_SCHEMA.names)
    catalogue = CatalogueFeatures.from_featurizer(featurizer, items["item_id"].to_numpy())
    with torch.inference_mode():
        vectors = item_vectors(run.model, catalogue).numpy()
    checksum = read_bundle_manifest(bundle).files["item_tower.pt"]
    build_index_version(index_root, version, split_by_shard(vectors, catalogue.item_id, items, shards),
                        IndexConfig(shards=shards), version, checksum, vectors.shape[1], make_current=False,
                        bundle=str(bundle.resolve()))
    return version


@pytest.fixture(scope="session")
def deployment(world_en: Path, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("serving")
    index_root, bundles = root / "index", root / "bundles"
    versions = [release(world_en, index_root, bundles, "v1", steps=8, seed=0),
                release(world_en, index_root, bundles, "v2", steps=3, seed=1, shards=3)]
    store = root / "behaviours.sqlite"
    build_sqlite_store(world_en, store)
    return Deployment(world_en, index_root, store, versions)


@pytest.fixture(scope="module")
def client(server: tuple[str, Any]) -> Iterator[httpx.Client]:
    """An HTTP client of the module's endpoint (its ``server`` fixture: URL and resolved serve config)."""
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c
