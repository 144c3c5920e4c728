"""Building an index version from an embedding set: shards built in parallel as Ray tasks.

```
<embed.out>/<model version>/ (item_id, embedding) + world items (metadata for the relevance filter)
  ─▶ split by shard_of(item_id) ─▶ S Ray tasks: build_shard_files ─▶ <index.out>/<model version>/
                                                                     manifest.json, shard files, CURRENT
```

The index version is the model bundle's version (the house rule: a model and the index built from it
share one id) and records the checksum of the item tower that made the vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ray

from ray_mgdspr.config import IndexConfig
from ray_mgdspr.data.world import read_table
from ray_mgdspr.index.embed import MANIFEST, read_embeddings, read_embeddings_manifest
from ray_mgdspr.index.manifest import IndexManifest, ShardEntry
from ray_mgdspr.index.shards import METADATA_SCHEMA, ShardData, build_index_version, build_shard_files, split_by_shard


@ray.remote
def _build_shard(directory: str, shard_no: int, data: ShardData, config: IndexConfig, dim: int) -> ShardEntry:
    return build_shard_files(directory, shard_no, data, config, dim)


def _parallel(config: IndexConfig, dim: int) -> Callable[[Path, Callable[[int], ShardData]], list[ShardEntry]]:
    def run(directory: Path, shard_data: Callable[[int], ShardData]) -> list[ShardEntry]:
        task = _build_shard.options(num_cpus=config.build_cpus, resources=dict(config.build_resources),
                                    scheduling_strategy=config.build_strategy)
        return ray.get([task.remote(str(directory), s, shard_data(s), config, dim) for s in range(config.shards)])

    return run


def build_index(world: str | Path, embeddings: str | Path, config: IndexConfig,
                make_current: bool = True) -> IndexManifest:
    """Build the index version of an embedding set (``embed_catalogue``'s output) with the world's metadata."""
    info = read_embeddings_manifest(embeddings)
    item_ids, vectors = read_embeddings(embeddings)
    if vectors.shape[1] != info.dim:
        raise ValueError(f"{embeddings}: vectors have dim {vectors.shape[1]} but {MANIFEST} says {info.dim}")
    metadata = read_table(world, "items", columns=METADATA_SCHEMA.names)
    parts = split_by_shard(vectors, item_ids, metadata, config.shards)
    return build_index_version(
        config.out, info.model_version, parts, config, info.model_version, info.item_tower_checksum, info.dim,
        make_current=make_current, build_shards=_parallel(config, info.dim), bundle=info.bundle,
    )
