"""The README's main job, end to end on an embedded default.

Simulate a small world, validate it, build the vocabulary, train MGDSPR on it with Ray Train (2 DDP
workers, Ray Data streaming the logs, Recall@K on the held-out test day per epoch), embed the catalogue
with a Ray Data actor pool, build and verify a sharded Faiss index version, measure Recall@K of held-out
searches answered from the index, then serve that version with Ray Serve and ask the live HTTP endpoint
held-out searches (with the searching user's histories from the behaviour store), a lexical-channel
query, and a query before and after posting that user's clicks. Every number it reports comes from a
synthetic world and is labelled so.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from ray import serve

from ray_mgdspr.config import ProjectConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.simulator.simulate import Progress, simulate
from ray_mgdspr.data.validate import ValidationReport, validate_world
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import WorldManifest, read_manifest, read_table
from ray_mgdspr.eval.metrics import recall_at_k
from ray_mgdspr.eval.report import demo_table
from ray_mgdspr.index.build import build_index
from ray_mgdspr.index.embed import EmbedResult, embed_catalogue
from ray_mgdspr.index.manifest import IndexManifest
from ray_mgdspr.index.search import IndexReader
from ray_mgdspr.index.shards import verify_index
from ray_mgdspr.model.bundle import load_bundle
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.runtime import connect_ray
from ray_mgdspr.serve.app import AppArgs
from ray_mgdspr.serve.app import start as start_serve
from ray_mgdspr.serve.client import call
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
    serving: ServingReport
    evaluation: str  # Markdown table: the demo model against BM25 on held-out searches


@dataclass
class SearchExample:
    query: str
    user_id: int
    results: list[tuple[str, bool]]  # (title, clicked or bought by the user), best first
    filtered: int  # hits the relevance filter removed
    key_terms: list[str]
    latency_ms: dict[str, float]


@dataclass
class ServingReport:
    url: str
    version: str
    examples: list[SearchExample]
    lexical: dict  # one response with the lexical channel on
    before_events: list[int]  # a user's top items before and after posting clicks on ``clicked``
    clicked: list[int]
    after_events: list[int]


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
    recall = answer_held_out(world, training.bundle, reader, k, cfg.train.eval_events)
    serving = serve_and_ask(cfg, out, world)
    evaluation = demo_table(world, training.bundle, out / "index" / index.version, k=k)
    log.info("demo artifacts in %s", out)
    return DemoResult(out, world, vocab_path, manifest, report, vocab, training, embeddings, index, recall, k,
                      serving, evaluation)


@torch.inference_mode()
def answer_held_out(world: Path, bundle: Path, reader: IndexReader, k: int, n: int) -> float:
    """Recall@k of ``n`` held-out test-day searches answered from the index."""
    model, vocab, manifest = load_bundle(bundle, towers=("query",))
    featurizer = Featurizer(world, vocab, manifest.features)
    events = featurizer.events(read_manifest(world).test_days).slice(0, n)
    h_qu = model.query_tower(as_tensors(featurizer(events))).numpy()
    _, topk = reader.search(h_qu, k)
    return recall_at_k(topk, [np.asarray(t, np.int64) for t in events["target_item_ids"].to_pylist()], k)


def serve_and_ask(cfg: ProjectConfig, out: Path, world: Path, shown: int = 3) -> ServingReport:
    """Serve the demo's index version on Ray Serve and ask the live endpoint over HTTP (then shut it down)."""
    token = secrets.token_hex(16)
    with socket.socket() as s:  # a free port: the demo must not fail because 8000 is taken
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = AppArgs(serve={"index_root": str(out / "index"), "world": str(world), "port": port, "token": token,
                          "store": str(out / "store" / "behaviours.sqlite")})
    shutil.rmtree(out / "store", ignore_errors=True)  # rebuilt from this world's logs
    served = start_serve(args)
    url = f"http://127.0.0.1:{served.port}"
    try:
        events = read_table(world, "search_events", days=read_manifest(world).test_days,
                            columns=["user_id", "ts", "query", "clicked_item_ids", "bought_item_ids"])
        events = events.filter(pc.greater(pc.list_value_length(events["clicked_item_ids"]), 0)).slice(0, shown)
        examples = []
        for e in events.to_pylist():
            ts = int(e["ts"].timestamp() * 1000)
            r = call(url, "/v1/retrieve", {"query": e["query"], "user_id": e["user_id"], "k": 5, "ts": ts})
            targets = set(e["clicked_item_ids"]) | set(e["bought_item_ids"])
            examples.append(SearchExample(e["query"], e["user_id"], [(i["title"], i["item_id"] in targets)
                                                                     for i in r["data"]],
                                          r["filtered"], r["key_terms"], r["latency_ms"]))
        first = events.to_pylist()[0]
        lexical = call(url, "/v1/retrieve", {"query": first["query"], "k": 3, "channels": ["embedding", "lexical"],
                                               "filter": False})
        ask = {"query": first["query"], "user_id": first["user_id"], "k": 5, "filter": False}
        before = [i["item_id"] for i in call(url, "/v1/retrieve", ask)["data"]]
        now = int(time.time() * 1000)
        # the user clicks what the lexical channel found: those clicks become the newest items of R^u
        clicked = [i["item_id"] for i in lexical["data"] if "embedding" not in i["channels"]][:3] or before[-2:]
        clicks = [{"user_id": first["user_id"], "item_id": i, "action": "click", "ts": now - 1000 + n}
                  for n, i in enumerate(clicked)]
        call(url, "/v1/events", {"behaviours": clicks}, token)
        after = [i["item_id"] for i in call(url, "/v1/retrieve", ask)["data"]]
        version = call(url, "/v1/retrieve", {"query": first["query"], "k": 1})["version"]
    finally:
        serve.shutdown()
    return ServingReport(url, version, examples, lexical, before, clicked, after)
