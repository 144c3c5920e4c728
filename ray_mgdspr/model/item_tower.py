"""The item tower ψ(i) of spec §3: H_item = e_i + tanh(W_t · mean(title word embeddings)) [+ tanh(W_s · side)].

The paper uses the item ID and the title (it found LSTM/Transformer title encoders worse than mean pooling:
titles are keyword stacks without grammar). With ``ModelConfig.item_side_info`` (the default here, not the
paper's) the tower also reads the item's side information, the same tables the behaviour sequences use:
side = concat(e_leaf, e_cate1, e_brand, e_shop[, e_price]). A catalogue whose ID rows see few clicks each gets
its brand, shop and price level from rows shared by many items (docs/model.md, "Item side information"). With
``ModelConfig.item_popularity`` the side information also holds the item's impression and click levels
(``ItemPopularity``): how often the logging engine showed it and searchers clicked it in the training days.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ray_mgdspr.config import ModelConfig
from ray_mgdspr.data.features import ItemPopularity
from ray_mgdspr.model.layers import masked_mean
from ray_mgdspr.model.query_tower import priced
from ray_mgdspr.model.tables import Tables

ITEM_SIDE_INFO = ("leaf", "cate1", "brand", "shop")
"""Side information the item tower reads with ``item_side_info`` (plus ``price`` with ``price_level``)."""


def item_side(cfg: ModelConfig) -> tuple[str, ...]:
    """The side information the item tower of this config reads (tables of ``Tables``)."""
    if not cfg.item_side_info:
        return ()
    return ITEM_SIDE_INFO + priced(cfg) + (ItemPopularity.COLUMNS if cfg.item_popularity else ())


def item_inputs(cfg: ModelConfig) -> tuple[str, ...]:
    """Keys of the item-tower batch this config reads (``item_id``, ``item_title``, ``item_<side>``)."""
    return ("item_id", "item_title", *(f"item_{f}" for f in item_side(cfg)))


class ItemTower(nn.Module):
    """ψ: item features -> H_item (B, d). Without ``ModelConfig.item_ids`` there is no e_i: H_item is the title's and
    the side information's terms (docs/model.md, "Item IDs").

    Args:
        cfg: model sizes and switches.
        tables: the shared tables (item IDs are shared with the behaviour sequences, words with the query and
            history words, spec §9.5; side information with the behaviours' side information).

    Example:
        >>> cfg = ModelConfig(d=8, heads=2, item_buckets=100, shop_buckets=10, brand_buckets=10, category_buckets=10)
        >>> tower = ItemTower(cfg, Tables(cfg, {"words": 40, "chars": 40, "bigrams": 40}))
        >>> side = {f"item_{f}": torch.tensor([1, -1]) for f in ("leaf", "cate1", "brand", "shop", "price",
        ...                                                         "impressions", "clicks")}
        >>> tower({"item_id": torch.tensor([3, 7]), "item_title": torch.tensor([[1, 2, 0], [5, 0, 0]]), **side}).shape
        torch.Size([2, 8])
    """

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.item, self.words = (tables.item if cfg.item_ids else None), tables.words
        self.W_t = nn.Linear(cfg.d, cfg.d, bias=False)
        self.side = item_side(cfg)
        if self.side:
            self.side_tables = nn.ModuleDict({f: getattr(tables, f) for f in self.side})
            self.W_s = nn.Linear(len(self.side) * cfg.d, cfg.d)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: ``item_id`` (B,) raw ids, ``item_title`` (B, T) word ids (0 = PAD), ``item_<side>`` (B,) raw ids
        (-1 = missing) -> (B, d)."""
        title = masked_mean(self.words(x["item_title"]), x["item_title"] > 0)
        h = torch.tanh(self.W_t(title))
        if self.item is not None:
            h = h + self.item(x["item_id"])  # e_i
        if self.side:
            h = h + torch.tanh(self.W_s(torch.cat([self.side_tables[f](x[f"item_{f}"]) for f in self.side], -1)))
        return h
