"""Ray Train end to end on a small simulated world (synthetic data), on a real local Ray with DDP over gloo:
two workers learn to retrieve, a run resumes from its checkpoint, a killed worker is recovered from, and bad
inputs or impossible resource requests fail before any training starts, writing no bundle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from ray_mgdspr.config import ProjectConfig, load_preset
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.schema import day_file_name
from ray_mgdspr.data.vocab import KINDS
from ray_mgdspr.data.world import SYNTHETIC_LABEL, read_manifest, read_table
from ray_mgdspr.metrics import recall_at_k
from ray_mgdspr.model.bundle import load_bundle
from ray_mgdspr.model.mgdspr import build_model
from ray_mgdspr.model.retrieval import CatalogueFeatures, retrieve, targets_of
from ray_mgdspr.train import trainer
from ray_mgdspr.train.trainer import TrainResult, run_dir, train

pytestmark = pytest.mark.usefixtures("ray_runtime")

K = 50  # the demo preset's eval_k: 50 of world_en's 1,500 items, chance 0.033
LEARN_EPOCHS = 4  # 2 workers x batch 64, 32 steps per epoch (Adam: 4 epochs clear the bars below with room)
MIN_GAIN = 0.10  # trained minus untrained Recall@50
MIN_OVER_CHANCE = 4.0  # trained Recall@50 at least this many times chance (0.133)


def make_config(world: Path, storage: Path, run_name: str, **train_overrides: Any) -> ProjectConfig:
    """The demo preset on ``world``, with runs under ``storage``; validated like the CLI's overrides."""
    cfg = load_preset("demo")
    fields = {**cfg.train.model_dump(), "world": str(world), "storage_path": str(storage), "run_name": run_name,
              **train_overrides}
    return cfg.model_copy(update={"train": cfg.train.model_validate(fields)})


def checkpoints(cfg: ProjectConfig) -> list[Path]:
    """The run's checkpoint directories (not Ray's ``checkpoint_manager_snapshot.json``)."""
    return sorted(p for p in run_dir(cfg).glob("checkpoint_*") if p.is_dir())


def check_result(result: TrainResult, cfg: ProjectConfig, epochs: int, steps_per_epoch: int) -> None:
    """The bundle loads, says SYNTHETIC and the run's size; the metrics file has one full entry per epoch."""
    assert result.bundle == run_dir(cfg) / "bundle"
    manifest = load_bundle(result.bundle)[2]
    meta = manifest.metadata
    assert meta["data"] == SYNTHETIC_LABEL and "SYNTHETIC" in meta["data"]
    assert meta["epochs"] == epochs and meta["steps"] == epochs * steps_per_epoch
    assert meta["run"] == cfg.train.run_name and meta["examples"] > 0
    history = result.metrics
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert [h["step"] for h in history] == [steps_per_epoch * e for e in range(1, epochs + 1)]
    for h in history:
        assert h["loss"] > 0 and h["rows_per_s_per_worker"] > 0 and 0 <= h[f"recall@{K}"] <= 1, h
    saved = json.loads(result.metrics_path.read_text())
    assert result.metrics_path == run_dir(cfg) / "bundle.metrics.json"
    assert saved["version"] == manifest.version and saved["data"] == SYNTHETIC_LABEL
    assert saved["history"] == history


# ------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_training_learns(world_en: Path, tmp_path: Path) -> None:
    """2 DDP workers on world_en: the bundle retrieves the test day's clicks and buys far better than the
    same model untrained (synthetic data)."""
    cfg = make_config(world_en, tmp_path, "learn", epochs=LEARN_EPOCHS, eval_events=1000, checkpoint_every=1000)
    workers_before = count_train_workers()
    result = train(cfg)
    # a worker that crashes is replaced from the last checkpoint (max_failures): the run still learns, but say so
    workers_after = count_train_workers()
    restarts = "?" if None in (workers_before, workers_after) else (
        (workers_after - workers_before) // cfg.train.num_workers - 1)
    steps = result.metrics[0]["step"]
    assert steps >= 25, "world_en should give about 32 steps per worker and epoch"
    check_result(result, cfg, LEARN_EPOCHS, steps)

    model, vocab, manifest = load_bundle(result.bundle)
    featurizer = Featurizer(world_en, vocab, manifest.features)
    events = featurizer.events(read_manifest(world_en).test_days)
    items = read_table(world_en, "items", columns=["item_id"])["item_id"].to_numpy()
    catalogue = CatalogueFeatures.from_featurizer(featurizer, items)
    targets = targets_of(events)

    def recall(m: torch.nn.Module) -> float:
        return recall_at_k(retrieve(m, featurizer(events), catalogue, K), targets, K)

    torch.manual_seed(cfg.train.seed)  # what rank 0 builds (and DDP broadcasts) before the first step
    untrained = build_model(manifest.model, {k: vocab.num_ids(k) for k in KINDS})
    before, after, chance = recall(untrained), recall(model), K / len(catalogue)
    history = result.metrics
    print(f"Recall@{K} untrained {before:.3f}, trained {after:.3f}, chance {chance:.3f}, per epoch "
          f"{[round(h[f'recall@{K}'], 3) for h in history]} ({events.num_rows} test events, {LEARN_EPOCHS} epochs "
          f"x {steps} steps, {result.seconds:.0f}s, {restarts} worker-group restarts; SYNTHETIC data)")
    assert before < 2 * chance
    assert after > before + MIN_GAIN and after > MIN_OVER_CHANCE * chance
    assert history[-1]["loss"] < history[0]["loss"]
    # every test event is evaluated (eval_events > events): the run's last Recall@K is the bundle's
    assert history[-1][f"recall@{K}"] == pytest.approx(after, abs=0.01)


# -------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_continues_from_checkpoint(world_en: Path, tmp_path: Path) -> None:
    """Same run_name + storage_path: epoch 1 comes from the checkpoint, only epoch 2 is trained. The first run
    featurizes its examples once (``data.materialize``, the default) into Parquet on the run's storage
    (``data.materialize_to: storage``, what a cluster of several nodes gets), the second streams them through
    the featurizer (the other feeding mode, on the same checkpoint)."""
    steps = 8
    common = dict(max_steps_per_epoch=steps, eval_events=200, checkpoint_every=1000, num_to_keep=3)
    cfg1 = make_config(world_en, tmp_path, "resume", epochs=1, **common)
    assert cfg1.data.materialize and cfg1.data.materialize_to == "auto"
    cfg1 = cfg1.model_copy(update={"data": cfg1.data.model_copy(update={"materialize_to": "storage"})})
    first = train(cfg1)
    check_result(first, cfg1, 1, steps)
    after_first = checkpoints(cfg1)
    assert len(after_first) == 1
    [examples] = (run_dir(cfg1) / "examples").iterdir()
    assert list(examples.glob("*.parquet"))

    cfg2 = make_config(world_en, tmp_path, "resume", epochs=2, **common)
    assert cfg2.data.materialize
    cfg2 = cfg2.model_copy(update={"data": cfg2.data.model_copy(update={"materialize": False})})
    second = train(cfg2)
    check_result(second, cfg2, 2, steps)
    assert second.metrics[0] == first.metrics[0], "epoch 1 was trained again"
    assert second.metrics[1]["step"] == 2 * steps
    new = sorted(set(checkpoints(cfg2)) - set(after_first))
    assert set(after_first) <= set(checkpoints(cfg2)) and len(new) == 1, "the second run reported more than epoch 2"
    assert second.manifest.version != first.manifest.version


# ----------------------------------------------------------------------------------- worker failure


def train_worker_actors(*filters: tuple[str, str, str], timeout: float = 10) -> list[Any]:
    """RayTrainWorker actors of this cluster (the State API; addressed, since other clusters may run here)."""
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, timeout=timeout,
                       filters=[("class_name", "=", "RayTrainWorker"), *filters])


def alive_train_worker_pids() -> list[int]:
    """Process ids of this cluster's live Ray Train workers: the State API (needs the dashboard), else the
    ``ray::RayTrainWorker`` children of this cluster's raylets (found by their socket path, from ``ray.nodes()``)."""
    try:
        return sorted(a.pid for a in train_worker_actors(("state", "=", "ALIVE")) if a.pid)
    except Exception:  # no dashboard: walk the process tree of our own raylets
        sockets = {n["RayletSocketName"] for n in ray.nodes() if n["Alive"]}
        pids = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in cmd and any(f"--raylet_socket_name={s}" in cmd for s in sockets):
                pids += [c.pid for c in p.children() if " ".join(c.cmdline()).startswith("ray::RayTrainWorker")]
        return sorted(pids)


def count_train_workers() -> int | None:
    """RayTrainWorker actors this cluster ever started (alive or dead); None without the State API."""
    for _ in range(3):  # the dashboard answers slowly on a busy machine
        try:
            return len(train_worker_actors(timeout=20))
        except Exception:
            time.sleep(1)
    return None


class KillWorkerAfterCheckpoint(threading.Thread):
    """Waits for the run's first checkpoint (mid-epoch), then SIGKILLs one training worker process."""

    def __init__(self, run: Path, num_workers: int, timeout_s: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.run_path, self.num_workers, self.timeout_s = run, num_workers, timeout_s
        self.done = threading.Event()
        self.killed: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            while not self.done.is_set() and time.monotonic() < deadline:
                if any(p.is_dir() for p in self.run_path.glob("checkpoint_*")):
                    pids = alive_train_worker_pids()
                    if len(pids) == self.num_workers:
                        os.kill(pids[-1], signal.SIGKILL)
                        self.killed = pids[-1]
                        return
                time.sleep(0.05)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.mark.slow
def test_recovers_from_a_killed_worker(world_en: Path, tmp_path: Path) -> None:
    """A worker process killed mid-epoch: Ray Train restarts the worker group from the last checkpoint
    (max_failures=1) and the run finishes with every epoch in its metrics."""
    cfg = make_config(world_en, tmp_path, "failure", epochs=2, max_steps_per_epoch=16, checkpoint_every=5,
                      eval_events=200, max_failures=1)
    workers_before = count_train_workers()
    killer = KillWorkerAfterCheckpoint(run_dir(cfg), cfg.train.num_workers)
    killer.start()
    try:
        result = train(cfg)
    finally:
        killer.done.set()
        killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert killer.killed is not None, "no checkpoint appeared while the workers were alive"
    assert not psutil.pid_exists(killer.killed) or psutil.Process(killer.killed).status() == psutil.STATUS_ZOMBIE
    # the group was started twice: the first (one worker killed) and its replacement
    if workers_before is not None:
        assert count_train_workers() - workers_before == 2 * cfg.train.num_workers
    check_result(result, cfg, 2, 16)  # the global step continues from the mid-epoch checkpoint: 16, then 32


# ------------------------------------------------------------------------------------ pre-flight errors


def copy_world(world: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world, tmp_path / "world"))


def rewrite_day(world: Path, day: int, change: Callable[[pa.Table], pa.Table]) -> None:
    path = world / "search_events" / day_file_name(day)
    pq.write_table(change(pq.read_table(path)), path)


def _set_list_column(t: pa.Table, name: str, values: list[list[int]]) -> pa.Table:
    field = t.schema.field(name)
    return t.set_column(t.schema.get_field_index(name), field, pa.array(values, type=field.type))


def no_clicks_or_buys(world: Path) -> None:
    for day in read_manifest(world).train_days:
        rewrite_day(world, day, lambda t: _set_list_column(
            _set_list_column(t, "clicked_item_ids", [[]] * t.num_rows), "bought_item_ids", [[]] * t.num_rows))


def unknown_clicked_item(world: Path) -> None:
    def change(t: pa.Table) -> pa.Table:
        clicked = t["clicked_item_ids"].to_pylist()
        clicked[0] = [*clicked[0], 987_654_321]
        return _set_list_column(t, "clicked_item_ids", clicked)

    rewrite_day(world, read_manifest(world).train_days[2], change)


def drop_column(name: str) -> Callable[[Path], None]:
    def change(world: Path) -> None:
        rewrite_day(world, read_manifest(world).train_days[2], lambda t: t.drop_columns([name]))

    return change


BAD_WORLDS = {
    "no-positives": (no_clicks_or_buys, {}, [r"no training examples"]),
    "unknown-item": (unknown_clicked_item, {}, [r"987654321", r"clicked_item_ids", r"items table", r"day-03\.parquet"]),
    "no-clicked-column": (drop_column("clicked_item_ids"), {},
                          [r"day-03\.parquet", r"missing column 'clicked_item_ids'"]),
    "no-ts-column": (drop_column("ts"), {}, [r"day-03\.parquet", r"missing column 'ts'"]),
    "gpu": (None, {"use_gpu": True}, [r"GPU", r"cluster has 0"]),
    "too-many-cpus": (None, {"num_workers": 16}, [r"CPU", r"num_workers 16", r"cluster has 4"]),
}


@pytest.mark.parametrize("case", list(BAD_WORLDS))
def test_preflight_errors(case: str, world_en: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each problem is a ValueError naming its cause, raised before a trainer exists; nothing is written."""
    spoil, overrides, patterns = BAD_WORLDS[case]
    world = world_en
    if spoil is not None:
        world = copy_world(world_en, tmp_path)
        spoil(world)
    if case == "too-many-cpus" and ray.cluster_resources().get("CPU", 0) != 4:
        patterns = patterns[:2]  # a reused runtime of another size
    cfg = make_config(world, tmp_path / "runs", case, **overrides)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a TorchTrainer was built before the pre-flight checks failed")

    monkeypatch.setattr(trainer, "TorchTrainer", no_training)
    with pytest.raises(ValueError) as e:
        train(cfg)
    for pattern in patterns:
        assert e.match(pattern), (pattern, str(e.value))
    assert not (run_dir(cfg) / "bundle").exists() and not checkpoints(cfg)
