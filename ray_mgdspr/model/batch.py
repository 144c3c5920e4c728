"""The batch the towers read: keys and shapes of the featurizer's output (``ray_mgdspr/data/features.py``).

Token ids (``query_*``, ``his_query_words``, ``item_title``) use 0 for padding; raw entity ids
(``rt_*``, ``st_*``, ``lt_*``, ``item_id``) use -1 for padding or a missing value.
"""

from __future__ import annotations

import numpy as np

from ray_mgdspr.config import FeatureConfig
from ray_mgdspr.data.features import POPULARITY_LEVELS, PRICE_LEVELS, ItemPopularity
from ray_mgdspr.model.item_tower import ITEM_SIDE_INFO
from ray_mgdspr.model.query_tower import LONG_ATTRIBUTES, PRICE, SIDE_INFO


def query_shapes(f: FeatureConfig) -> dict[str, tuple[int, ...]]:
    """Per-example shape of every query-tower input."""
    shapes: dict[str, tuple[int, ...]] = {
        "query_chars": (f.query_chars_kept,),
        "query_bigrams": (f.query_bigrams_kept,),
        "query_words": (f.query_words_kept,),
        "his_query_words": (f.his_queries, f.query_words_kept),
    }
    shapes |= {f"rt_{a}": (f.realtime_len,) for a in SIDE_INFO + PRICE}
    shapes |= {f"st_{a}": (f.short_len,) for a in SIDE_INFO + PRICE}
    shapes |= {f"lt_{a}": (3, f.long_len) for a in LONG_ATTRIBUTES + PRICE}
    return shapes


def item_shapes(f: FeatureConfig) -> dict[str, tuple[int, ...]]:
    """Per-example shape of the item-tower inputs."""
    side = ITEM_SIDE_INFO + PRICE + ItemPopularity.COLUMNS
    return {"item_id": (), "item_title": (f.title_words_kept,)} | {f"item_{a}": () for a in side}


def random_batch(
    batch_size: int, f: FeatureConfig, vocab_size: int, n_items: int, fill: float = 0.5, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch with the featurizer's keys and shapes and random content (shape tests, benchmarks).

    Each sequence is filled from its start to a random length (up to ``fill`` of its capacity), padded after.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in (query_shapes(f) | item_shapes(f)).items():
        token = key.startswith(("query_", "his_")) or key == "item_title"
        high = (vocab_size if token else PRICE_LEVELS if key.endswith("_price") else
                POPULARITY_LEVELS if key in ("item_impressions", "item_clicks") else n_items)
        x = rng.integers(1 if token else 0, high, size=(batch_size, *shape))
        if shape:
            n = rng.integers(0, int(shape[-1] * fill) + 1, size=(batch_size, *shape[:-1], 1))
            x = np.where(np.arange(shape[-1]) < n, x, 0 if token else -1)
        out[key] = x.astype(np.int64)
    return out
