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

import datetime as dt
import logging
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from ray import serve

from ray_mgdspr.artifacts import write_text_atomic
from ray_mgdspr.config import ProjectConfig, SimulateConfig, config_to_yaml
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.simulator.simulate import Progress, simulate
from ray_mgdspr.data.validate import ValidationReport, validate_world
from ray_mgdspr.data.vocab import Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import WorldManifest, read_manifest, read_table
from ray_mgdspr.eval.report import demo_table
from ray_mgdspr.index.build import build_index
from ray_mgdspr.index.embed import EmbedResult, embed_catalogue
from ray_mgdspr.index.manifest import IndexManifest
from ray_mgdspr.index.search import IndexReader
from ray_mgdspr.index.shards import verify_index
from ray_mgdspr.metrics import recall_at_k
from ray_mgdspr.model.bundle import item_context, load_bundle
from ray_mgdspr.model.retrieval import query_vectors, targets_of
from ray_mgdspr.runtime import connect_ray, free_port
from ray_mgdspr.serve.app import AppArgs
from ray_mgdspr.serve.app import start as start_serve
from ray_mgdspr.serve.client import call
from ray_mgdspr.serve.realtime import followups, store_before_test_day
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
    serving_config: Path  # the project config that serves this demo again: `mgdspr serve -c <it>`


@dataclass
class SearchExample:
    query: str
    user_id: int
    results: list[tuple[str, bool]]  # (title, clicked or bought by the user), best first
    filtered: int  # hits the relevance filter removed
    key_terms: list[str]
    latency_ms: dict[str, float]
    fallback_added: int = 0  # items the lexical fallback added because the filter left the page short
    relaxed_to: list[str] | None = None  # no item had every key term: the page was filled with these (product type)


@dataclass
class ServingReport:
    url: str
    version: str
    examples: list[SearchExample]
    lexical: dict  # one response with the lexical channel on
    # a held-out follow-up search replayed at its logged ts: its user's top items before and after posting the
    # session's earlier clicks (``clicked``, logged timestamps before the request) to POST /v1/events
    before_events: list[int]
    clicked: list[int]
    after_events: list[int]
    followup_query: str = ""
    followup_user: int = -1
    target_rank_before: int | None = None  # best rank of the follow-up's clicked/bought items in the top
    target_rank_after: int | None = None  # ``events_k`` (None: not in it)
    events_k: int = 50
    followups_asked: int = 0  # follow-ups replayed the same way (the aggregate, so the change is not chance)
    recall_before: float = 0.0  # their Recall@events_k before / after their sessions' earlier clicks were posted
    recall_after: float = 0.0
    moved_up: int = 0  # follow-ups whose best target rank improved / worsened
    moved_down: int = 0
    events_summary: str = ""  # one line saying all of the above (SYNTHETIC)


def run_demo(cfg: ProjectConfig, out: str | Path, progress: Progress | None = None) -> DemoResult:
    """Run every stage that exists so far into ``out`` (replacing an earlier demo there).

    ``progress(what, done, total)`` hears the simulator's progress and, per later stage, ``(stage, 0, 1)`` when it
    starts and ``(stage, 1, 1)`` when it is done.
    """
    out = Path(out)
    world = out / "world"
    tell = progress or (lambda _what, _done, _total: None)

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        tell(name, 0, 1)
        yield
        tell(name, 1, 1)

    manifest = simulate(dated(cfg.simulate), world, overwrite=True, progress=progress)
    with stage("validate"):
        report = validate_world(world)
    if not report.ok:
        raise DemoError("the simulated world failed validation:\n" + "\n".join(map(str, report.problems)))
    with stage("vocabulary"):
        vocab = build_vocab_from_world(world, cfg.vocab)
        vocab_path = out / "vocab.json"
        vocab.save(vocab_path)
    run = {"world": str(world), "storage_path": str(out / "train"), "out": str(out / "model")}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=run)})
    shutil.rmtree(out / "train" / cfg.train.run_name, ignore_errors=True)  # a fresh run, not a resume
    with stage("train"):
        connect_ray(cfg.ray)
        training = train(cfg)
    with stage("embed"):
        embeddings = embed_catalogue(world, training.bundle,
                                     cfg.embed.model_copy(update={"out": str(out / "embeddings")}), overwrite=True)
    index_cfg = cfg.index.model_copy(update={"out": str(out / "index")})
    shutil.rmtree(out / "index", ignore_errors=True)  # versions are immutable: the demo starts a fresh root
    with stage("index"):
        index = build_index(world, embeddings.path, index_cfg)
        problems = verify_index(out / "index" / index.version)
    if problems:
        raise DemoError("the index failed verification:\n" + "\n".join(problems))
    reader = IndexReader(out / "index" / index.version, index_cfg.backend)
    k = cfg.train.eval_k
    recall = answer_held_out(world, training.bundle, reader, k, cfg.train.eval_events)
    with stage("serve"):
        serving = serve_and_ask(cfg, out, world)
    with stage("evaluate"):
        evaluation = demo_table(world, training.bundle, out / "index" / index.version, k=k)
    config_path = write_serving_config(cfg.model_copy(update={"index": index_cfg}), out)
    log.info("demo artifacts in %s", out)
    return DemoResult(out, world, vocab_path, manifest, report, vocab, training, embeddings, index, recall, k,
                      serving, evaluation, config_path)


def write_serving_config(cfg: ProjectConfig, out: Path) -> Path:
    """``out/config.yaml``: the demo's config with absolute paths to what it built (world, model, index, behaviour
    store), so that ``mgdspr serve -c out/config.yaml`` serves the demo's version again (written atomically)."""
    root = out.resolve()
    serve_cfg = cfg.serve.model_copy(update={"index_root": str(root / "index"), "world": str(root / "world"),
                                             "store": str(root / "store" / "behaviours.sqlite")})
    cfg = cfg.model_copy(update={
        "simulate": dated(cfg.simulate), "serve": serve_cfg,
        "train": cfg.train.model_copy(update={k: str(Path(getattr(cfg.train, k)).resolve())
                                              for k in ("world", "storage_path", "out")}),
        "index": cfg.index.model_copy(update={"out": str(root / "index")}),
        "embed": cfg.embed.model_copy(update={"out": str(root / "embeddings")})})
    path = out / "config.yaml"
    return write_text_atomic(path, "# written by `mgdspr demo`: serve this demo again with `mgdspr serve -c "
                             + str(path) + "`\n" + config_to_yaml(cfg))


def dated(sim: SimulateConfig, today: dt.date | None = None) -> SimulateConfig:
    """The demo's world with its test day today (unless the config sets ``base_date`` itself), so that a request
    without ``ts`` (the wall clock) finds the user's histories recent, as a live endpoint would."""
    if "base_date" in sim.model_fields_set:
        return sim
    today = today or dt.date.today()
    return sim.model_copy(update={"base_date": today - dt.timedelta(days=sim.train_days)})


@torch.inference_mode()
def answer_held_out(world: Path, bundle: Path, reader: IndexReader, k: int, n: int) -> float:
    """Recall@k of ``n`` held-out test-day searches answered from the index."""
    model, vocab, manifest = load_bundle(bundle, towers=("query",))
    featurizer = Featurizer(world, vocab, manifest.features, context=item_context(bundle, manifest, world))
    events = featurizer.events(read_manifest(world).test_days).slice(0, n)
    _, topk = reader.search(query_vectors(model, featurizer(events)).numpy(), k)
    return recall_at_k(topk, targets_of(events), k)


def serve_and_ask(cfg: ProjectConfig, out: Path, world: Path, shown: int = 3, events_k: int = 50,
                  followups_asked: int = 100) -> ServingReport:
    """Serve the demo's index version on Ray Serve and ask the live endpoint over HTTP (then shut it down).

    The behaviour store holds the world's logs up to the day before the test day; the test day's behaviour
    reaches it only through ``POST /v1/events``. Every request replays a logged search at its logged ``ts``.
    Real-time check: held-out follow-up searches (refining their session's previous query) are asked at their
    ``ts``, then their sessions' earlier clicks (logged timestamps, all before the follow-ups) are posted, and
    they are asked again: Recall@``events_k`` and the rank of each follow-up's clicked/bought items before and
    after show whether the clicks moved the model's answer towards what the user wanted.
    """
    token = secrets.token_hex(16)
    port = free_port()  # the demo must not fail because 8000 is taken
    store = out / "store" / "behaviours.sqlite"
    args = AppArgs(serve={"index_root": str(out / "index"), "world": str(world), "port": port, "token": token,
                          "store": str(store)})
    shutil.rmtree(out / "store", ignore_errors=True)
    store_before_test_day(world, store)  # the test day arrives by POST /v1/events
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
                                          r["filtered"], r["key_terms"], r["latency_ms"],
                                          r.get("fallback_added", 0), r.get("relaxed_to")))
        first = events.to_pylist()[0]
        first_ts = int(first["ts"].timestamp() * 1000)
        lexical = call(url, "/v1/retrieve", {"query": first["query"], "k": 3, "channels": ["embedding", "lexical"],
                                               "filter": False, "ts": first_ts})
        report = _ask_followups(url, token, world, events_k, followups_asked)
        version = call(url, "/v1/retrieve", {"query": first["query"], "k": 1, "ts": first_ts})["version"]
    finally:
        serve.shutdown()
    return ServingReport(url, version, examples, lexical, **report)


def _ask_followups(url: str, token: str, world: Path, k: int, n: int) -> dict:
    """Replay ``n`` held-out follow-ups with earlier clicks in their session at their ts, post those clicks, ask
    again (see ``serve_and_ask``); the ``ServingReport`` fields of the comparison."""
    chosen = [f for f in followups(world) if f.earlier_clicks][:n]
    if not chosen:
        return {"before_events": [], "clicked": [], "after_events": [], "events_k": k,
                "events_summary": "no held-out follow-up search with earlier clicks in its session [SYNTHETIC]"}

    def ask() -> list[list[int]]:
        return [[i["item_id"] for i in call(url, "/v1/retrieve", {"query": f.query, "user_id": f.user_id, "k": k,
                                                                    "filter": False, "ts": f.ts})["data"]]
                for f in chosen]

    def rank(top: list[int], targets: list[int]) -> int | None:
        found = [top.index(t) + 1 for t in targets if t in top]
        return min(found) if found else None

    before = ask()
    clicks = list({(b.user_id, b.item_id, b.ts): b.model_dump() for f in chosen for b in f.earlier_clicks}.values())
    for lo in range(0, len(clicks), 500):  # serve.max_events per request
        call(url, "/v1/events", {"behaviours": clicks[lo:lo + 500]}, token)
    after = ask()
    recall = [np.mean([len(set(top) & set(f.targets)) / len(f.targets) for top, f in zip(tops, chosen, strict=True)])
              for tops in (before, after)]
    ranks = [[rank(top, f.targets) or k + 1 for top, f in zip(tops, chosen, strict=True)] for tops in (before, after)]
    up = sum(a < b for b, a in zip(*ranks, strict=True))
    down = sum(a > b for b, a in zip(*ranks, strict=True))
    f = chosen[0]
    r0, r1 = rank(before[0], f.targets), rank(after[0], f.targets)
    summary = (f"follow-up '{f.query}' of user {f.user_id} replayed at its logged time: its clicked/bought items "
               f"rank {r0 or f'>{k}'} before and {r1 or f'>{k}'} after posting the session's "
               f"{len(f.earlier_clicks)} earlier clicks to POST /v1/events; over {len(chosen)} such follow-ups "
               f"Recall@{k} {recall[0]:.4f} -> {recall[1]:.4f}, the best target moved up for {up} and down for "
               f"{down} [SYNTHETIC]")
    return {"before_events": before[0][:5], "clicked": [b.item_id for b in f.earlier_clicks],
            "after_events": after[0][:5], "followup_query": f.query, "followup_user": f.user_id,
            "target_rank_before": r0, "target_rank_after": r1, "events_k": k, "followups_asked": len(chosen),
            "recall_before": float(recall[0]), "recall_after": float(recall[1]), "moved_up": up,
            "moved_down": down, "events_summary": summary}
