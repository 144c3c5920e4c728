"""Optimisers (spec §9.4) and global-norm clipping that also handles sparse gradients.

Two kinds (``optim.kind``):

* ``adagrad``: Adagrad as TF configures it (lr 0.1, initial accumulator 0.1), the paper's choice, tuned for
  tens of millions of steps.
* ``adam``: Adam on the dense layers and SparseAdam on the tables with sparse gradients
  (``model.sparse_ids``), the usual split of recommender stacks (dense Adam, sparse embedding optimiser). Its
  per-coordinate step is bounded by lr, so a run of a few hundred steps does not throw the randomly initialised
  attention layers around the way Adagrad's first steps do (docs/model.md, "Convergence").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ray_mgdspr.config import OptimConfig


class CombinedOptimizer:
    """Several optimisers over disjoint parameters, stepped, zeroed and checkpointed as one.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(3, 2, sparse=True), torch.nn.Linear(2, 1))
        >>> opt = model_optimizer(model, OptimConfig(kind="adam"))
        >>> [type(o).__name__ for o in opt.optimizers]
        ['Adam', 'SparseAdam']
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"checkpoint holds {len(saved)} optimiser states, this model needs "
                             f"{len(self.optimizers)} (was it saved with another optim.kind or model.sparse_ids?)")
        for o, s in zip(self.optimizers, saved, strict=True):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                   sparse_params: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Optimizer | CombinedOptimizer:
    """The optimiser ``cfg.kind`` names over ``params``.

    Args:
        params: every trainable parameter.
        sparse_params: those whose gradients are sparse (the ``sparse=True`` tables); only ``adam`` needs to
            know them (SparseAdam takes them, Adam the rest). Adagrad accepts both kinds of gradient.
    """
    params = [p for p in params if p.requires_grad]
    if cfg.kind == "adagrad":
        torch.sparse.check_sparse_tensor_invariants.disable()  # explicit: Adagrad builds sparse tensors each step
        return torch.optim.Adagrad(params, lr=cfg.learning_rate, initial_accumulator_value=cfg.initial_accumulator)
    sparse = {id(p) for p in sparse_params}
    dense = [p for p in params if id(p) not in sparse]
    tables = [p for p in params if id(p) in sparse]
    parts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=cfg.learning_rate)] if dense else []
    if tables:
        parts.append(torch.optim.SparseAdam(tables, lr=cfg.learning_rate))
    return CombinedOptimizer(parts)


def model_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | CombinedOptimizer:
    """``make_optimizer`` over a model's parameters, its sparse-gradient tables found by their modules."""
    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    return make_optimizer(model.parameters(), cfg, sparse)


def learning_rate_at(cfg: OptimConfig, step: int, total: int, global_batch: int | None = None) -> float:
    """The learning rate of the 0-based ``step`` of a ``total``-step run: ``cfg.warmup_steps`` of linear warm-up
    to the rate scaled to ``global_batch`` (``cfg.scaled_learning_rate``), then ``cfg.schedule`` over the rest.

    A function of the step alone, so a run resumed from a checkpoint continues the same curve.

    Example:
        >>> cfg = OptimConfig(lr=1.0, schedule="cosine", final_lr_ratio=0.1)
        >>> [round(learning_rate_at(cfg, s, 3), 3) for s in range(3)]
        [1.0, 0.55, 0.1]
        >>> cfg = OptimConfig(lr=1.0, schedule="constant", warmup_steps=4, lr_scaling="linear")
        >>> [learning_rate_at(cfg, s, 10, global_batch=512) for s in (0, 1, 3, 4, 9)]
        [0.5, 1.0, 2.0, 2.0, 2.0]
    """
    lr = cfg.scaled_learning_rate(global_batch)
    if step < cfg.warmup_steps:
        return lr * (max(step, 0) + 1) / cfg.warmup_steps
    step, total = step - cfg.warmup_steps, total - cfg.warmup_steps
    if cfg.schedule == "constant" or total <= 1:
        return lr
    progress = min(max(step, 0) / (total - 1), 1.0)
    final = lr * cfg.final_lr_ratio
    return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer | CombinedOptimizer, lr: float) -> None:
    """Set every parameter group's learning rate (dense and sparse optimisers alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


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
