"""The evaluation plan and its execution as parallel Ray tasks (the thin Ray layer over ``runs.run_one``).

``plan_runs`` lists every run the report needs; ``run_plan`` prepares one :class:`EvalSet` per world in the
driver, puts it in the object store once, and runs each (world, variant, seed) as one Ray task of
``EvalConfig.task_cpus`` CPUs (fractional on a laptop, see shared/notes/RAY.md), collecting records as they
finish. ``evaluate`` does all of it for a config: simulate the worlds (or reuse them), build vocabularies,
run the plan, write the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_mgdspr.config import ProjectConfig
from ray_mgdspr.data.vocab import KINDS, Vocabulary, build_vocab_from_world
from ray_mgdspr.data.world import read_manifest
from ray_mgdspr.eval.config import EvalConfig
from ray_mgdspr.eval.evalset import EvalSet
from ray_mgdspr.eval.runs import UNTRAINED, RunSpec, alpha_variant, run_one, tau_variant

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
META, JOURNAL = "report-meta.json", "runs.jsonl"
"""Files in the work directory: what the report is about (written first) and the finished runs (appended)."""


def sweep_variants(ev: EvalConfig, loss_tau: float, loss_alpha: tuple[float, float]) -> list[str]:
    """Names of the sweep runs beyond the main table's: the project's own τ and [a, b] are the full model
    (``mgdspr``) and τ = 1 is ``tau1`` when those are main variants."""
    known_tau = ({loss_tau} if "mgdspr" in ev.variants else set()) | ({1.0} if "tau1" in ev.variants else set())
    taus = [tau_variant(t) for t in ev.tau_sweep if t not in known_tau]
    alphas = [alpha_variant(a, b) for a, b in ev.alpha_sweep if "mgdspr" not in ev.variants or (a, b) != loss_alpha]
    return ["mgdspr_hinge", *taus, *alphas]


def noise_worlds(cfg: ProjectConfig, ev: EvalConfig) -> dict[str, float]:
    """World key -> ``click_noise`` of the click-noise sweep; the project's own level is its main world (its key
    is the language) when that world is evaluated anyway."""
    own = cfg.simulate.choice.click_noise
    return {(ev.noise_lang if level == own and ev.noise_lang in ev.langs else f"{ev.noise_lang}-noise{level:g}"): level
            for level in ev.noise_levels}


def plan_runs(cfg: ProjectConfig, ev: EvalConfig) -> list[RunSpec]:
    """Every run of the report, in the order they are started."""
    ks = tuple(sorted(set(ev.ks)))
    ann = tuple(cfg.index.model_copy(update={"factory": f}) for f in dict.fromkeys([cfg.index.factory,
                                                                                    *ev.ann_factories]))
    alpha = (cfg.loss.alpha_low, cfg.loss.alpha_high)
    specs = []
    for lang in ev.langs:
        runs = [(v, s) for v in ev.variants for s in range(1 if v in UNTRAINED else ev.seeds)]
        if lang in ev.sweep_langs:
            extra = sweep_variants(ev, cfg.loss.tau, alpha)
            runs += [(v, s) for v in extra for s in range(ev.seeds if v == "mgdspr_hinge" else ev.sweep_seeds)]
            runs += [(v, s) for v in ("mgdspr", "tau1") if v in ev.variants for s in range(ev.seeds, ev.sweep_seeds)]
        for v, s in runs:
            specs.append(RunSpec(lang, v, s, ev.steps, ks, (ev.focus_k,), ev.curve_every, cfg.model, cfg.loss,
                                 cfg.optim, cfg.train.batch_size, ann if v == "mgdspr" else ()))
    main = {(s.lang, s.variant, s.seed) for s in specs}
    for key in noise_worlds(cfg, ev):
        for v in ev.noise_variants:
            for s in range(1 if v in UNTRAINED else ev.seeds):
                if (key, v, s) not in main:
                    specs.append(RunSpec(key, v, s, ev.steps, ks, (ev.focus_k,), ev.curve_every, cfg.model, cfg.loss,
                                         cfg.optim, cfg.train.batch_size))
    # baselines first, then the main table seed by seed, then the sweeps: a report rendered from an interrupted
    # journal (--from-json) is balanced; within a group the slowest first, so the tail of the plan is short
    cost = {"oracle_grade": 0, "oracle_agnostic": 0, "oracle_aware": 0, "bm25": 0, "minilm": 1, "dnn_hinge": 2}
    group = {v: 0 if v in UNTRAINED else 1 for v in ev.variants}
    return sorted(specs, key=lambda s: (group.get(s.variant, 2), s.seed, -cost.get(s.variant, 3)))


def prepare_world(cfg: ProjectConfig, ev: EvalConfig, lang: str, work: Path,
                  world: Path | None = None, key: str | None = None,
                  click_noise: float | None = None) -> tuple[Path, Vocabulary]:
    """The world of ``lang`` (simulated into ``work/worlds/<key>`` unless given or already there) and its vocab.

    ``key``: the world's name (default ``lang``); ``click_noise``: a click-noise world's level.
    """
    from ray_mgdspr.data.simulator.simulate import simulate

    key = key or lang
    if world is None:
        world = work / "worlds" / key
        sim = cfg.simulate.model_copy(update={"lang": lang})
        if click_noise is not None:
            sim = sim.model_copy(update={"choice": sim.choice.model_copy(update={"click_noise": click_noise})})
        if not _same_world(world, sim.model_dump(mode="json")):
            simulate(sim, world, overwrite=True)
    vocab_path = work / f"vocab-{key}.json"
    vocab = build_vocab_from_world(world, cfg.vocab)
    vocab.save(vocab_path)
    return world, vocab


def _same_world(world: Path, sim: dict[str, Any]) -> bool:
    try:
        return read_manifest(world).config == sim
    except (FileNotFoundError, ValueError):
        return False


def run_key(spec: RunSpec, world: dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
    """What a run's result depends on: the spec, its world's simulate config and the model's inputs (feature
    lengths and windows, vocabulary sizes; ``evalset_inputs``): a finished run is reused only when all of it is
    unchanged."""
    digest = hashlib.sha256(json.dumps([repr(spec), world, inputs or {}], sort_keys=True, default=str).encode()
                            ).hexdigest()
    return f"{spec.lang}/{spec.variant}/s{spec.seed}/{digest[:16]}"


def evalset_inputs(data: EvalSet) -> dict[str, Any]:
    """What the runs of one evaluation set read besides their spec: the feature config and the vocabulary's sizes."""
    f = data.featurizer
    return {"features": f.config.model_dump(), "vocab": {k: f.vocab.num_ids(k) for k in KINDS}}


def run_plan(specs: list[RunSpec], evalsets: dict[str, EvalSet], task_cpus: float,
             progress: Progress | None = None, journal: Path | None = None) -> list[dict[str, Any]]:
    """Run every spec as a Ray task (Ray must be initialised); records in completion order.

    ``journal``: a JSON-lines file each finished run is appended to; runs already in it (same ``run_key``) are
    not run again, so an interrupted evaluation resumes where it stopped.
    """
    import ray

    keys = {id(spec): run_key(spec, evalsets[spec.lang].manifest.config, evalset_inputs(evalsets[spec.lang]))
            for spec in specs}
    done_before = _read_journal(journal)
    records = [{**done_before[keys[id(s)]], "reused": True} for s in specs if keys[id(s)] in done_before]
    todo = [s for s in specs if keys[id(s)] not in done_before]
    if records and progress:
        progress(f"{len(records)} runs reused from {journal}")
    if not todo:
        return records
    refs = {lang: ray.put(data) for lang, data in evalsets.items()}
    task = ray.remote(_run_task).options(num_cpus=task_cpus)
    threads = max(1, int(task_cpus))
    pending = {task.remote(spec, refs[spec.lang], threads): spec for spec in todo}
    t0 = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        spec = pending.pop(done[0])
        record = {**ray.get(done[0]), "key": keys[id(spec)]}
        records.append(record)
        if journal is not None:
            with journal.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        if progress:
            m = record["metrics"]
            k_low, k_high = min(spec.ks), max(spec.ks)
            progress(f"[{len(records)}/{len(specs)}] {spec.lang} {spec.variant} seed {spec.seed}: "
                     f"Recall@{k_low} {m[f'recall@{k_low}']:.3f}, Recall@{k_high} {m[f'recall@{k_high}']:.3f}, "
                     f"P_good@{k_low} {m[f'p_good@{k_low}']:.3f} ({record['seconds']:.0f} s; "
                     f"{time.perf_counter() - t0:.0f} s elapsed)")
    return records


def _read_journal(journal: Path | None) -> dict[str, dict[str, Any]]:
    if journal is None or not journal.is_file():
        return {}
    out = {}
    for line in journal.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["key"]] = record
    return out


def _run_task(spec: RunSpec, data: EvalSet, threads: int) -> dict[str, Any]:
    """Body of one Ray task: one run with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return run_one(spec, data)


def evaluate(cfg: ProjectConfig, ev: EvalConfig, out: Path, work: Path | None = None, world: Path | None = None,
             address: str | None = None, command: str = "mgdspr eval", progress: Progress | None = None) -> Path:
    """The whole report: worlds, vocabularies, every run as a Ray task, then ``report.md``/``.json``/PNGs in ``out``.

    Args:
        work: where worlds, vocabularies and the journal of finished runs (``runs.jsonl``) go (default
            ``out/work``); worlds with the same simulate config and runs with the same spec are reused.
        world: evaluate this existing world instead of simulating (one language only).
        address: Ray cluster address (default: ``cfg.ray``; a local Ray otherwise).
    """
    import platform

    from ray_mgdspr.eval.report import write_report
    from ray_mgdspr.runtime import connect_ray

    say = progress or (lambda _msg: None)
    if world is not None and len(ev.langs) != 1:
        raise ValueError(f"--world evaluates one world; got languages {ev.langs} (pass one --lang)")
    t0 = time.perf_counter()
    work = work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    evalsets, worlds = {}, {}
    for lang in ev.langs:
        path, vocab = prepare_world(cfg, ev, lang, work, world)
        data = EvalSet.load(path, vocab, cfg.features, ev.max_events, ev.event_seed)
        evalsets[lang] = data
        worlds[lang] = {"path": str(path), "scale": data.scale(), "label": data.manifest.label,
                        "seed": data.manifest.seed}
        say(f"world {lang}: {data.scale()} [{data.manifest.label}]")
    noise = []
    for key, level in noise_worlds(cfg, ev).items():
        if key not in evalsets:
            path, vocab = prepare_world(cfg, ev, ev.noise_lang, work, key=key, click_noise=level)
            evalsets[key] = data = EvalSet.load(path, vocab, cfg.features, ev.max_events, ev.event_seed)
            worlds[key] = {"path": str(path), "scale": data.scale(), "label": data.manifest.label,
                           "seed": data.manifest.seed, "noise_of": ev.noise_lang}
        share = evalsets[key].manifest.stats.get("irrelevant_click_share", float("nan"))
        noise.append({"world": key, "click_noise": level, "irrelevant_click_share": share})
        say(f"click-noise world {key}: click_noise {level:g}, {share:.1%} of clicks on irrelevant items")
    specs = plan_runs(cfg, ev)
    report = {"command": command, "seconds": 0.0, "label": "SYNTHETIC", "planned": len(specs),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "config": cfg.model_dump(mode="json"),
              "eval": ev.model_dump(mode="json"), "worlds": worlds, "noise": noise}
    (work / META).write_text(json.dumps(report, indent=1, ensure_ascii=False))  # --from-json: a partial report
    say(f"{len(specs)} runs as Ray tasks of {ev.task_cpus:g} CPU")
    connect_ray(cfg.ray, address)
    records = run_plan(specs, evalsets, ev.task_cpus, say, journal=work / JOURNAL)
    return write_report(out, {**report, "seconds": time.perf_counter() - t0}, records)
