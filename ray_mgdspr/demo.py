"""The README's main job, end to end on an embedded default.

For now: simulate a small world, validate it, build the vocabulary, train MGDSPR on it with Ray Train
(2 DDP workers, Ray Data streaming the logs, Recall@K on the held-out test day per epoch), embed the
catalogue with a Ray Data actor pool, build and verify a sharded Faiss index version, and answer a few
held-out searches from the index (later stages put the index behind Ray Serve). Every number it reports
comes from a synthetic world and is labelled so.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ray_mgdspr.config import ProjectConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.simulator.simulate import Progress, simulate
from ray_mgdspr.data.validate import ValidationReport, validate_world
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import WorldManifest, read_manifest, read_table
from ray_mgdspr.eval.metrics import recall_at_k
from ray_mgdspr.index.build import build_index
from ray_mgdspr.index.embed import EmbedResult, embed_catalogue
from ray_mgdspr.index.manifest import IndexManifest
from ray_mgdspr.index.search import IndexReader
from ray_mgdspr.index.shards import verify_index
from ray_mgdspr.model.bundle import load_bundle
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.runtime import connect_ray
from ray_mgdspr.train.trainer import TrainResult, train

log = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """A demo stage produced something unusable; the message says which stage and why."""


@dataclass
class DemoResult:
    out: Path
    world: Path
    vocab_path: Path
    manifest: WorldManifest
    report: ValidationReport
    vocab: Vocabulary
    training: TrainResult
    embeddings: EmbedResult
    index: IndexManifest
    index_recall: float  # Recall@K of held-out searches answered from the index
    k: int
    examples: list[SearchExample]


@dataclass
class SearchExample:
    query: str
    results: list[tuple[str, bool]]  # (title, clicked or bought by the user), best first


def run_demo(cfg: ProjectConfig, out: str | Path, progress: Progress | None = None) -> DemoResult:
    """Run every stage that exists so far into ``out`` (replacing an earlier demo there)."""
    out = Path(out)
    world = out / "world"
    manifest = simulate(cfg.simulate, world, overwrite=True, progress=progress)
    report = validate_world(world)
    if not report.ok:
        raise DemoError("the simulated world failed validation:\n" + "\n".join(map(str, report.problems)))
    vocab = build_vocab_from_world(world, cfg.vocab)
    vocab_path = out / "vocab.json"
    vocab.save(vocab_path)
    run = {"world": str(world), "storage_path": str(out / "train"), "out": str(out / "model")}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=run)})
    shutil.rmtree(out / "train" / cfg.train.run_name, ignore_errors=True)  # a fresh run, not a resume
    connect_ray(cfg.ray)
    training = train(cfg)
    embeddings = embed_catalogue(world, training.bundle, cfg.embed.model_copy(update={"out": str(out / "embeddings")}),
                                 overwrite=True)
    index_cfg = cfg.index.model_copy(update={"out": str(out / "index")})
    shutil.rmtree(out / "index", ignore_errors=True)  # versions are immutable: the demo starts a fresh root
    index = build_index(world, embeddings.path, index_cfg)
    problems = verify_index(out / "index" / index.version)
    if problems:
        raise DemoError("the index failed verification:\n" + "\n".join(problems))
    reader = IndexReader(out / "index" / index.version, index_cfg.backend)
    k = cfg.train.eval_k
    recall, examples = answer_held_out(world, training.bundle, reader, k, cfg.train.eval_events)
    log.info("demo artifacts in %s", out)
    return DemoResult(out, world, vocab_path, manifest, report, vocab, training, embeddings, index, recall, k,
                      examples)


@torch.inference_mode()
def answer_held_out(world: Path, bundle: Path, reader: IndexReader, k: int, n: int,
                    shown: int = 3) -> tuple[float, list[SearchExample]]:
    """Recall@k of ``n`` held-out test-day searches answered from the index, and ``shown`` of them in full."""
    model, vocab, manifest = load_bundle(bundle, towers=("query",))
    featurizer = Featurizer(world, vocab, manifest.features)
    events = featurizer.events(read_manifest(world).test_days).slice(0, n)
    h_qu = model.query_tower(as_tensors(featurizer(events))).numpy()
    _, topk = reader.search(h_qu, k)
    targets = [np.asarray(t, np.int64) for t in events["target_item_ids"].to_pylist()]
    items = read_table(world, "items", columns=["item_id", "title"])
    title = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist(), strict=True))
    examples = [SearchExample(events["query"][i].as_py(), [(title[j], j in set(targets[i])) for j in topk[i, :5]])
                for i in range(min(shown, events.num_rows))]
    return recall_at_k(topk, targets, k), examples
