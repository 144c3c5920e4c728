"""Building blocks shared by the towers: hashed ID tables, masked pooling, the paper's attentions.

Conventions (the featurizer's contract, ``ray_mgdspr/data/features.py``): token ids use 0 for padding;
raw entity ids (item, shop, brand, category) use -1 for padding or missing values.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class HashedEmbedding(nn.Embedding):
    """An ID table of ``buckets`` rows for raw ids of any range (spec §9.4: hash ids into buckets).

    Row 0 is the padding row (raw id < 0, always zero, never trained); raw id ``i >= 0`` maps to row
    ``1 + i % (buckets - 1)``. Dense ids below ``buckets - 1`` never collide, so a table sized to the
    catalogue is exact, and a 100M-item catalogue can share a smaller table.

    Example:
        >>> e = HashedEmbedding(5, 2)
        >>> e.rows(torch.tensor([-1, 0, 3, 4, 9])).tolist()
        [0, 1, 4, 1, 2]
    """

    def __init__(self, buckets: int, d: int, sparse: bool = False) -> None:
        super().__init__(buckets, d, padding_idx=0, sparse=sparse)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids < 0, 0, 1 + ids.remainder(self.num_embeddings - 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rows(ids))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (..., T, d) over the positions where ``mask`` (..., T) is True; zero when none are."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1.0)


def zero_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(Q · [0; K]^T) · [0; K] with K = V = ``kv`` (spec §2.2, §9.7).

    The all-zero key prepended at position 0 (Ai et al., CIKM'19) has logit 0 and adds nothing, so an
    empty or unmatched behaviour set yields exactly zero. No projections, no 1/sqrt(d) scaling.

    Args:
        q: (B, Q, d) queries (the MGS tokens).
        kv: (B, T, d) behaviours.
        mask: (B, T) True at real behaviours; padding gets -inf.

    Returns:
        (B, Q, d)
    """
    logits = torch.einsum("bqd,btd->bqt", q, kv).masked_fill(~mask.unsqueeze(1), float("-inf"))
    logits = torch.cat([logits.new_zeros((*logits.shape[:-1], 1)), logits], dim=-1)  # the zero vector's logit
    weights = logits.softmax(-1)[..., 1:]  # the zero vector's weight multiplies 0
    return weights @ kv


def safe_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` for torch attention (True = ignore) that never masks a whole row.

    A row with no valid position would give NaN; its first position is unmasked instead. Callers mask
    such rows' outputs downstream (they are padding), so the value there does not matter.
    """
    pad = ~mask  # (B, T)
    # out of place (no `pad[:, 0] &= ...`): the ONNX exporter has no form for in-place logical ops
    return torch.cat([pad[:, :1] & mask.any(-1, keepdim=True), pad[:, 1:]], dim=1)


def transformer_layer(d: int, heads: int, dropout: float) -> nn.TransformerEncoderLayer:
    """One post-norm Transformer encoder layer, d -> d, feed-forward 4d (spec §9.6: one layer, 8 heads)."""
    return nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=dropout, batch_first=True)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a padded sequence (the SDM-style block of spec §2.2)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d), mask: (B, T) True at real positions -> (B, T, d)."""
        out, _ = self.attn(x, x, x, key_padding_mask=safe_padding_mask(mask), need_weights=False)
        return out


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Two-layer ReLU perceptron (the -trm fusion and the DNN baseline)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


def as_tensors(batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The featurizer's numpy batch as tensors on ``device`` (non-array values are dropped).

    Read-only arrays (zero-copy views of Arrow buffers) are copied: torch needs writable memory.
    """
    return {
        k: torch.as_tensor(v if v.flags.writeable else v.copy(), device=device)
        for k, v in batch.items()
        if isinstance(v, np.ndarray)
    }

