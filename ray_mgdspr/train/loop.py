"""The plain-PyTorch training step and a single-process training loop (no Ray). Catalogue features and exact
retrieval, which training and evaluation share, are ``model/retrieval.py``'s.

One step (spec §4): H_qu and H_item of a batch of (search, positive) examples; a shared negative pool of the
batch's positives (gathered from every worker when data-parallel) plus uniformly sampled catalogue items;
the configured loss; Adagrad with global-norm clipping. The Ray Train loop runs the same ``train_step``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ray_mgdspr.config import LossConfig, ModelConfig, OptimConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.vocab import KINDS, Vocabulary
from ray_mgdspr.data.world import read_table
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.model.loss import compute_loss
from ray_mgdspr.model.mgdspr import TwoTower, build_model
from ray_mgdspr.model.optim import clip_grad_norm, learning_rate_at, model_optimizer, set_learning_rate
from ray_mgdspr.model.retrieval import CatalogueFeatures
from ray_mgdspr.model.tables import resolve_buckets, world_max_ids

log = logging.getLogger(__name__)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-sized tensors whose backward sends each worker the gradient of its own rows,
    summed over every worker's loss (DDP then averages parameter gradients as usual)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.size(0) // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def shared_positives(pos: torch.Tensor, pos_ids: torch.Tensor, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's positives, from every worker when data-parallel and ``gather`` (gradients flow back).

    Workers must hold equal batch sizes (the trainer drops the last partial batch).
    """
    if not (gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return pos, pos_ids
    ids = [torch.empty_like(pos_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(ids, pos_ids.contiguous())
    return _GatherWithGrad.apply(pos), torch.cat(ids)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
    negatives: dict[str, torch.Tensor], loss_cfg: LossConfig, clip_norm: float,
    generator: torch.Generator | None = None, catalogue: CatalogueFeatures | None = None,
) -> dict[str, float]:
    """One optimisation step on ``batch``; ``negatives`` are the sampled pool items (item features).

    ``model`` is a :class:`TwoTower`, or one wrapped in DistributedDataParallel. ``catalogue``: what the
    negatives were sampled from; with ``loss_cfg.logq`` its click counts give the sampling correction.

    Returns loss, grad norm (before clipping), in-pool accuracy (positive scored above every negative).
    """
    model.train()
    q, pos, sampled = model(batch, negatives)  # (B, d), (B, d), (M, d)
    pool, pool_ids = shared_positives(pos, batch["item_id"], loss_cfg.gather_positives)
    positives, uniform = pool.size(0), sampled.size(0)
    pool, pool_ids = torch.cat([pool, sampled]), torch.cat([pool_ids, negatives["item_id"]])
    log_q = None
    if loss_cfg.logq and loss_cfg.kind == "softmax" and catalogue is not None:
        log_q = tuple(torch.as_tensor(catalogue.log_expected_count(ids.cpu().numpy(), positives, uniform),
                                      dtype=q.dtype, device=q.device) for ids in (batch["item_id"], pool_ids))
    out = compute_loss(q, pos, pool, batch["item_id"], pool_ids, loss_cfg, generator, log_q)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    norm = clip_grad_norm(model.parameters(), clip_norm)
    optimizer.step()
    acc = (out.logits.argmax(1) == 0).float().mean()
    return {"loss": out.loss.item(), "grad_norm": norm.item(), "pool_acc": acc.item(), "pool": pool.size(0)}


def extra_negatives(loss_cfg: LossConfig, global_batch: int) -> int:
    """Uniform samples per step so that |pool| = max(pool_size, batch positives)."""
    return max(0, loss_cfg.pool_size - global_batch)


@dataclass
class LocalRun:
    """What ``fit_local`` returns: the trained model and its per-step metrics."""

    model: TwoTower
    vocab: Vocabulary
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def fit_local(
    featurizer: Featurizer, vocab: Vocabulary, world: str | Path, train_days: list[int],
    model_cfg: ModelConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig, steps: int, batch_size: int,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None, model: TwoTower | None = None,
) -> LocalRun:
    """Train for ``steps`` steps of ``batch_size`` examples in this process, reshuffling every epoch.

    ``model``: train this model in place (the caller keeps a handle, e.g. to evaluate it from ``on_step``);
    default a fresh ``build_model`` of ``model_cfg`` sized to the world.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    if model is None:
        model = build_model(resolve_buckets(model_cfg, world_max_ids(world)), {k: vocab.num_ids(k) for k in KINDS})
    optimizer = model_optimizer(model, optim_cfg)
    examples = featurizer.examples(train_days)
    if examples.num_rows == 0:
        raise ValueError(f"{world}: no training examples (searches with a click or buy) on days {train_days}")
    items = read_table(world, "items", columns=["item_id"])["item_id"]
    catalogue = CatalogueFeatures.from_featurizer(featurizer, items)
    run, t0, step = LocalRun(model, vocab), time.perf_counter(), 0
    bs = min(batch_size, examples.num_rows)
    while step < steps:
        order = rng.permutation(examples.num_rows)
        for start in range(0, len(order) - bs + 1, bs):
            batch = as_tensors(featurizer(examples.take(order[start : start + bs])))
            negatives = as_tensors(catalogue.sample(extra_negatives(loss_cfg, bs), rng))
            set_learning_rate(optimizer, learning_rate_at(optim_cfg, step, steps, global_batch=bs))
            metrics = train_step(model, optimizer, batch, negatives, loss_cfg, optim_cfg.clip_norm, generator,
                                 catalogue)
            run.history.append(metrics)
            step += 1
            if on_step:
                on_step(step, metrics)
            if step >= steps:
                break
    run.seconds = time.perf_counter() - t0
    return run
