"""The ``mgdspr`` command: a thin wrapper over typed functions that the tests call directly."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ray_mgdspr.cli_support import AddressOpt, ConfigOpt, PresetOpt, console, err, fail, on_ray, project_config
from ray_mgdspr.clusters.cli import cluster_app
from ray_mgdspr.config import DEFAULT_CONFIG, ConfigError, ProjectConfig, config_to_yaml, load_config
from ray_mgdspr.data.schema import describe_tables
from ray_mgdspr.data.world import WorldManifest
from ray_mgdspr.eval.cli import eval_command
from ray_mgdspr.serve.cli import query_command, serve_app, store_app

if TYPE_CHECKING:
    from ray_mgdspr.train.trainer import TrainResult

app = typer.Typer(help="MGDSPR personalised embedding-based product retrieval on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Inspect and check config files.", no_args_is_help=True)
vocab_app = typer.Typer(help="Vocabularies for characters, bigrams and words.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(vocab_app, name="vocab")
index_app = typer.Typer(help="Sharded, versioned Faiss indexes of the catalogue.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(serve_app, name="serve")
app.add_typer(store_app, name="store")
app.command("query")(query_command)
app.command("eval")(eval_command)
app.add_typer(cluster_app, name="cluster")


@contextmanager
def _progress() -> Iterator[callable]:
    """A rich progress display driven by ``progress(what, done, total)`` callbacks."""
    # no redirection of sys.stdout/stderr through the bar: what Ray prints must reach the demo's log file
    with Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False, redirect_stdout=False, redirect_stderr=False) as bar:
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield update


def _world_summary(m: WorldManifest, title: str) -> Table:
    t = Table(title=escape(f"{title} [{m.label}]"), title_justify="left")
    t.add_column("table")
    t.add_column("rows", justify="right")
    for name, rows in m.tables.items():
        t.add_row(name, f"{rows:,}")
    return t


def _signal_summary(m: WorldManifest) -> Table:
    s = m.stats
    t = Table(title="signals in the log (synthetic)", title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("click-through, exact-relevant items", s.get("ctr_grade2")),
        ("click-through, leaf-only (partial) items", s.get("ctr_grade1")),
        ("click-through, irrelevant items", s.get("ctr_grade0")),
        ("share of clicks on irrelevant items (click noise)", s.get("irrelevant_click_share")),
        ("buys per click", s.get("buy_per_click")),
        ("follow-up queries", s.get("followup_share")),
        ("query words with a typo / truncated", f"{s.get('typo_word_share')} / {s.get('truncated_word_share')}"),
    ]
    for name, value in rows:
        t.add_row(name, str(value))
    return t


# ------------------------------------------------------------------------------------------ commands


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="world directory to write")] = Path("runs/world"),
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    lang: Annotated[str | None, typer.Option(help="en or zh (overrides the config)")] = None,
    seed: Annotated[int | None, typer.Option(help="overrides the config")] = None,
    items: Annotated[int | None, typer.Option(help="catalogue size (overrides the config)")] = None,
    users: Annotated[int | None, typer.Option(help="number of users (overrides the config)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing world at --out")] = False,
) -> None:
    """Simulate a Taobao-like world (synthetic) and write it as Parquet tables."""
    from ray_mgdspr.data.simulator.simulate import simulate as run

    cfg = project_config(config, preset).simulate
    overrides = {k: v for k, v in {"lang": lang, "seed": seed, "n_items": items, "n_users": users}.items()
                 if v is not None}
    try:
        cfg = cfg.model_validate({**cfg.model_dump(), **overrides})
    except ValueError as e:
        raise fail(f"command-line override: {e}") from None
    t0 = time.perf_counter()
    try:
        with _progress() as progress:
            m = run(cfg, out, overwrite=overwrite, progress=progress)
    except FileExistsError as e:
        raise fail(str(e)) from None
    console.print(_world_summary(m, f"world {out}"))
    console.print(_signal_summary(m))
    console.print(f"simulated {m.tables['items']:,} items, {m.tables['users']:,} users, "
                  f"{m.tables['behaviours']:,} behaviours, {m.tables['search_events']:,} search events "
                  f"({cfg.lang}, seed {cfg.seed}) into {out} in {time.perf_counter() - t0:.1f}s [SYNTHETIC]")


@app.command()
def validate(world: Annotated[Path, typer.Argument(help="world directory")]) -> None:
    """Check every table of a world against its schema, references and declared days."""
    from ray_mgdspr.data.validate import validate_world

    report = validate_world(world)
    for p in report.problems:
        err.print(f"[red]✗[/] {escape(str(p))}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise fail(f"{world}: {len(report.problems)} problem(s) found; nothing was modified", code=1)
    label = report.manifest.label if report.manifest else ""
    total = sum(report.rows.values())
    console.print(f"{world}: valid, {len(report.rows)} tables, {total:,} rows " + escape(f"[{label}]"))


@app.command()
def load(
    dataset: Annotated[str, typer.Argument(help="esci, wands or jdsearch")],
    src: Annotated[Path, typer.Argument(help="file or directory of the source data")],
    out: Annotated[Path, typer.Option("--out", "-o", help="world directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing world at --out")] = False,
) -> None:
    """Map a real public data set into a world (real data, not synthetic)."""
    from ray_mgdspr.data.loaders import load as run

    try:
        m = run(dataset, src, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise fail(str(e)) from None
    console.print(_world_summary(m, f"world {out}"))
    console.print(f"loaded {dataset} from {src} into {out}: "
                  + ", ".join(f"{k} {v:,}" for k, v in m.tables.items()) + " " + escape(f"[{m.label}]"))


@app.command()
def schema() -> None:
    """Print the tables of a world, their columns and meaning (Markdown)."""
    typer.echo(describe_tables())


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="where the demo writes its artifacts")] = Path("runs/demo"),
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Ray's own output (worker logs, Ray Data progress, "
                                          "Serve) in the terminal too, not only in OUT/demo.log")] = False,
) -> None:
    """Run the main job end to end on the embedded demo world (synthetic)."""
    from ray_mgdspr.demo import DemoError, run_demo
    from ray_mgdspr.runtime import terminal_only_for

    cfg = project_config(config)
    t0 = time.perf_counter()
    log_path = out / "demo.log"
    if not verbose:
        out.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        console.print(f"Ray's own output goes to {log_path} (--verbose shows it here)")
    try:
        with nullcontext() if verbose else terminal_only_for([console, err], log_path), _progress() as progress:
            result = run_demo(cfg, out, progress=progress)
    except DemoError as e:
        raise fail(str(e), code=1) from None
    except Exception:
        if not verbose:
            err.print(f"[bold red]the demo failed[/]; Ray's output is in {log_path}", soft_wrap=True)
        raise
    m = result.manifest
    console.print(escape(f"demo world {result.world} [{m.label}]: " + ", ".join(f"{name} {rows:,}"
                                                                               for name, rows in m.tables.items())),
                  soft_wrap=True)
    console.print(_signal_summary(m))
    v = result.vocab
    console.print(f"vocabulary {result.vocab_path}: " + ", ".join(
        f"{kind} {v.num_ids(kind):,} ids" for kind in ("words", "chars", "bigrams")), soft_wrap=True)
    console.print(_training_summary(result.training))
    e, ix = result.embeddings, result.index
    console.print(f"embedded {e.rows:,} items (d={e.dim}) in {e.seconds:.1f}s; index {ix.version}: "
                  f"{len(ix.shards)} shards ({ix.factory}), verified; Recall@{result.k} of held-out searches "
                  f"answered from the index: {result.index_recall:.4f}", soft_wrap=True)
    s = result.serving
    console.print(f"serving version {s.version} on Ray Serve at {s.url} (now stopped); held-out searches asked "
                  "over HTTP with the user's histories from the behaviour store:", soft_wrap=True)
    for ex in s.examples:
        console.print(escape(f"  user {ex.user_id} '{ex.query}' -> top {len(ex.results)} after the relevance filter "
                             f"(key terms {ex.key_terms}, {ex.filtered} filtered; * = the user clicked or bought it; "
                             f"{ex.latency_ms['total']:.0f} ms):"), soft_wrap=True)
        if ex.relaxed_to:
            console.print(escape(f"    (too few items have every key term: {ex.fallback_added} of them are of the "
                                 f"query's product type {ex.relaxed_to} only, ranked by BM25)"), soft_wrap=True)
        for title, hit in ex.results:
            console.print(escape(f"    {'*' if hit else ' '} {title}"), soft_wrap=True)
        if not ex.results:
            console.print(f"    (no catalogue item has every key term, and the query names no product type to "
                          f"relax to: the filter removed all {ex.filtered} hits)", soft_wrap=True)
    lexical = [f"{'+'.join(i['channels'])}: {i['title']}" for i in s.lexical["data"]]
    console.print(escape(f"  embedding + lexical (BM25) channels, unfiltered: {lexical}"), soft_wrap=True)
    console.print(escape(f"  after POST /v1/events: {s.events_summary}"), soft_wrap=True)
    console.print("evaluation of the demo model against BM25 on held-out searches:")
    console.print(result.evaluation, markup=False, highlight=False, soft_wrap=True)
    console.print(escape(f"serve it again: `.venv/bin/mgdspr serve -c {result.serving_config}`, then, in another "
                         "shell, `.venv/bin/mgdspr query 'red dress'`"), soft_wrap=True)
    console.print(f"demo done in {time.perf_counter() - t0:.1f}s: world {result.world} (valid), "
                  f"vocabulary {result.vocab_path}, model {result.training.bundle}, index {result.out / 'index'} "
                  f"(version {result.training.manifest.version}) [SYNTHETIC data]", soft_wrap=True)


def _train_config(config: str | None, preset: str | None, **overrides: object) -> ProjectConfig:
    """The config with the train section's command-line overrides (those given) applied and checked."""
    cfg = project_config(config, preset)
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cfg.model_copy(update={"train": cfg.train.model_validate({**cfg.train.model_dump(), **given})})
    except ValueError as e:
        raise fail(f"command-line override: {e}") from None


def _training_summary(result: TrainResult) -> Table:
    t = Table(title=escape(f"training by epoch [{result.manifest.metadata.get('data', '')}]"), title_justify="left")
    keys = [k for k in (result.metrics[-1] if result.metrics else {}) if k not in ("compute_s", "data_wait_s")]
    for k in keys:
        t.add_column(k, justify="right")
    for m in result.metrics:
        t.add_row(*(f"{m[k]:.4g}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k in keys))
    return t


@app.command()
def train(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    world: Annotated[str | None, typer.Option(help="world to train on (overrides train.world)")] = None,
    run_name: Annotated[str | None, typer.Option(help="run name (same name resumes; overrides the config)")] = None,
    epochs: Annotated[int | None, typer.Option(help="overrides train.epochs")] = None,
    address: AddressOpt = None,
) -> None:
    """Train MGDSPR with Ray Train (DDP) and write a versioned model bundle; resumes a run of the same name."""
    from ray_mgdspr.train.trainer import train as run_training

    cfg = _train_config(config, preset, world=world, run_name=run_name, epochs=epochs)
    result = on_ray(cfg.ray, address, lambda: run_training(cfg))
    console.print(_training_summary(result))
    final = result.metrics[-1] if result.metrics else {}
    recall = {k: v for k, v in final.items() if k.startswith("recall@")}
    console.print(f"trained {cfg.train.run_name} on {cfg.train.world}: {final.get('epoch', 0)} epochs, "
                  f"{final.get('step', 0)} steps, loss {final.get('loss', float('nan')):.4f}, "
                  + ", ".join(f"{k} {v:.4f}" for k, v in recall.items())
                  + f" in {result.seconds:.0f}s -> bundle {result.bundle} (version {result.manifest.version}) "
                  + escape(f"[{result.manifest.metadata.get('data', '')}]"), soft_wrap=True)


@app.command()
def embed(
    bundle: Annotated[Path, typer.Option(help="model bundle whose item tower embeds the catalogue")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    world: Annotated[str | None, typer.Option(help="world whose catalogue to embed (default: train.world)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing embedding set of this model")] = False,
    address: AddressOpt = None,
) -> None:
    """Embed every catalogue item with a Ray Data actor pool; writes <embed.out>/<model version>."""
    from ray_mgdspr.index.embed import embed_catalogue

    cfg = project_config(config, preset)
    r = on_ray(cfg.ray, address, lambda: embed_catalogue(world or cfg.train.world, bundle, cfg.embed, overwrite))
    console.print(f"embedded {r.rows:,} items (d={r.dim}) with model {r.model_version} in {r.seconds:.1f}s "
                  f"-> {r.path}\n{r.summary()}", soft_wrap=True)


@index_app.command("build")
def index_build(
    embeddings: Annotated[Path, typer.Option(help="embedding set written by `mgdspr embed`")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    world: Annotated[str | None, typer.Option(help="world with the items' metadata (default: train.world)")] = None,
    current: Annotated[bool, typer.Option(help="point CURRENT at the new version")] = True,
    address: AddressOpt = None,
) -> None:
    """Build an index version (shards in parallel as Ray tasks); written atomically."""
    from ray_mgdspr.index.build import build_index

    cfg = project_config(config, preset)
    m = on_ray(cfg.ray, address, lambda: build_index(world or cfg.train.world, embeddings, cfg.index, current))
    console.print(f"index {cfg.index.out}/{m.version}: {m.total_rows:,} items in {len(m.shards)} shards "
                  f"({m.factory}, d={m.dim}) in {m.build_seconds:.1f}s" + (", now current" if current else ""),
                  soft_wrap=True)


@index_app.command("update")
def index_update(
    bundle: Annotated[Path, typer.Option(help="the model bundle of the base version (deltas keep the model)")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    world: Annotated[str | None, typer.Option(help="world with the new catalogue (default: train.world)")] = None,
    base: Annotated[str | None, typer.Option(help="index version to apply it to (default: CURRENT)")] = None,
    version: Annotated[str | None, typer.Option(help="the new version's id (default: <model version>.d<UTC "
                                                "time>)")] = None,
    current: Annotated[bool, typer.Option(help="point CURRENT at the new version")] = True,
    compact: Annotated[bool, typer.Option(help="rewrite every shard with a change since its base files in full "
                                          "(index.compact_at 0): a scheduled compaction")] = False,
    endpoint: Annotated[str | None, typer.Option(help="running endpoint to promote the new version on")] = None,
    token: Annotated[str | None, typer.Option(help="the endpoint's bearer token", envvar="MGDSPR_SERVE_TOKEN",
                                              show_envvar=True)] = None,
) -> None:
    """Apply a new catalogue to an index version as a new version: only added and changed items are embedded and
    written, as a delta segment beside each touched shard's base files; a shard whose changes reach index.compact_at
    is rewritten in full (`index/update.py`). Exit 2 bad input, 1 the promotion failed."""
    from ray_mgdspr.index.update import update_index
    from ray_mgdspr.serve.cli import serve_promote

    cfg = project_config(config, preset)
    index_cfg = cfg.index.model_copy(update={"compact_at": 0.0}) if compact else cfg.index
    try:
        r = update_index(world or cfg.train.world, bundle, index_cfg, base=base, version=version,
                         make_current=current, batch_size=cfg.embed.batch_size,
                         progress=lambda line: console.print(line, soft_wrap=True))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise fail(str(e)) from None
    d, m = r.delta, r.manifest
    console.print(f"index {cfg.index.out}/{m.version}: {m.total_rows:,} items from {d.base} (+{d.added:,} new, "
                  f"-{d.removed:,} removed, ~{d.changed:,} changed; shards {d.shards_touched} touched, "
                  f"{d.shards_compacted} compacted) in "
                  f"{r.seconds:.1f}s (embedding {r.embed_seconds:.1f}s)" + (", now current" if current else ""),
                  soft_wrap=True)
    if endpoint:
        serve_promote(m.version, url=endpoint, token=token)


@index_app.command("verify")
def index_verify(
    path: Annotated[Path | None, typer.Argument(help="index version directory (default: CURRENT of index.out)")]
    = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Check every shard of an index version: files present, checksums, row counts, dimensions."""
    from ray_mgdspr.index.shards import verify_index
    from ray_mgdspr.index.versions import current_version

    if path is None:
        root = Path(project_config(config, preset).index.out)
        version = current_version(root)
        if version is None:
            raise fail(f"{root}: no CURRENT index version; give the version directory")
        path = root / version
    problems = verify_index(path)
    for p in problems:
        err.print(f"[red]✗[/] {escape(p)}", highlight=False, soft_wrap=True)
    if problems:
        raise fail(f"{path}: {len(problems)} problem(s)", code=1)
    console.print(f"{path}: ok")


@app.command()
def pipeline(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run report, config and Serve config")] = Path(
        "runs/pipeline"),
    world: Annotated[str | None, typer.Option(help="logs to train on (overrides train.world)")] = None,
    simulate: Annotated[bool, typer.Option(help="simulate the world first (synthetic)")] = False,
    overwrite_world: Annotated[bool, typer.Option(help="with --simulate: replace an existing world")] = False,
    run_name: Annotated[str | None, typer.Option(help="training run (same name resumes; overrides the config)")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="overrides train.epochs")] = None,
    endpoint: Annotated[str | None, typer.Option(help="running endpoint to promote the new version on "
                                                 "(default: none; CURRENT moves instead)")] = None,
    token: Annotated[str | None, typer.Option(help="the endpoint's bearer token", envvar="MGDSPR_SERVE_TOKEN",
                                              show_envvar=True)] = None,
) -> None:
    """Logs -> train -> embed -> index -> promote, as one job. Exit 0 ok, 1 a stage failed, 2 bad input,
    3 built but not promoted; <out>/pipeline.json says what each stage did."""
    from ray_mgdspr.pipeline import ExitCode, Pipeline

    cfg = _train_config(config, preset, world=world, run_name=run_name, epochs=epochs)
    result = Pipeline(cfg, out, simulate=simulate, overwrite_world=overwrite_world, endpoint=endpoint,
                      token=token, say=lambda line: console.print(line, markup=False, highlight=False,
                                                                  soft_wrap=True)).run()
    if result.code != ExitCode.OK:
        raise fail(f"{result.error} (exit {int(result.code)} {result.code.name}; report {result.report})",
                    code=int(result.code))
    where = f"promoted on {endpoint}" if result.promoted else "CURRENT"
    console.print(f"pipeline done: version {result.version} is {where}; report {result.report}, Serve config "
                  f"{out / 'serve.yaml'}", soft_wrap=True)


@vocab_app.command("build")
def vocab_build(
    world: Annotated[Path, typer.Argument(help="world directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="vocabulary file to write (JSON)")],
    config: ConfigOpt = None,
) -> None:
    """Build character, bigram and word vocabularies from a world's catalogue and training days."""
    from ray_mgdspr.data.vocab import build_vocab_from_world

    cfg = project_config(config)
    try:
        vocab = build_vocab_from_world(world, cfg.vocab)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None
    vocab.save(out)
    console.print(f"vocabulary {out}: " + ", ".join(
        f"{kind} {vocab.num_ids(kind):,} ids" for kind in ("words", "chars", "bigrams")))


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Print a config with every default filled in (the class defaults when no file is given; the commands
    themselves run with preset:demo when given no --config)."""
    cfg = project_config(config, preset) if (config or preset) else ProjectConfig()
    if not (config or preset):
        console.print(f"# the defaults of every field; a command given no --config runs {DEFAULT_CONFIG}",
                      markup=False, highlight=False)
    console.print(config_to_yaml(cfg), markup=False, highlight=False)


@config_app.command("check")
def config_check(files: Annotated[list[Path], typer.Argument(help="YAML config files")]) -> None:
    """Check config files: unknown keys and wrong types are reported with the file and key."""
    failed = 0
    for f in files:
        try:
            load_config(f)
            console.print(f"{f}: ok")
        except ConfigError as e:
            err.print(str(e), highlight=False, soft_wrap=True)
            failed += 1
    if failed:
        raise typer.Exit(1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
