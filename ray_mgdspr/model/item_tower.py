"""The item tower ψ(i) of spec §3: H_item = e_i + tanh(W_t · mean(title word embeddings)).

Only the item ID and the title are used (the paper found LSTM/Transformer title encoders worse than mean
pooling: titles are keyword stacks without grammar).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ray_mgdspr.config import ModelConfig
from ray_mgdspr.model.layers import HashedEmbedding, masked_mean


class ItemTower(nn.Module):
    """ψ: (item ids, title word ids) -> H_item (B, d).

    Args:
        cfg: model sizes.
        item: the item ID table (shared with the behaviour sequences of the query tower).
        words: the word table (shared with query and history words, spec §9.5).

    Example:
        >>> cfg = ModelConfig(d=8, heads=2, item_buckets=100)
        >>> tower = ItemTower(cfg, HashedEmbedding(100, 8), nn.Embedding(40, 8, padding_idx=0))
        >>> tower(torch.tensor([3, 7]), torch.tensor([[1, 2, 0], [5, 0, 0]])).shape
        torch.Size([2, 8])
    """

    def __init__(self, cfg: ModelConfig, item: HashedEmbedding, words: nn.Embedding) -> None:
        super().__init__()
        self.item, self.words = item, words
        self.W_t = nn.Linear(cfg.d, cfg.d, bias=False)

    def forward(self, item_id: torch.Tensor, item_title: torch.Tensor) -> torch.Tensor:
        """item_id: (B,) raw ids; item_title: (B, T) word ids, 0 = PAD -> (B, d)."""
        e_i = self.item(item_id)
        title = masked_mean(self.words(item_title), item_title > 0)
        return e_i + torch.tanh(self.W_t(title))
