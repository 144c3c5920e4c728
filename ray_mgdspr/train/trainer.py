"""Distributed MGDSPR training on Ray: the driver ``train`` and the per-worker loop ``train_loop_per_worker``.

Ray enters in four places, marked ``# Ray:`` below: the dataset shard each worker streams, DDP set-up
(``prepare_model``), ``ray.train.report`` with checkpoints, and ``get_checkpoint`` for resume. The step
itself is the Ray-free ``train_step`` of ``train/loop.py``.

The driver checks everything it can before any training starts (the world, the training examples, the
item ids, the cluster's resources) and writes the model bundle atomically at the end, with the run's
metrics as JSON beside it. Calling ``train`` again with the same ``run_name`` and ``storage_path`` resumes
from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_mgdspr.artifacts import write_text_atomic
from ray_mgdspr.config import ProjectConfig
from ray_mgdspr.data import schema
from ray_mgdspr.data.features import Featurizer, ItemContext
from ray_mgdspr.data.pipeline import (
    check_item_ids,
    examples_key,
    materialize_in_storage,
    search_event_files,
    training_dataset,
)
from ray_mgdspr.data.vocab import KINDS, Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import read_manifest, read_table, table_files
from ray_mgdspr.metrics import recall_at_k
from ray_mgdspr.model.bundle import BundleManifest, save_bundle
from ray_mgdspr.model.mgdspr import TwoTower, build_model
from ray_mgdspr.model.optim import learning_rate_at, model_optimizer, set_learning_rate
from ray_mgdspr.model.retrieval import CatalogueFeatures, retrieve
from ray_mgdspr.model.tables import resolve_buckets, world_max_ids
from ray_mgdspr.train.loop import extra_negatives, train_step

log = logging.getLogger(__name__)
STATE = "state.pt"  # model and optimiser tensors, loaded with torch.load(weights_only=True): no pickle
PROGRESS = "progress.json"  # epoch, step, history: plain JSON


class CheckpointError(ValueError):
    """A checkpoint that is refused: the message names the file and what is wrong with it."""


def save_checkpoint(d: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    progress: dict[str, Any]) -> None:
    """Write a checkpoint directory: tensors in ``state.pt``, progress in ``progress.json``. Nothing in it needs
    pickle to load (checkpoints live on shared storage; loading one must never run code)."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(d) / STATE)
    (Path(d) / PROGRESS).write_text(json.dumps(progress))


def load_checkpoint(d: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, progress)`` of a checkpoint directory written by ``save_checkpoint``.

    ``state.pt`` is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers
    only, so a planted pickle payload is refused instead of run.

    Raises:
        CheckpointError: a file is missing, or ``state.pt`` holds anything else (naming the file).
    """
    state_path, progress_path = Path(d) / STATE, Path(d) / PROGRESS
    if not progress_path.is_file():
        raise CheckpointError(f"{progress_path}: missing; the checkpoint was written by an older ray-mgdspr (which "
                              "pickled its progress) or is incomplete: start the run under a new run_name")
    try:
        tensors = torch.load(state_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing; the checkpoint is incomplete") from None
    except Exception as e:  # pickle.UnpicklingError for a payload; RuntimeError for a truncated file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{state_path}: refused: it holds more than tensors and plain containers, so loading "
                              f"it could run code (torch.load weights_only): {first}") from None
    if not isinstance(tensors, dict) or set(tensors) != {"model", "optimizer"}:
        raise CheckpointError(f"{state_path}: not a ray-mgdspr checkpoint (expected the keys model, optimizer)")
    try:
        progress = json.loads(progress_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{progress_path}: not valid JSON ({e})") from None
    return tensors, progress


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class TrainResult:
    bundle: Path
    manifest: BundleManifest
    metrics: list[dict[str, Any]]
    metrics_path: Path
    seconds: float


def run_dir(cfg: ProjectConfig) -> Path:
    return Path(cfg.train.storage_path).resolve() / cfg.train.run_name


def count_examples(world: str | Path, days: Iterable[int]) -> int:
    """(search, positive) pairs of ``days``: distinct clicked ∪ bought items per event, read day by day."""
    total = 0
    for f in table_files(world, schema.SEARCH_EVENTS, days):
        t = pq.read_table(f, columns=["clicked_item_ids", "bought_item_ids"])
        parts = [t[c].combine_chunks() for c in ("clicked_item_ids", "bought_item_ids")]
        event = np.concatenate([pc.list_parent_indices(p).to_numpy() for p in parts]).astype(np.int64)
        item = np.concatenate([pc.list_flatten(p).to_numpy() for p in parts]).astype(np.int64)
        total += len(np.unique((event << 40) + item))
    return total


def check_resources(cfg: ProjectConfig, cluster: dict[str, float]) -> None:
    """Refuse a run that asks for more than the cluster has (it would wait forever for resources)."""
    t, d = cfg.train, cfg.data
    per_worker = {"GPU": 1.0, **t.resources_per_worker} if t.use_gpu else t.resources_per_worker
    need = {k: v * t.num_workers for k, v in per_worker.items()}
    need["CPU"] = need.get("CPU", 0.0) + d.featurize_actors * d.featurize_cpus + max(1.0, d.read_cpus)
    for k, v in need.items():
        have = cluster.get(k, 0.0)
        if v > have + 1e-9:
            raise ValueError(
                f"train asks for {v:g} {k} (num_workers {t.num_workers} x resources_per_worker {t.resources_per_worker}"
                f" + featurizer actors {d.featurize_actors} x {d.featurize_cpus} CPU + 1 CPU to list files) "
                f"but the cluster has {have:g}; "
                "lower train.num_workers / train.resources_per_worker / data.featurize_* or add nodes"
            )


def _vocab(cfg: ProjectConfig, world: str, run: Path) -> Path:
    """The run's vocabulary: built once from the world, then reused so a resumed run keeps its ids."""
    path = run / "vocab.json"
    if not path.is_file():
        run.mkdir(parents=True, exist_ok=True)
        build_vocab_from_world(world, cfg.vocab).save(path)
    return path


def catalogue_features(world: str, vocab_path: str, cfg: ProjectConfig,
                       context: ItemContext | None = None) -> CatalogueFeatures:
    """Item-tower inputs of the whole catalogue (negatives are sampled from it; evaluation embeds it)."""
    featurizer = Featurizer(world, Vocabulary.load(vocab_path), cfg.features, history_days=[], context=context)
    return CatalogueFeatures.from_featurizer(featurizer, read_table(world, "items", columns=["item_id"])["item_id"])


def eval_features(world: str, vocab_path: str, cfg: ProjectConfig, days: list[int],
                  context: ItemContext | None = None) -> dict[str, Any]:
    """A seeded sample of ``cfg.train.eval_events`` held-out searches of ``days``, featurized, with their targets
    (clicked ∪ bought): ``{"features": ..., "targets": [...]}``, what :func:`evaluate` takes. Only the sampled
    users' histories are read (at the large preset a whole featurizer held 4.6 GB for 1,000 searches)."""
    featurizer = Featurizer(world, Vocabulary.load(vocab_path), cfg.features, history_days=[], context=context)
    events = featurizer.events(days)
    rng = np.random.default_rng(cfg.train.seed)
    rows = np.sort(rng.choice(events.num_rows, size=min(cfg.train.eval_events, events.num_rows), replace=False))
    events = events.take(rows)
    targets = [np.asarray(t, np.int64) for t in events["target_item_ids"].to_pylist()]
    featurizer = featurizer.for_users(events["user_id"].to_numpy())
    return {"features": featurizer(events), "targets": targets}


@ray.remote
def _catalogue_features(world: str, vocab_path: str, cfg: ProjectConfig, context: ItemContext) -> CatalogueFeatures:
    return catalogue_features(world, vocab_path, cfg, context)


@ray.remote
def _eval_features(world: str, vocab_path: str, cfg: ProjectConfig, days: list[int],
                   context: ItemContext) -> dict[str, Any]:
    return eval_features(world, vocab_path, cfg, days, context)


def _examples(cfg: ProjectConfig, world: str, days: list[int], vocab_path: Path,
              context: ItemContext) -> ray.data.Dataset:
    """The featurized training examples: streamed each epoch, or (``data.materialize``) featurized once here and
    kept in the object store or on the run's storage (``data.materialize_to``)."""
    ds = training_dataset(world, days, vocab_path, cfg.features, cfg.data, context=context,
                          share_dir=run_dir(cfg) / "featurizer")
    t, d = cfg.train, cfg.data
    rows = None
    if t.max_steps_per_epoch is not None:  # a capped epoch reads no more: featurize only those (not drained)
        rows = t.max_steps_per_epoch * t.batch_size * t.num_workers
        ds = ds.limit(rows)
    if not d.materialize:
        return ds
    where = d.materialize_to
    if where == "auto":
        where = "storage" if sum(n["Alive"] for n in ray.nodes()) > 1 else "object_store"
    t0 = time.perf_counter()
    if where == "storage":
        directory = run_dir(cfg) / "examples"
        ds = materialize_in_storage(ds, directory, examples_key(world, days, vocab_path, cfg.features, context, rows),
                                    cpus=d.read_cpus)
        log.info("featurized %d training examples once for %d epochs in %.1f s (Parquet in %s)",
                 ds.count(), t.epochs, time.perf_counter() - t0, directory)
        return ds
    ds = ds.materialize()
    log.info("featurized %d training examples once for %d epochs in %.1f s (%.1f MiB in the object store)",
             ds.count(), t.epochs, time.perf_counter() - t0, ds.size_bytes() / 2**20)
    return ds


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def train(cfg: ProjectConfig) -> TrainResult:
    """Train on ``cfg.train.world`` with Ray Train; returns the written bundle. Needs ``ray.init`` done (or
    connects to ``RAY_ADDRESS`` / starts a local Ray when called without one)."""
    t0 = time.perf_counter()
    t = cfg.train
    world = t.world
    manifest = read_manifest(world)
    if not manifest.train_days:
        raise ValueError(f"{world}: the manifest lists no train days")
    search_event_files(world, manifest.train_days + manifest.test_days)  # footers first: names a bad file + column
    n_examples = count_examples(world, manifest.train_days)
    if n_examples == 0:
        raise ValueError(f"{world}: no training examples (searches with a click or buy) on days {manifest.train_days}")
    check_item_ids(world, manifest.train_days + manifest.test_days)
    if not ray.is_initialized():
        ray.init()
    check_resources(cfg, ray.cluster_resources())

    run = run_dir(cfg)
    vocab_path = _vocab(cfg, world, run)
    vocab = Vocabulary.load(vocab_path)
    model_cfg = resolve_buckets(cfg.model, world_max_ids(world))
    if t.use_gpu:  # NCCL has no sparse all-reduce
        model_cfg = model_cfg.model_copy(update={"sparse_ids": False})
    cfg = cfg.model_copy(update={"model": model_cfg})
    steps = n_examples // (t.num_workers * cfg.train.batch_size)
    if steps == 0:
        raise ValueError(f"{world}: {n_examples} training examples are fewer than one global batch "
                         f"({t.num_workers} workers x batch {cfg.train.batch_size}); lower train.batch_size")
    steps = min(steps, t.max_steps_per_epoch or steps)
    # the price edges and popularity counts every featurizer reads, counted here once (a pass over the training
    # days' search logs) and shared: the featurizer actors, the catalogue and held-out features, the bundle
    context = ItemContext.of_world(world)
    context_ref = ray.put(context)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "vocab_sizes": {k: vocab.num_ids(k) for k in KINDS},
        "steps_per_epoch": steps,
        "catalogue": _catalogue_features.remote(world, str(vocab_path), cfg, context_ref),
        "eval": _eval_features.remote(world, str(vocab_path), cfg, manifest.test_days, context_ref),
    }
    log.info("training on %s: %d examples, %d steps per epoch per worker, %d epochs, %d workers (%s)",
             world, n_examples, steps, t.epochs, t.num_workers, manifest.label)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=t.resources_per_worker,
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=str(Path(t.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets={"train": _examples(cfg, world, manifest.train_days, vocab_path, context)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {t.run_name}: training ended without a checkpoint; see the log above")
    with result.checkpoint.as_directory() as d:
        tensors, state = load_checkpoint(d)
    model = build_model(model_cfg, loop_config["vocab_sizes"])
    model.load_state_dict(tensors["model"])
    metrics = state["history"]
    out = Path(t.out) if t.out else run / "bundle"
    metadata = {"data": manifest.label, "world": str(world), "run": t.run_name, "examples": n_examples,
                "epochs": state["epoch"], "steps": state["global_step"], "final": metrics[-1] if metrics else {},
                "resumed_at_steps": state.get("resumed_at", [])}
    bundle = save_bundle(out, model, vocab, cfg.features, cfg.loss, metadata=metadata, overwrite=True,
                         context=context)  # the edges and counts training's featurizers used
    metrics_path = out.parent / f"{out.name}.metrics.json"
    _write_json(metrics_path, {"version": bundle.version, "data": manifest.label, "history": metrics})
    return TrainResult(out, bundle, metrics, metrics_path, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------- per worker


def _restore(model: TwoTower, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model, optimiser and progress from the run's last checkpoint (Ray: ``get_checkpoint``), if any."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": []}
    with ckpt.as_directory() as d:
        tensors, state = load_checkpoint(d)
    model.load_state_dict(tensors["model"])
    optimizer.load_state_dict(tensors["optimizer"])
    state["resumed_at"] = [*state.get("resumed_at", []), state["global_step"]]  # restarts, kept in the bundle
    return state


def evaluate(model: TwoTower, catalogue: CatalogueFeatures, features: dict[str, np.ndarray], targets: list[np.ndarray],
             k: int, device: torch.device) -> float:
    """Recall@k of the held-out searches by exact search over the whole catalogue."""
    topk = retrieve(model, features, catalogue, k, device)
    model.train()
    return recall_at_k(topk, targets, k)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: stream the shard, step, checkpoint, evaluate (rank 0), report."""
    # The index section is not needed here; leaving it out keeps faiss (its own OpenMP/BLAS) out of the worker.
    cfg = ProjectConfig.model_validate({k: v for k, v in config["cfg"].items() if k != "index"})
    t, steps_per_epoch = cfg.train, config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed + rank)
    rng = np.random.default_rng(t.seed + 1000 * rank)
    generator = torch.Generator(device=device).manual_seed(t.seed + rank)

    model = build_model(cfg.model, config["vocab_sizes"])
    optimizer = model_optimizer(model, cfg.optim)
    progress = _restore(model, optimizer)
    ddp = ray.train.torch.prepare_model(model)  # Ray: DDP (gloo on CPU, nccl on GPU), moved to the device
    catalogue: CatalogueFeatures = ray.get(config["catalogue"])
    held_out = ray.get(config["eval"]) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")  # Ray: this worker's stream of featurized examples
    bs, n_neg = cfg.train.batch_size, extra_negatives(cfg.loss, cfg.train.batch_size * world_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16 and device.type == "cuda")

    for epoch in range(progress["epoch"], t.epochs):
        skip = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        losses, compute_s, wait_s, tick = [], 0.0, 0.0, time.perf_counter()
        batches = shard.iter_torch_batches(batch_size=bs, dtypes=torch.int64, device=device, drop_last=True,
                                           local_shuffle_buffer_size=cfg.data.shuffle_buffer,
                                           prefetch_batches=cfg.data.prefetch_batches)
        for i, batch in enumerate(batches):
            if i < skip or i >= steps_per_epoch:  # resumed: already trained; past the end: drain the stream
                tick = time.perf_counter()
                continue
            wait_s += time.perf_counter() - tick
            start = time.perf_counter()
            negatives = {k: torch.as_tensor(v, device=device) for k, v in catalogue.sample(n_neg, rng).items()}
            set_learning_rate(optimizer, learning_rate_at(cfg.optim, progress["global_step"],
                                                          t.epochs * steps_per_epoch, global_batch=bs * world_size))
            with autocast:
                m = train_step(ddp, optimizer, batch, negatives, cfg.loss, cfg.optim.clip_norm, generator,
                               catalogue)
            losses.append(m["loss"])
            compute_s += time.perf_counter() - start
            progress["global_step"] += 1
            step_in_epoch = i + 1
            if step_in_epoch % t.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                state = {**progress, "epoch": epoch, "step_in_epoch": step_in_epoch}
                _report({"epoch": epoch + 1, "step": progress["global_step"], "loss": m["loss"]}, model, optimizer,
                        state, rank)
            if rank == 0 and progress["global_step"] % 10 == 0:
                print(f"epoch {epoch + 1}/{t.epochs} step {step_in_epoch}/{steps_per_epoch} loss {m['loss']:.4f}")
            tick = time.perf_counter()
        trained = max(len(losses), 1)
        metrics = {"epoch": epoch + 1, "step": progress["global_step"], "loss": float(np.mean(losses or [np.nan])),
                   "rows_per_s_per_worker": bs * trained / max(compute_s + wait_s, 1e-9),
                   "compute_s": compute_s, "data_wait_s": wait_s, "torch_threads": torch.get_num_threads()}
        if rank == 0:
            metrics[f"recall@{t.eval_k}"] = evaluate(model, catalogue, held_out["features"], held_out["targets"],
                                                     t.eval_k, device)
            metrics["chance"] = min(t.eval_k / len(catalogue), 1.0)  # Recall@K of a random ranking
            print(f"epoch {epoch + 1}/{t.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        progress["history"] = [*progress["history"], metrics]
        _report(metrics, model, optimizer, {**progress, "epoch": epoch + 1, "step_in_epoch": 0}, rank)


def _report(metrics: dict[str, Any], model: TwoTower, optimizer: torch.optim.Optimizer, progress: dict[str, Any],
            rank: int) -> None:
    """Ray: every rank reports the same number of times; rank 0 attaches the checkpoint (model, optimiser,
    progress), which Ray copies to the run's storage before ``report`` returns."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="mgdspr-ckpt-") as d:
        save_checkpoint(d, model, optimizer, progress)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
