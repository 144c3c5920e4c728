"""Tiny towers and random feature batches (spec §2-§3 at d 16), shared by the model tests."""

from __future__ import annotations

import torch

from ray_mgdspr.config import FeatureConfig, ModelConfig
from ray_mgdspr.model.batch import random_batch
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.model.mgdspr import TwoTower, build_model

D, B, VOCAB, ITEMS = 16, 5, 40, 60
SIZES = {"words": VOCAB, "chars": VOCAB, "bigrams": VOCAB}
FEATURES = FeatureConfig(realtime_len=7, short_len=9, long_len=6, his_queries=4, query_words_kept=5)


def cfg(**kw: object) -> ModelConfig:
    base = dict(d=D, heads=4, item_buckets=ITEMS + 1, shop_buckets=ITEMS, brand_buckets=ITEMS, category_buckets=ITEMS)
    return ModelConfig(**{**base, **kw})


def model_of(**kw: object) -> TwoTower:
    torch.manual_seed(0)
    return build_model(cfg(**kw), SIZES).eval()


def batch(seed: int = 0, fill: float = 0.7, n: int = B) -> dict[str, torch.Tensor]:
    return as_tensors(random_batch(n, FEATURES, vocab_size=VOCAB, n_items=ITEMS, fill=fill, seed=seed))


def without_history(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b = dict(b)
    for k in b:
        if k.startswith(("rt_", "st_", "lt_")):
            b[k] = torch.full_like(b[k], -1)
    b["his_query_words"] = torch.zeros_like(b["his_query_words"])
    return b
