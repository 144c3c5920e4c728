"""The README's main job, end to end on an embedded default.

For now: simulate a small world, validate it, build the vocabulary, train MGDSPR on it with Ray Train
(2 DDP workers, Ray Data streaming the logs) and report Recall@K on the held-out test day per epoch
(later stages extend this with embed -> index -> serve -> query). Every number it reports comes from a
synthetic world and is labelled so.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ray_mgdspr.config import ProjectConfig
from ray_mgdspr.data.simulator.simulate import Progress, simulate
from ray_mgdspr.data.validate import ValidationReport, validate_world
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import WorldManifest
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
    log.info("demo artifacts in %s", out)
    return DemoResult(out, world, vocab_path, manifest, report, vocab, training)
