"""The two-tower model: MGDSPR (spec §2-§3) or the DNN baseline, built from a ``ModelConfig``.

Towers return embeddings; the score is their inner product (spec §1); losses live in ``loss.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ray_mgdspr.config import ModelConfig
from ray_mgdspr.model.baseline import DNNItemTower, DNNQueryTower
from ray_mgdspr.model.item_tower import ItemTower
from ray_mgdspr.model.query_tower import QueryTower
from ray_mgdspr.model.tables import Tables


class TwoTower(nn.Module):
    """A query tower and an item tower over shared embedding tables.

    Example:
        >>> from ray_mgdspr.config import FeatureConfig
        >>> from ray_mgdspr.model.batch import random_batch
        >>> from ray_mgdspr.model.layers import as_tensors
        >>> cfg = ModelConfig(d=16, heads=2, item_buckets=50, shop_buckets=10, brand_buckets=10, category_buckets=10)
        >>> model = build_model(cfg, {"words": 30, "chars": 30, "bigrams": 30})
        >>> q, item, _ = model(as_tensors(random_batch(4, FeatureConfig(), vocab_size=30, n_items=50)))
        >>> q.shape, item.shape
        (torch.Size([4, 16]), torch.Size([4, 16]))
    """

    def __init__(self, cfg: ModelConfig, tables: Tables, query_tower: nn.Module, item_tower: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.tables = tables
        self.query_tower = query_tower
        self.item_tower = item_tower

    def embed_items(self, items: dict[str, torch.Tensor]) -> torch.Tensor:
        """H_item (B, d) of item features: ``item_id`` (B,), ``item_title`` (B, T) and, when the item tower reads
        side information, ``item_<side>`` (B,) (``Featurizer.items``; ``item_tower.item_inputs`` lists them)."""
        return self.item_tower(items)

    def forward(
        self, b: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """H_qu (B, d) of each search, H_item (B, d) of its positive item, and H_item (M, d) of ``extra`` items
        (item features, as in ``embed_items``: the sampled negatives) or None.

        One forward computes everything a training step needs, so DistributedDataParallel sees one call.
        """
        h_extra = None if extra is None else self.embed_items(extra)
        return self.query_tower(b), self.embed_items(b), h_extra


def build_model(cfg: ModelConfig, vocab_sizes: dict[str, int]) -> TwoTower:
    """MGDSPR (``cfg.kind == "mgdspr"``) or the DNN baseline (``"dnn"``), freshly initialised."""
    tables = Tables(cfg, vocab_sizes)
    if cfg.kind == "dnn":
        return TwoTower(cfg, tables, DNNQueryTower(cfg, tables), DNNItemTower(cfg, tables))
    return TwoTower(cfg, tables, QueryTower(cfg, tables), ItemTower(cfg, tables))
