"""Losses (spec §4, §9.1-§9.3): sampled softmax with temperature τ and mixed hard negatives I_mix, and the
pairwise hinge loss of earlier e-commerce EBR systems.

Both score with the raw inner product F(q, i) = q · i and share one negative pool per step: the positives
of the (cross-worker) batch plus uniformly sampled catalogue items. Pool entries equal to an example's own
positive ("accidental hits") are masked for that example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ray_mgdspr.config import LossConfig


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # (B, 1 + M + N): positive, pool negatives, mixed hard negatives (before / τ)
    hard: torch.Tensor  # (B, N) pool indices of I_hard (empty when I_mix is off)


def accidental_hits(pos_ids: torch.Tensor, pool_ids: torch.Tensor) -> torch.Tensor:
    """(B, M) True where pool item m is example b's own positive."""
    return pos_ids.unsqueeze(1) == pool_ids.unsqueeze(0)


def mixed_hard_negatives(
    s_pos: torch.Tensor, s_neg: torch.Tensor, cfg: LossConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of I_mix = α ⊙ i+ + (1 - α) ⊙ I_hard against q (spec §4.3).

    I_hard = the top-N pool negatives by q · i (selection without gradient); α ~ U(a, b) drawn per
    (example, negative). The inner product is linear, so F(q, I_mix) = α F(q, i+) + (1 - α) F(q, I_hard)
    exactly, values and gradients alike (they flow to q, i+ and I_hard): the (B, N, d) mixed vectors of the
    spec's sketch are never built, which saves B·N·d memory and time (256 × 684 × 128 per step).

    Args:
        s_pos: (B, 1) q · i+.  s_neg: (B, M) q · pool with accidental hits at -inf.

    Returns:
        s_mix (B, N), -inf where fewer than N valid negatives exist, and the pool indices of I_hard (B, N).
    """
    n = min(cfg.n_hard, s_neg.size(1))
    hard = s_neg.detach().topk(n, dim=1).indices
    alpha = torch.rand(s_neg.size(0), n, generator=generator, device=s_neg.device, dtype=s_neg.dtype)
    alpha = cfg.alpha_low + (cfg.alpha_high - cfg.alpha_low) * alpha
    s_hard = s_neg.gather(1, hard)
    valid = torch.isfinite(s_hard)
    s_mix = alpha * s_pos + (1 - alpha) * torch.where(valid, s_hard, 0.0)
    return s_mix.masked_fill(~valid, float("-inf")), hard


def softmax_loss(
    q: torch.Tensor, pos: torch.Tensor, pool: torch.Tensor, hit: torch.Tensor, cfg: LossConfig,
    generator: torch.Generator | None = None, log_q: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossOutput:
    """-log softmax(F(q, i+)/τ) over {i+} ∪ pool ∪ I_mix (spec §4.1-§4.3).

    Args:
        q: (B, d) H_qu. pos: (B, d) positives. pool: (M, d) shared negatives.
        hit: (B, M) accidental hits (masked). cfg: τ, N, a, b.
        generator: for α (reproducible tests).
        log_q: ((B,), (M,)) log of the expected count in the pool of each positive and pool item: the sampling
            correction (not in the paper; ``LossConfig.logq``). Each logit F/τ becomes F/τ - log Q, so the
            softmax over a pool drawn as clicks are estimates the softmax over the whole catalogue, instead of
            penalising items for being clicked often (Yi et al., RecSys 2019). I_mix mixes corrected logits.
            ``logits`` are returned in F's units (F - τ log Q).

    Example (τ = 1, no I_mix; the positive and one negative score 1 and 0):
        >>> q, pos, pool = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> out = softmax_loss(q, pos, pool, torch.zeros(1, 1, dtype=torch.bool), LossConfig(tau=1, n_hard=0))
        >>> round(out.loss.item(), 4) == round(-torch.log(torch.tensor(torch.e / (torch.e + 1))).item(), 4)
        True
    """
    s_pos = (q * pos).sum(-1, keepdim=True)  # (B, 1)
    s_neg = q @ pool.T  # (B, M)
    if log_q is not None:
        s_pos, s_neg = s_pos - cfg.tau * log_q[0][:, None], s_neg - cfg.tau * log_q[1][None, :]
    s_neg = s_neg.masked_fill(hit, float("-inf"))
    parts, hard = [s_pos, s_neg], q.new_zeros(q.size(0), 0, dtype=torch.long)
    if cfg.n_hard > 0:
        s_mix, hard = mixed_hard_negatives(s_pos, s_neg, cfg, generator)
        parts.append(s_mix)
    logits = torch.cat(parts, dim=1)
    target = torch.zeros(q.size(0), dtype=torch.long, device=q.device)
    return LossOutput(F.cross_entropy(logits / cfg.tau, target), logits, hard)


def hinge_loss(
    q: torch.Tensor, pos: torch.Tensor, pool: torch.Tensor, hit: torch.Tensor, cfg: LossConfig
) -> LossOutput:
    """Pairwise hinge: mean over valid pool negatives of max(0, margin - F(q, i+) + F(q, i-))."""
    s_pos = (q * pos).sum(-1, keepdim=True)
    s_neg = q @ pool.T
    valid = ~hit
    per_pair = F.relu(cfg.margin - s_pos + s_neg) * valid
    loss = (per_pair.sum(1) / valid.sum(1).clamp(min=1)).mean()
    logits = torch.cat([s_pos, s_neg.masked_fill(hit, float("-inf"))], dim=1)
    return LossOutput(loss, logits, q.new_zeros(q.size(0), 0, dtype=torch.long))


def compute_loss(
    q: torch.Tensor, pos: torch.Tensor, pool: torch.Tensor, pos_ids: torch.Tensor, pool_ids: torch.Tensor,
    cfg: LossConfig, generator: torch.Generator | None = None,
    log_q: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossOutput:
    """The configured loss (``cfg.kind``) with accidental hits (pool id == positive id) masked; ``log_q``: the
    softmax's sampling correction (``softmax_loss``; the hinge loss has none)."""
    hit = accidental_hits(pos_ids, pool_ids)
    if cfg.kind == "hinge":
        return hinge_loss(q, pos, pool, hit, cfg)
    return softmax_loss(q, pos, pool, hit, cfg, generator, log_q)
