"""A DNN two-tower baseline in the spirit of the paper's α-DNN (spec §6.2): every feature mean-pooled,
concatenated and fed to an MLP; no attention, no sequence model. Trained with the pairwise hinge loss
(``loss.kind: hinge``) like earlier e-commerce EBR systems, or with the softmax loss for comparison.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ray_mgdspr.config import ModelConfig
from ray_mgdspr.model.item_tower import item_side
from ray_mgdspr.model.layers import masked_mean, mlp
from ray_mgdspr.model.query_tower import behaviour_fields, long_fields
from ray_mgdspr.model.tables import Tables


class DNNQueryTower(nn.Module):
    """Mean-pooled query characters, bigrams, words, history words and behaviour side info -> MLP -> (B, d)."""

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.cfg, self.tables = cfg, tables
        self.side, self.long = behaviour_fields(cfg), long_fields(cfg)
        n = 4 + (2 * len(self.side) + len(self.long) if cfg.personalise else 0)
        self.mlp = mlp(n * cfg.d, 2 * cfg.d, cfg.d)

    def _tokens(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return masked_mean(table(ids).flatten(1, -2), (ids > 0).flatten(1))

    def _ids(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return masked_mean(table(ids).flatten(1, -2), (ids >= 0).flatten(1))

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.tables
        parts = [
            self._tokens(t.chars, b["query_chars"]),
            self._tokens(t.bigrams, b["query_bigrams"]),
            self._tokens(t.words, b["query_words"]),
            self._tokens(t.words, b["his_query_words"]),
        ]
        if self.cfg.personalise:
            parts += [self._ids(getattr(t, f), b[f"{seq}_{f}"]) for seq in ("rt", "st") for f in self.side]
            parts += [self._ids(getattr(t, f), b[f"lt_{f}"]) for f in self.long]
        return self.mlp(torch.cat(parts, dim=-1))


class DNNItemTower(nn.Module):
    """concat([item ID embedding,] mean title words[, side information]) -> MLP -> (B, d)."""

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.item, self.words = (tables.item if cfg.item_ids else None), tables.words
        self.side = item_side(cfg)
        self.side_tables = nn.ModuleDict({f: getattr(tables, f) for f in self.side})
        self.mlp = mlp((1 + cfg.item_ids + len(self.side)) * cfg.d, 2 * cfg.d, cfg.d)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """x: ``item_id`` (B,), ``item_title`` (B, T)[, ``item_<side>`` (B,)] -> (B, d)."""
        title = masked_mean(self.words(x["item_title"]), x["item_title"] > 0)
        side = [self.side_tables[f](x[f"item_{f}"]) for f in self.side]
        ids = [self.item(x["item_id"])] if self.item is not None else []
        return self.mlp(torch.cat([*ids, title, *side], dim=-1))
