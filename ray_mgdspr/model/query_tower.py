"""The query/user tower φ(q_u, R^u, S^u, L^u) of spec §2: MGS, user behaviour attention, [CLS] fusion.

Input is the featurizer's batch (``ray_mgdspr/data/features.py``); output is H_qu, one d-vector per
search. B = batch, d = embedding size, T = sequence length.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ray_mgdspr.config import ModelConfig
from ray_mgdspr.model.layers import (
    SelfAttention,
    masked_mean,
    mlp,
    safe_padding_mask,
    transformer_layer,
    zero_attention,
)
from ray_mgdspr.model.tables import Tables

SIDE_INFO = ("item", "leaf", "cate1", "brand", "shop")  # per behaviour item, real-time and short-term (§9.8)
LONG_ATTRIBUTES = ("item", "shop", "leaf", "brand")  # L_item, L_shop, L_leaf, L_brand (§2.2)
PRICE = ("price",)  # the price level, with ModelConfig.price_level (not in the paper)


def priced(cfg: ModelConfig) -> tuple[str, ...]:
    """``PRICE`` when the config reads the price level, else nothing: appended to a tuple of side information."""
    return PRICE if cfg.price_level else ()


def behaviour_fields(cfg: ModelConfig) -> tuple[str, ...]:
    """What a real-time / short-term behaviour is read as: ``SIDE_INFO`` (without ``item`` when
    ``cfg.item_ids`` is off) and the price level."""
    return tuple(f for f in SIDE_INFO if cfg.item_ids or f != "item") + priced(cfg)


def long_fields(cfg: ModelConfig) -> tuple[str, ...]:
    """The attributes of L^u this config reads: ``LONG_ATTRIBUTES`` (without ``item`` when ``cfg.item_ids`` is
    off) and the price level."""
    return tuple(f for f in LONG_ATTRIBUTES if cfg.item_ids or f != "item") + priced(cfg)


class MGS(nn.Module):
    """Multi-Granular Semantic unit (spec §2.1): Q_mgs, 6 tokens (1 token, q_seg, under the -mgs ablation)."""

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.cfg, self.tables = cfg, tables
        self.trm = transformer_layer(cfg.d, cfg.heads, cfg.attn_dropout)

    def words(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings (..., T, d) and their mask (..., T)."""
        return self.tables.words(ids), ids > 0

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        w, w_mask = self.words(b["query_words"])  # (B, Tw, d)
        q_seg = masked_mean(w, w_mask)  # (B, d)
        if not self.cfg.mgs:
            return q_seg.unsqueeze(1)  # (B, 1, d)
        chars, bigrams = b["query_chars"], b["query_bigrams"]
        q_1gram = masked_mean(self.tables.chars(chars), chars > 0)
        q_2gram = masked_mean(self.tables.bigrams(bigrams), bigrams > 0)  # zero for a 1-character query
        q_seg_seq = masked_mean(self.trm(w, src_key_padding_mask=safe_padding_mask(w_mask)), w_mask)
        his, his_words = self.words(b["his_query_words"])  # (B, k, Tw, d)
        q_his = masked_mean(his, his_words)  # (B, k, d): each historical query embedded like q_seg
        q_his_seq = history_attention(q_seg, q_his, his_words.any(-1))
        q_mix = q_1gram + q_2gram + q_seg + q_seg_seq + q_his_seq
        return torch.stack([q_1gram, q_2gram, q_seg, q_seg_seq, q_his_seq, q_mix], dim=1)  # (B, 6, d)


def history_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q_his_seq = softmax(q_seg · q_his^T) · q_his over the valid history (spec §2.1); zero when there is none.

    q: (B, d), kv: (B, k, d), mask: (B, k) -> (B, d)
    """
    logits = torch.einsum("bd,bkd->bk", q, kv).masked_fill(~mask, float("-inf"))
    logits = torch.where(mask.any(-1, keepdim=True), logits, 0.0)  # no history: finite logits, weights zeroed below
    weights = logits.softmax(-1) * mask
    return torch.einsum("bk,bkd->bd", weights, kv)


class BehaviourItems(nn.Module):
    """One vector per real-time/short-term behaviour: concat(item, leaf, cate1, brand, shop[, price]) -> Linear -> d
    (without the item ID when ``item_ids`` is off; the mask still comes from the item ids)."""

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.tables = tables
        self.fields = behaviour_fields(cfg)
        self.proj = nn.Linear(len(self.fields) * cfg.d, cfg.d)

    def forward(self, b: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) behaviours and their mask (B, T) from ``{prefix}_item``, ``{prefix}_leaf``, ..."""
        parts = [getattr(self.tables, f)(b[f"{prefix}_{f}"]) for f in self.fields]
        return self.proj(torch.cat(parts, dim=-1)), b[f"{prefix}_item"] >= 0


class ResidualLSTM(nn.Module):
    """2 stacked LSTM layers, hidden d, dropout between them, residual connections (spec §2.2, §8)."""

    def __init__(self, d: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.LSTM(d, d, batch_first=True) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) right-padded, mask: (B, T) -> (B, T, d)."""
        lengths = mask.sum(-1).clamp(min=1).cpu()
        for i, lstm in enumerate(self.layers):
            inp = self.dropout(x) if i else x
            out, _ = lstm(pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False))
            x = x + pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0]
        return x


class UserBehaviourAttention(nn.Module):
    """H_real, H_short, H_long (spec §2.2): Q_mgs attends over the three behaviour sequences."""

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.tables = tables
        self.items = BehaviourItems(cfg, tables)
        self.long_fields = long_fields(cfg)
        self.lstm = ResidualLSTM(cfg.d, 2, cfg.dropout)
        self.real_att = SelfAttention(cfg.d, cfg.heads, cfg.attn_dropout)
        self.short_att = SelfAttention(cfg.d, cfg.heads, cfg.attn_dropout)

    def real_time(self, q_mgs: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        r, mask = self.items(b, "rt")  # R^u: (B, 50, d)
        r_self_att = self.real_att(self.lstm(r, mask), mask)
        return zero_attention(q_mgs, r_self_att, mask)  # H_real

    def short_term(self, q_mgs: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        s, mask = self.items(b, "st")  # S^u: (B, 100, d)
        return zero_attention(q_mgs, self.short_att(s, mask), mask)  # H_short

    def long_term(self, q_mgs: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        h_long = torch.zeros_like(q_mgs)
        for f in self.long_fields:
            ids = b[f"lt_{f}"]  # (B, 3, T): click, buy, collect
            l_f = masked_mean(getattr(self.tables, f)(ids), ids >= 0)  # (B, 3, d): h_click, h_buy, h_collect
            h_long = h_long + zero_attention(q_mgs, l_f, (ids >= 0).any(-1))  # H_a_f
        return h_long

    def forward(self, q_mgs: torch.Tensor, b: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """q_mgs: (B, Q, d) -> [H_real, H_short, H_long], each (B, Q, d)."""
        return [self.real_time(q_mgs, b), self.short_term(q_mgs, b), self.long_term(q_mgs, b)]


class Fusion(nn.Module):
    """H_qu from X = [CLS; Q_mgs; H_real; H_short; H_long] (spec §2.3).

    ``trm``: one Transformer layer over the tokens, output at [CLS]. Ablation -trm: concatenation + MLP.
    """

    def __init__(self, cfg: ModelConfig, n_tokens: int) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.trm:
            # zero: the first steps read the tokens (uniform attention), not [CLS]'s own random vector
            self.cls = nn.Parameter(torch.zeros(cfg.d) if cfg.cls_init == "zero" else torch.randn(cfg.d) * cfg.d**-0.5)
            self.block = transformer_layer(cfg.d, cfg.heads, cfg.attn_dropout)
            # one learned embedding per token position, so the layer can tell the groups apart (not in the paper)
            self.types = nn.Embedding(n_tokens + 1, cfg.d) if cfg.type_embeddings else None
        else:
            self.mlp = mlp(n_tokens * cfg.d, 2 * cfg.d, cfg.d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, n_tokens, d) -> H_qu (B, d)."""
        B = tokens.size(0)
        if not self.cfg.trm:
            return self.mlp(tokens.flatten(1))
        x = torch.cat([self.cls.expand(B, 1, -1), tokens], dim=1)  # (B, 1 + n_tokens, d)
        if self.types is not None:
            x = x + self.types.weight
        return self.block(x)[:, 0]


class QueryTower(nn.Module):
    """φ: featurized search (query + user history) -> H_qu (B, d).

    Example:
        >>> from ray_mgdspr.config import FeatureConfig
        >>> from ray_mgdspr.model.batch import random_batch
        >>> from ray_mgdspr.model.layers import as_tensors
        >>> cfg = ModelConfig(d=16, heads=2, item_buckets=50, shop_buckets=10, brand_buckets=10, category_buckets=10)
        >>> tower = QueryTower(cfg, Tables(cfg, {"words": 30, "chars": 30, "bigrams": 30}))
        >>> tower(as_tensors(random_batch(4, FeatureConfig(), vocab_size=30, n_items=50))).shape
        torch.Size([4, 16])
    """

    def __init__(self, cfg: ModelConfig, tables: Tables) -> None:
        super().__init__()
        self.cfg = cfg
        self.mgs = MGS(cfg, tables)
        self.behaviours = UserBehaviourAttention(cfg, tables) if cfg.personalise else None
        q = 6 if cfg.mgs else 1
        self.fusion = Fusion(cfg, q * (4 if cfg.personalise else 1))

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        q_mgs = self.mgs(b)  # (B, 6, d)
        tokens = [q_mgs] + (self.behaviours(q_mgs, b) if self.behaviours is not None else [])
        return self.fusion(torch.cat(tokens, dim=1))  # (B, 24, d) -> (B, d)
