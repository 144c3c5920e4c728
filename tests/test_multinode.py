"""Multi-node behaviour on a simulated cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes, each a
raylet of its own on this machine; synthetic data).

Node resources are custom, as on a real cluster: the head offers ``head``, workers offer ``worker``. The
project's resource configs point the stages at them (``train.resources_per_worker``, ``index.build_resources``,
``serve.<deployment>.resources``), and the placement knobs spread them (``train.placement_strategy``,
``index.build_strategy``, ``serve.<deployment>.max_replicas_per_node``). Nodes are removed without warning
(``allow_graceful=False``: a crashed machine) and added back as an autoscaler would.

Everything shares one cluster and one training run (a node is lost in the middle of it), so the module runs in
a few minutes."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray (see shared/notes/RAY.md)

import gc
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import ray
from helpers import RAY_TEST_ENV, free_port, wait_for, wait_for_state_api
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from ray_mgdspr.config import ProjectConfig, load_preset
from ray_mgdspr.data.pipeline import materialize_in_storage
from ray_mgdspr.index.build import build_index
from ray_mgdspr.index.embed import embed_catalogue
from ray_mgdspr.model.bundle import load_bundle
from ray_mgdspr.runtime import HAPROXY_ENV, THROUGHPUT_ENV
from ray_mgdspr.serve.app import AppArgs, start
from ray_mgdspr.serve.client import EndpointError, call
from ray_mgdspr.train.trainer import TrainResult, run_dir, train

WORKER = {"num_cpus": 2, "resources": {"worker": 1}, "object_store_memory": 300 * 1024**2}
STEPS, EPOCHS, CHECKPOINT_EVERY = 30, 2, 10  # world_en has ~32 batches per worker and epoch: the cap binds

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first test also sets up the cluster and trains


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head {CPU 2, head 1} + 2 workers {CPU 2, worker 1}; ports of its own so it runs beside any other Ray."""
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_TEST_ENV.items():
            mp.setenv(key, value)
        # Serve as the cluster specs run it (Ray's Python proxy, no throughput-optimised mode), whatever an earlier
        # module of this process set for its local Ray (runtime.serve_environment)
        mp.setenv(HAPROXY_ENV, "0")
        mp.setenv(THROUGHPUT_ENV, "0")
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"head": 1}, "include_dashboard": True, "gcs_server_port": free_port(),
            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 300 * 1024**2})
        try:
            for _ in range(2):
                c.add_node(**WORKER)
            c.wait_for_nodes()
            ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
            wait_for_state_api()
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            yield c
        finally:
            serve.shutdown()
            ray.shutdown()
            c.shutdown()


def worker_node_ids(c: Cluster) -> set[str]:
    return {n.node_id for n in c.worker_nodes}


def actor_nodes(class_name: str, state: str = "ALIVE") -> list[str]:
    """Node ids of the actors of a class (one entry per actor)."""
    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000, timeout=30,
                         filters=[("class_name", "=", class_name), ("state", "=", state)])
    return [a.node_id for a in actors]


def config(tmp: Path, world: Path) -> ProjectConfig:
    cfg = load_preset("demo")
    data = cfg.model_dump(mode="json")
    data["train"].update(world=str(world), storage_path=str(tmp / "train"), run_name="multinode", epochs=EPOCHS,
                         max_steps_per_epoch=STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_events=100,
                         num_workers=2, placement_strategy="SPREAD", max_failures=2,
                         resources_per_worker={"CPU": 0.5, "worker": 0.5})
    data["embed"]["out"] = str(tmp / "embeddings")
    data["index"].update(out=str(tmp / "index"), shards=2, build_resources={"worker": 0.5}, build_strategy="SPREAD")
    on_workers = {"num_cpus": 0.25, "resources": {"worker": 0.1}, "max_replicas_per_node": 1}
    # HeadOnly: Serve's proxies share their port through SO_REUSEPORT, so on one machine the kernel would hand
    # connections to the lost node's proxy too (real nodes have addresses of their own behind a load balancer)
    data["serve"].update(store=str(tmp / "store.sqlite"), port=free_port(), watch_current_s=0,
                         proxy_location="HeadOnly", placement="per_stage",  # shard deployments spread over nodes
                         request_timeout_s=5, drain_s=0,
                         ingress={"num_cpus": 0.25, "resources": {"head": 0.1}, "min_replicas": 1, "max_replicas": 1},
                         encoder={**on_workers, "min_replicas": 2, "max_replicas": 2},
                         shard={**on_workers, "min_replicas": 2, "max_replicas": 2})
    return ProjectConfig.model_validate(data)


@dataclass
class TrainingRun:
    cfg: ProjectConfig
    result: TrainResult
    spread_over: list[str]  # nodes of the DDP workers before the loss
    workers: set[str]  # the worker nodes then
    lost: str  # the node removed mid-training
    checkpoints_at_loss: int


def registered_checkpoints(run: Path) -> int:
    """Checkpoints Ray Train has registered, i.e. that a restarted worker group restores from. A checkpoint_*
    directory alone may still be being copied; Ray writes this snapshot once the checkpoint is registered."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return 0
    return len(snapshot.get("checkpoint_results", []))


@pytest.fixture(scope="module")
def training(cluster: Cluster, world_en: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingRun:
    """Train with 2 DDP workers spread over the worker nodes; once a checkpoint exists, kill a node that hosts a
    worker and add a fresh one (as an autoscaler would). Ray Train restarts the group from the checkpoint."""
    cfg = config(tmp_path_factory.mktemp("multinode"), world_en)
    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = train(cfg)
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    run = run_dir(cfg)
    deadline = time.monotonic() + 240
    while not registered_checkpoints(run) and thread.is_alive():
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    spread = actor_nodes("RayTrainWorker")
    workers = worker_node_ids(cluster)
    lost = next(n for n in cluster.worker_nodes if n.node_id in spread)
    n_checkpoints = registered_checkpoints(run)
    assert thread.is_alive(), "training ended before a node could be lost: raise STEPS"
    cluster.remove_node(lost, allow_graceful=False)
    cluster.add_node(**WORKER)
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish within 400 s of the node loss"
    if "error" in outcome:
        raise outcome["error"]
    return TrainingRun(cfg, outcome["result"], spread, workers, lost.node_id, n_checkpoints)


def test_training_spreads_over_the_worker_nodes(training: TrainingRun) -> None:
    assert len(training.spread_over) == 2
    assert set(training.spread_over) == training.workers  # one DDP worker on each worker node, none on the head


def test_training_recovers_from_a_lost_node_from_its_checkpoint(training: TrainingRun) -> None:
    assert training.checkpoints_at_loss >= 1
    _, _, manifest = load_bundle(training.result.bundle)
    meta = manifest.metadata
    resumed = meta["resumed_at_steps"]
    assert resumed, "the worker group restarted without restoring the checkpoint"
    # restored from a reported checkpoint (every CHECKPOINT_EVERY steps and at each epoch end), not from scratch
    assert all(0 < s < EPOCHS * STEPS and s % CHECKPOINT_EVERY == 0 for s in resumed), resumed
    # no step lost or repeated: the run ends where one uninterrupted run would
    assert meta["epochs"] == EPOCHS and meta["steps"] == EPOCHS * STEPS
    # the examples featurized once live on the run's storage, not in the object store, on a cluster of several
    # nodes (data.materialize_to: auto): blocks an actor made on the lost node could not be rebuilt
    assert [p.name for p in (run_dir(training.cfg) / "examples").iterdir() if list(p.glob("*.parquet"))]
    assert [h["epoch"] for h in training.result.metrics] == list(range(1, EPOCHS + 1))


def test_examples_kept_on_storage_survive_the_node_that_made_them(cluster: Cluster, tmp_path: Path) -> None:
    """Blocks an actor pool made, kept with ``materialize_in_storage``, read back whole after the node whose actor
    made them is lost. (Kept with ``Dataset.materialize()`` instead, the read fails with ``ActorDiedError`` /
    ``ReferenceCountingAssertionError`` once the lazy dataset is gone: Ray must restart the actor to rebuild the
    lost blocks, and Ray Data has freed its constructor arguments. docs/training.md, "Feeding the workers".)"""
    class AddOne:  # an actor-pool map function, as the featurizer is (local: pickled by value for the workers)
        def __init__(self, k: int) -> None:
            self.k = k

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"id": batch["id"] + self.k}

    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1}, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()
    rows = 2_000_000  # 8 blocks of 2 MB: kept in the node's object store, not inlined in the driver's
    ds = ray.data.range(rows, override_num_blocks=8).map_batches(
        AddOne, fn_constructor_kwargs={"k": 1}, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25,
        resources={"doomed": 0.1}, batch_format="numpy")
    kept = materialize_in_storage(ds, tmp_path / "examples", "key")
    del ds
    gc.collect()
    cluster.remove_node(doomed, allow_graceful=False)
    # read once the cluster knows the node is gone, as Ray Train's restarted workers do: until then Ray Data may
    # still place the read's footer-reading actors on it (seen once: ActorDiedError in FooterReader)
    wait_for(lambda: not any(n["NodeID"] == doomed.node_id and n["Alive"] for n in ray.nodes()), 120,
             "the lost node to be marked dead")
    total = sum(int(b["id"].sum()) for b in kept.iter_batches(batch_size=None, batch_format="numpy"))
    assert total == rows * (rows + 1) // 2


@dataclass
class Release:
    cfg: ProjectConfig
    version: str
    builders: list[str]  # node of each shard-building task
    workers: set[str]


@pytest.fixture(scope="module")
def release(cluster: Cluster, training: TrainingRun, world_en: Path) -> Release:
    cfg = training.cfg
    embeddings = embed_catalogue(world_en, training.result.bundle, cfg.embed, overwrite=True)
    manifest = build_index(world_en, embeddings.path, cfg.index)
    def builders() -> list[str]:
        tasks = list_tasks(address=ray.get_runtime_context().gcs_address, limit=1000, timeout=30, detail=True,
                           filters=[("func_or_class_name", "=", "_build_shard"), ("state", "=", "FINISHED")])
        return [t.node_id for t in tasks]

    # task events reach the State API a second or so after the task ends
    wait_for(lambda: len(builders()) >= cfg.index.shards, 30, "every shard task in the State API")
    return Release(cfg, manifest.version, builders(), worker_node_ids(cluster))


def test_index_shards_are_built_on_different_nodes(release: Release) -> None:
    assert len(release.builders) == release.cfg.index.shards == 2
    assert len(set(release.builders)) == 2 and set(release.builders) <= release.workers


@dataclass
class Endpoint:
    url: str
    version: str
    app: str


@pytest.fixture(scope="module")
def endpoint(release: Release) -> Endpoint:
    s = release.cfg.serve
    overrides = {**s.model_dump(mode="json"), "index_root": release.cfg.index.out, "world": release.cfg.train.world}
    cfg = start(AppArgs(serve=overrides))
    return Endpoint(f"http://127.0.0.1:{cfg.port}", release.version, f"{cfg.app_name}-{release.version}")


def replica_nodes(app: str, deployment: str) -> list[str]:
    return actor_nodes(f"ServeReplica:{app}:{deployment}")


def test_serve_replicas_spread_over_nodes(cluster: Cluster, endpoint: Endpoint) -> None:
    workers = worker_node_ids(cluster)
    for deployment in ("encoder", "shard-0", "shard-1"):
        nodes = replica_nodes(endpoint.app, deployment)
        assert len(nodes) == 2 and set(nodes) == workers, (deployment, nodes, workers)
    assert call(endpoint.url, "/v1/version")["version"] == endpoint.version


@dataclass
class Load:
    """Clients asking the endpoint in a loop; each answer recorded as (time, HTTP status or None, seconds)."""

    url: str
    answers: list[tuple[float, int | None, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                call(self.url, "/v1/retrieve", {"query": "dress", "k": 10, "filter": False}, timeout=30)
                status: int | None = 200
            except EndpointError as e:
                status = e.status
                self.errors.append(str(e))
            self.answers.append((t0, status, time.monotonic() - t0))

    def after(self, t: float) -> list[tuple[float, int | None, float]]:
        return [a for a in self.answers if a[0] >= t]


def test_serve_recovers_from_a_lost_node_under_load(cluster: Cluster, endpoint: Endpoint) -> None:
    load = Load(endpoint.url)
    clients = [threading.Thread(target=load.client, daemon=True) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: len(load.answers) >= 20, 60, "20 answers before the node loss")
        lost_at = time.monotonic()
        before = [a for a in load.answers if a[0] < lost_at]
        assert all(status == 200 for _, status, _ in before), before
        victim = next(iter(cluster.worker_nodes))
        cluster.remove_node(victim, allow_graceful=False)

        # the surviving replicas take the traffic: a run of 20 answers in a row, all 200
        def recovered() -> bool:
            after = load.after(lost_at)
            return len(after) >= 20 and all(status == 200 for _, status, _ in after[-20:])

        wait_for(recovered, 90, "answers all 200 again after the node loss")
        failed = [a for a in load.after(lost_at) if a[1] != 200]
        print(f"node loss under load: {len(before)} answers before, {len(failed)} failed after the loss (statuses "
              f"{sorted({a[1] for a in failed}, key=str)}); all 200 again within "
              f"{load.after(lost_at)[-20][0] - lost_at:.1f} s")
        # what failed in between failed fast and retryable, never hung or 500
        assert all(status == 503 for _, status, _ in failed), (failed, load.errors[-5:])

        # a fresh node arrives: Serve brings every deployment back to its 2 replicas, one per node
        cluster.add_node(**WORKER)
        workers = worker_node_ids(cluster)

        def restored() -> bool:
            return all(set(replica_nodes(endpoint.app, d)) == workers and len(replica_nodes(endpoint.app, d)) == 2
                       for d in ("encoder", "shard-0", "shard-1"))

        def state() -> dict:
            app = serve.status().applications[endpoint.app]
            return {"workers": workers, "app": app.status, **{
                d: (app.deployments[d].replica_states, replica_nodes(endpoint.app, d))
                for d in ("encoder", "shard-0", "shard-1")}}

        # Serve must first see the lost replicas die (health checks), then start new ones on the new node
        wait_for(restored, 240, "2 replicas per deployment on the 2 live worker nodes", state)
        healed_at = time.monotonic()
        wait_for(lambda: len(load.after(healed_at)) >= 20, 60, "20 answers after the replicas were restored")
        assert all(status == 200 for _, status, _ in load.after(healed_at))
    finally:
        load.stop.set()
        for c in clients:
            c.join(timeout=60)
    # the version manager may have been on the lost node: its successor takes the serving version over
    wait_for(lambda: call(endpoint.url, "/v1/version")["version"] == endpoint.version, 60,
             "the version manager to report the serving version")
