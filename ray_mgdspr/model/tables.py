"""The embedding tables the towers share (spec §9.5: one word table for query, history and title words)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import torch.nn as nn

from ray_mgdspr.config import ModelConfig
from ray_mgdspr.data.features import POPULARITY_LEVELS, PRICE_LEVELS, ItemPopularity
from ray_mgdspr.data.world import read_table
from ray_mgdspr.model.layers import HashedEmbedding

BUCKETS = ("item_buckets", "shop_buckets", "brand_buckets", "category_buckets")


def resolve_buckets(cfg: ModelConfig, max_ids: dict[str, int]) -> ModelConfig:
    """``cfg`` with every unset ``*_buckets`` sized to one row per id (max id + 2: padding row included).

    Args:
        max_ids: the largest raw id per table of the training world, keys ``item``, ``shop``, ``brand``,
            ``category`` (leaf and first-level ids together); -1 when a table is empty.

    Example:
        >>> cfg = resolve_buckets(ModelConfig(shop_buckets=7), {"item": 99, "shop": 9, "brand": 4, "category": 30})
        >>> cfg.item_buckets, cfg.shop_buckets
        (101, 7)
    """
    update = {k: max(max_ids[k.removesuffix("_buckets")], 0) + 2 for k in BUCKETS if getattr(cfg, k) is None}
    return cfg.model_copy(update=update)


def world_max_ids(world: str | Path) -> dict[str, int]:
    """Largest raw id per ID table in the world's catalogue (``resolve_buckets``'s ``max_ids``); -1 when none."""
    items = read_table(world, "items", columns=["item_id", "shop_id", "brand_id", "leaf_id", "cate1_id"])

    def top(*cols: str) -> int:
        values = [pc.max(items[c]).as_py() for c in cols]
        return max([v for v in values if v is not None], default=-1)

    return {"item": top("item_id"), "shop": top("shop_id"), "brand": top("brand_id"),
            "category": top("leaf_id", "cate1_id")}


class Tables(nn.Module):
    """Token tables (words, characters, bigrams; row 0 = PAD), hashed ID tables (item, shop, brand, leaf
    and first-level category; row 0 = padding/missing), with ``cfg.price_level`` the price level table and, with
    ``cfg.item_popularity``, the impression and click level tables (item tower only).

    Args:
        cfg: model sizes (``d``, ``*_buckets``, ``sparse_ids``).
        vocab_sizes: rows per token table, ``{"words": n, "chars": n, "bigrams": n}``
            (``Vocabulary.num_ids``).
    """

    def __init__(self, cfg: ModelConfig, vocab_sizes: dict[str, int]) -> None:
        super().__init__()
        unset = [k for k in BUCKETS if getattr(cfg, k) is None]
        if unset:
            raise ValueError(f"model config: {', '.join(unset)} not set; size them with resolve_buckets()")
        d, sparse = cfg.d, cfg.sparse_ids
        self.words = nn.Embedding(vocab_sizes["words"], d, padding_idx=0, sparse=sparse)
        self.chars = nn.Embedding(vocab_sizes["chars"], d, padding_idx=0, sparse=sparse)
        self.bigrams = nn.Embedding(vocab_sizes["bigrams"], d, padding_idx=0, sparse=sparse)
        if cfg.item_ids:  # the largest table by far at catalogue scale (100M items x d)
            self.item = HashedEmbedding(cfg.item_buckets, d, sparse)
        self.shop = HashedEmbedding(cfg.shop_buckets, d, sparse)
        self.brand = HashedEmbedding(cfg.brand_buckets, d, sparse)
        self.leaf = HashedEmbedding(cfg.category_buckets, d, sparse)
        self.cate1 = HashedEmbedding(cfg.category_buckets, d, sparse)
        if cfg.price_level:
            self.price = HashedEmbedding(PRICE_LEVELS + 1, d, sparse)
        if cfg.item_side_info and cfg.item_popularity:
            for name in ItemPopularity.COLUMNS:
                setattr(self, name, HashedEmbedding(POPULARITY_LEVELS + 1, d, sparse))
        for table in self.children():
            nn.init.normal_(table.weight, std=d**-0.5)
            nn.init.zeros_(table.weight[0])
        if cfg.item_ids and cfg.item_id_init == "zero":  # H_item starts as the title's vector
            nn.init.zeros_(self.item.weight)
