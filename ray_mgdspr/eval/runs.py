"""One evaluation run (Ray-free): a variant (baseline, full model, ablation, sweep point) and a seed -> metrics.

The variants of the report and what each changes (spec §6.3, §9.11):

========================  =====================================================================================
name                      what
========================  =====================================================================================
``oracle_aware``          the simulator's ground truth: P(click) of every item for this user (``oracle.py``)
``oracle_agnostic``       the same for a random searcher of the intent's category: the ceiling without the user
``oracle_grade``          the ground-truth grade alone (exact, partial, irrelevant), popularity breaking ties
``bm25``                  BM25 over titles (bm25s), untrained
``minilm``                all-MiniLM-L6-v2 zero-shot (packaged weights), untrained
``dnn_hinge``             the DNN two-tower (mean-pooled features + MLP) with the pairwise hinge loss
``mgdspr``                the full model: MGS, behaviour attention, [CLS] fusion, softmax, τ = 2, I_mix
``no_mgs``                -mgs: q_seg alone as the query's single token
``no_trm``                -trm: concatenation + MLP instead of the [CLS] self-attention fusion
``tau1``                  τ = 1
``no_imix``               no mixed hard negatives (N = 0)
``no_personalise``        query only: no behaviour attention
``no_popularity``         the item tower without the items' impression and click levels (``item_popularity``)
``no_logq``               the softmax without the sampling correction (``loss.logq``)
``item_ids``              with the paper's item ID rows in both towers (``model.item_ids``)
``mgdspr_hinge``          the full model trained with the hinge loss (the convergence curves)
``tau=X``, ``alpha=A-B``  sweep points: the full model with τ = X, or α ~ U(A, B)
========================  =====================================================================================

Trained variants run ``train.loop.fit_local`` on the world's training days and record a learning curve; their
top-K is an exact search over the whole catalogue (model error apart from ANN error). For the full model the
same vectors are also put into real index versions (``index.shards``, one per ANN factory) and searched with
``IndexReader``: the recall an ANN index loses is the exact recall minus the index's.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_mgdspr.config import IndexConfig, LossConfig, ModelConfig, OptimConfig
from ray_mgdspr.data.simulator.oracle import ORACLES, Oracle
from ray_mgdspr.data.vocab import KINDS
from ray_mgdspr.eval.baselines import bm25_topk, minilm_topk
from ray_mgdspr.eval.evalset import EvalSet
from ray_mgdspr.index.search import IndexReader
from ray_mgdspr.index.shards import METADATA_SCHEMA, build_index_version, split_by_shard
from ray_mgdspr.metrics import recall_at_k, topk_overlap
from ray_mgdspr.model.mgdspr import TwoTower, build_model
from ray_mgdspr.model.retrieval import exact_topk, item_vectors, query_vectors
from ray_mgdspr.model.tables import resolve_buckets, world_max_ids
from ray_mgdspr.train.loop import fit_local

log = logging.getLogger(__name__)

ORACLE_LABELS = {"oracle_aware": "oracle: user-aware propensity × exposure",
                 "oracle_agnostic": "oracle: user-agnostic propensity × exposure",
                 "oracle_grade": "oracle: ground-truth grade only"}
UNTRAINED = ("bm25", "minilm", *ORACLES)
LABELS = {
    **ORACLE_LABELS,
    "bm25": "BM25 (titles)", "minilm": "MiniLM zero-shot", "dnn_hinge": "DNN two-tower + hinge",
    "mgdspr": "MGDSPR (full)", "no_mgs": "-mgs", "no_trm": "-trm", "tau1": "τ = 1", "no_imix": "no I_mix",
    "no_personalise": "no personalisation", "no_popularity": "no item popularity", "no_logq": "no logQ correction",
    "item_ids": "with item IDs (the paper's)",
    "mgdspr_hinge": "MGDSPR + hinge loss",
}
_CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # variant -> (ModelConfig, LossConfig) overrides
    "dnn_hinge": ({"kind": "dnn"}, {"kind": "hinge"}),
    "mgdspr": ({}, {}),
    "no_mgs": ({"mgs": False}, {}),
    "no_trm": ({"trm": False}, {}),
    "tau1": ({}, {"tau": 1.0}),
    "no_imix": ({}, {"n_hard": 0}),
    "no_personalise": ({"personalise": False}, {}),
    "no_popularity": ({"item_popularity": False}, {}),
    "no_logq": ({}, {"logq": False}),
    "item_ids": ({"item_ids": True}, {}),
    "mgdspr_hinge": ({}, {"kind": "hinge"}),
}


def tau_variant(tau: float) -> str:
    return f"tau={tau:g}"


def alpha_variant(a: float, b: float) -> str:
    return f"alpha={a:g}-{b:g}"


def variant_configs(name: str, model: ModelConfig, loss: LossConfig) -> tuple[ModelConfig, LossConfig]:
    """The model and loss configs of a trained variant, from the project's (the full model's) configs."""
    if m := re.fullmatch(r"tau=([0-9.]+)", name):
        return model, loss.model_copy(update={"tau": float(m[1])})
    if m := re.fullmatch(r"alpha=([0-9.]+)-([0-9.]+)", name):
        return model, loss.model_copy(update={"alpha_low": float(m[1]), "alpha_high": float(m[2])})
    if name not in _CHANGES:
        raise ValueError(f"unknown variant {name!r}; choose from {[*UNTRAINED, *_CHANGES]}, tau=X or alpha=A-B")
    model_change, loss_change = _CHANGES[name]
    full = ModelConfig.model_validate({**model.model_dump(), **model_change})  # validated, unlike model_copy
    return full, LossConfig.model_validate({**loss.model_dump(), **loss_change})


@dataclass(frozen=True)
class RunSpec:
    """One run: which world, which variant, which seed, how long and what to measure."""

    lang: str
    variant: str
    seed: int
    steps: int
    ks: tuple[int, ...]
    pass_ks: tuple[int, ...]
    curve_every: int
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    batch_size: int  # examples per step (train.batch_size)
    ann: tuple[IndexConfig, ...] = field(default=())  # index versions to measure the ANN recall loss on

    @property
    def trained(self) -> bool:
        return self.variant not in UNTRAINED


def run_one(spec: RunSpec, data: EvalSet) -> dict[str, Any]:
    """Train (if the variant is trained) and score one run; returns a JSON-ready record."""
    t0 = time.perf_counter()
    k = max(spec.ks)
    record: dict[str, Any] = {"lang": spec.lang, "variant": spec.variant, "seed": spec.seed}
    if spec.variant == "bm25":
        topk = bm25_topk(data.items["item_id"].to_numpy(), data.items["title_words"], data.query_words, k)
    elif spec.variant in ORACLES:
        topk = Oracle.from_world(data.world).topk(data.events, spec.variant, k)
    elif spec.variant == "minilm":
        topk = minilm_topk(data.items["item_id"].to_numpy(), data.items["title"].to_pylist(),
                           data.events["query"].to_pylist(), k)
    else:
        topk, extra = _train_and_retrieve(spec, data)
        record.update(extra)
    record["metrics"] = data.score(topk, list(spec.ks), list(spec.pass_ks))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _train_and_retrieve(spec: RunSpec, data: EvalSet) -> tuple[np.ndarray, dict[str, Any]]:
    model_cfg, loss_cfg = variant_configs(spec.variant, spec.model, spec.loss)
    torch.manual_seed(spec.seed)
    model = build_model(resolve_buckets(model_cfg, world_max_ids(data.world)),
                        {kind: data.featurizer.vocab.num_ids(kind) for kind in KINDS})
    k, curve, losses = max(spec.ks), [], []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        losses.append(metrics["loss"])
        if step % spec.curve_every == 0 or step == spec.steps:
            topk = retrieve_exact(model, data, k)[0]
            point = {"step": step, "loss": float(np.mean(losses[-spec.curve_every:]))}
            point.update({f"recall@{kk}": recall_at_k(topk, data.targets, kk) for kk in spec.ks})
            grades = data.grades(topk[:, :min(spec.ks)])
            point[f"p_good@{min(spec.ks)}"] = float((grades >= 1).mean())
            curve.append(point)

    run = fit_local(data.featurizer, data.featurizer.vocab, data.world, data.manifest.train_days, model_cfg,
                    loss_cfg, spec.optim, steps=spec.steps, batch_size=spec.batch_size, seed=spec.seed,
                    on_step=on_step, model=model)
    topk, queries, items = retrieve_exact(model, data, k)
    extra: dict[str, Any] = {"curve": curve, "train_seconds": round(run.seconds, 1)}
    if spec.ann:
        extra["ann"] = ann_loss(spec, data, topk, queries, items)
    return topk, extra


def retrieve_exact(model: TwoTower, data: EvalSet, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k ids (E, k) over the whole catalogue, and the query (E, d) and item (N, d) float32 vectors
    (kept for the ANN comparison)."""
    queries = query_vectors(model, data.features).numpy()
    items = item_vectors(model, data.catalogue).numpy()
    return exact_topk(queries, items, data.catalogue.item_id, k), queries, items


def ann_loss(spec: RunSpec, data: EvalSet, exact: np.ndarray, queries: np.ndarray,
             items: np.ndarray) -> list[dict[str, Any]]:
    """Recall@K of real index versions of these vectors (one per factory) against the exact top-K."""
    from ray_mgdspr.data.world import read_table

    k = max(spec.ks)
    metadata = read_table(data.world, "items", columns=METADATA_SCHEMA.names)
    out = []
    with tempfile.TemporaryDirectory(prefix="mgdspr-eval-index-") as root:
        for cfg in spec.ann:
            version = re.sub(r"[^A-Za-z0-9]+", "-", f"eval-{spec.variant}-s{spec.seed}-{cfg.factory}")
            parts = split_by_shard(items, data.catalogue.item_id, metadata, cfg.shards)
            build_index_version(root, version, parts, cfg, version, "in-memory model (evaluation)", items.shape[1])
            reader = IndexReader(Path(root) / version, "faiss-cpu", nprobe=cfg.nprobe, ef_search=cfg.ef_search)
            ann = reader.search(queries, k)[1]
            row: dict[str, Any] = {"factory": cfg.factory, "shards": cfg.shards, "nprobe": cfg.nprobe,
                                   "ef_search": cfg.ef_search}
            for kk in spec.ks:
                exact_r, ann_r = recall_at_k(exact, data.targets, kk), recall_at_k(ann, data.targets, kk)
                row[f"recall@{kk}"] = ann_r
                row[f"recall_lost@{kk}"] = exact_r - ann_r
                row[f"overlap@{kk}"] = topk_overlap(exact, ann, kk)
            out.append(row)
    return out
