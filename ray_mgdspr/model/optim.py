"""Adagrad as TF configures it (spec §9.4) and global-norm clipping that also handles sparse gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ray_mgdspr.config import OptimConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Adagrad:
    """Adagrad(lr 0.1, initial accumulator 0.1): TF's defaults; PyTorch would start the accumulator at 0.

    Adagrad accepts the sparse gradients of the ID and token tables (``ModelConfig.sparse_ids``).
    """
    torch.sparse.check_sparse_tensor_invariants.disable()  # explicit: Adagrad builds sparse tensors each step
    return torch.optim.Adagrad(list(params), lr=cfg.lr, initial_accumulator_value=cfg.initial_accumulator)


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (TF ``clip_by_global_norm``).

    ``torch.nn.utils.clip_grad_norm_`` rejects sparse gradients; this coalesces them first, so rows hit
    several times in a batch count once with their summed gradient. Returns the norm before clipping.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> clip_grad_norm([p], 1.0).item(), [round(g, 4) for g in p.grad.tolist()]
        (5.0, [0.6, 0.8])
    """
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm
