"""The daily job: logs -> train -> embed -> index -> promote the new version on a running endpoint.

```
world (simulated, or logs already written) ─▶ validate ─▶ train (Ray Train; resumes a run of the same name)
  ─▶ embed (Ray Data actor pool) ─▶ index build + verify (Ray tasks, a new immutable version)
  ─▶ promote: POST <endpoint>/v1/admin/promote    (no endpoint: CURRENT moves to the new version)
  ─▶ <out>/config.yaml, <out>/serve.yaml (for `serve deploy`), <out>/pipeline.json (what each stage did)
```

Every stage is the same function the single-stage commands call; this module only sequences them, times
them, and turns their failures into one exit code per kind (``ExitCode``). ``pipeline.json`` is written
(atomically) whether the run succeeds or not, naming the stage that failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from ray_mgdspr.artifacts import write_text_atomic
from ray_mgdspr.config import ConfigError, ProjectConfig, config_to_yaml

log = logging.getLogger(__name__)
REPORT = "pipeline.json"


class ExitCode(IntEnum):
    """What ``mgdspr pipeline`` / ``jobs/pipeline.py`` exit with (``ray job submit`` shows it as the job's)."""

    OK = 0
    FAILED = 1  # a stage broke (a bug, a lost cluster, training that failed more than max_failures times)
    BAD_INPUT = 2  # the config, the world or an argument is wrong: fix it and resubmit; nothing was written
    NOT_PROMOTED = 3  # the new version is built and verified, but the endpoint refused it or was unreachable


class PipelineError(RuntimeError):
    """A stage failed; ``code`` says what kind of failure, ``stage`` which stage."""

    def __init__(self, stage: str, message: str, code: ExitCode) -> None:
        super().__init__(f"stage {stage}: {message}")
        self.stage, self.code = stage, code


@dataclass
class StageRecord:
    name: str
    seconds: float
    status: str  # "ok" or "failed"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    out: Path
    version: str | None = None
    promoted: bool = False
    stages: list[StageRecord] = field(default_factory=list)
    error: str | None = None
    code: ExitCode = ExitCode.OK

    @property
    def report(self) -> Path:
        return self.out / REPORT


# Errors a stage raises for input it cannot use; anything else is a failure of the stage itself.
BAD_INPUT_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError)


def absolute_paths(cfg: ProjectConfig, out: Path) -> ProjectConfig:
    """``cfg`` with every artifact path absolute, and the serve section pointed at this run's artifacts.

    A job's working directory is a temporary copy that Ray deletes: relative paths there are lost, so they
    are resolved once here and logged."""
    cwd = Path.cwd()
    fields = {"train": ("world", "storage_path", "out"), "embed": ("out",), "index": ("out",)}
    updates: dict[str, dict[str, str]] = {}
    for section, names in fields.items():
        for name in names:
            value = getattr(getattr(cfg, section), name)
            if value is not None and "://" not in value and not Path(value).is_absolute():
                updates.setdefault(section, {})[name] = str((cwd / value).resolve())
    if updates and "runtime_resources" in str(cwd):
        log.warning("relative paths resolved against the job's temporary working directory %s (deleted after "
                    "the job): %s; give absolute paths on storage every node reaches", cwd, updates)
    cfg = cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=u) for s, u in updates.items()})
    store = cfg.serve.store if "://" in cfg.serve.store else str(out / "store" / Path(cfg.serve.store).name)
    serve = {"index_root": cfg.index.out, "world": cfg.train.world, "store": store}
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update=serve)})


class Pipeline:
    """One run: each stage method records itself; ``run`` sequences them."""

    def __init__(self, cfg: ProjectConfig, out: str | Path, *, simulate: bool = False, overwrite_world: bool = False,
                 endpoint: str | None = None, token: str | None = None, say: Callable[[str], None] = print) -> None:
        self.out = Path(out).resolve()
        self.cfg = absolute_paths(cfg, self.out)
        self.simulate, self.overwrite_world = simulate, overwrite_world
        self.endpoint, self.token = endpoint, token or os.environ.get("MGDSPR_SERVE_TOKEN") or cfg.serve.token
        self.say = say
        self.result = PipelineResult(self.out)
        self.started = dt.datetime.now(dt.UTC)

    @contextmanager
    def stage(self, name: str, bad_input: tuple[type[BaseException], ...] = BAD_INPUT_ERRORS) -> Iterator[dict]:
        """Time one stage, record what it reports in the yielded dict, and classify its failure."""
        detail: dict[str, Any] = {}
        self.say(f"[pipeline] {name}: started")
        t0 = time.perf_counter()
        try:
            yield detail
        except PipelineError:
            self._record(name, t0, "failed", detail)
            raise
        except bad_input as e:
            self._record(name, t0, "failed", detail)
            raise PipelineError(name, str(e), ExitCode.BAD_INPUT) from e
        except Exception as e:
            self._record(name, t0, "failed", detail)
            log.error("stage %s failed:\n%s", name, traceback.format_exc())
            raise PipelineError(name, f"{type(e).__name__}: {e}", ExitCode.FAILED) from e
        seconds = self._record(name, t0, "ok", detail)
        self.say(f"[pipeline] {name}: done in {seconds:.1f}s " + json.dumps(detail, default=str))

    def _record(self, name: str, t0: float, status: str, detail: dict) -> float:
        seconds = round(time.perf_counter() - t0, 2)
        self.result.stages.append(StageRecord(name, seconds, status, detail))
        return seconds

    # ------------------------------------------------------------------------------------------ stages

    def check(self) -> None:
        """Cheap checks before hours of training: a token to promote with, the endpoint answering."""
        with self.stage("check") as d:
            if not self.endpoint:
                d["promote"] = "no endpoint: CURRENT moves to the new version"
                return
            if not self.token:
                raise ValueError("--endpoint is given but no token: set MGDSPR_SERVE_TOKEN (or serve.token) to "
                                 "the endpoint's bearer token, or leave --endpoint out")
            from ray_mgdspr.serve.client import EndpointError, call

            try:
                d["serving_before"] = call(self.endpoint, "/v1/version", timeout=30).get("version")
            except EndpointError as e:  # it may be back by the time the index is built: promotion decides
                log.warning("the endpoint does not answer now (%s); promotion will try again at the end", e)
                d["serving_before"] = None

    def logs(self) -> None:
        """Simulate the world (``--simulate``) or take the logs that are there; validate them either way."""
        from ray_mgdspr.data.validate import validate_world
        from ray_mgdspr.data.world import read_manifest

        world = Path(self.cfg.train.world)
        with self.stage("logs") as d:
            if self.simulate:
                from ray_mgdspr.data.simulator.simulate import simulate

                if world.exists() and not self.overwrite_world:
                    raise FileExistsError(f"{world} exists; --simulate replaces it only with --overwrite-world")
                simulate(self.cfg.simulate, world, overwrite=self.overwrite_world)
            elif not world.exists():
                raise FileNotFoundError(f"train.world {world} does not exist; write the logs there "
                                        "(`mgdspr load`, `mgdspr simulate`) or pass --simulate")
            report = validate_world(world)
            if not report.ok:
                raise ValueError(f"{world} failed validation ({len(report.problems)} problems; nothing trained):\n"
                                 + "\n".join(map(str, report.problems[:20])))
            manifest = read_manifest(world)
            d.update(world=str(world), data=manifest.label, rows=manifest.tables)

    def train(self) -> Path:
        from ray_mgdspr.train.trainer import train

        with self.stage("train") as d:
            r = train(self.cfg)
            self.result.version = r.manifest.version
            final = r.metrics[-1] if r.metrics else {}
            d.update(bundle=str(r.bundle), version=r.manifest.version, data=r.manifest.metadata.get("data"),
                     epochs=final.get("epoch"), steps=final.get("step"),
                     resumed_at_steps=r.manifest.metadata.get("resumed_at_steps", []),
                     **{k: v for k, v in final.items() if k.startswith(("recall@", "loss"))})
        return r.bundle

    def embed(self, bundle: Path) -> Path:
        from ray_mgdspr.index.embed import embed_catalogue

        with self.stage("embed") as d:
            r = embed_catalogue(self.cfg.train.world, bundle, self.cfg.embed, overwrite=True)
            d.update(path=str(r.path), rows=r.rows, dim=r.dim, first_range_s=r.first_range_s,
                     actors=[{**a.model_dump(), "items_per_s": round(a.items_per_s)} for a in r.actors])
        return r.path

    def index(self, embeddings: Path) -> str:
        from ray_mgdspr.index.build import build_index
        from ray_mgdspr.index.shards import verify_index

        with self.stage("index") as d:
            m = build_index(self.cfg.train.world, embeddings, self.cfg.index, make_current=not self.endpoint)
            path = Path(self.cfg.index.out) / m.version
            problems = verify_index(path)
            if problems:
                raise RuntimeError(f"{path} failed verification: " + "; ".join(problems))
            d.update(path=str(path), version=m.version, shards=len(m.shards), rows=m.total_rows,
                     factory=m.factory, current=not self.endpoint)
        return m.version

    def promote(self, version: str) -> None:
        """Ask the endpoint to load ``version`` beside the serving one and switch (it keeps the old one if not)."""
        from ray_mgdspr.serve.client import EndpointError, call

        with self.stage("promote") as d:
            if not self.endpoint:
                d["current"] = version
                return
            try:
                info = call(self.endpoint, "/v1/admin/promote", {"version": version}, self.token,
                            timeout=self.cfg.serve.load_timeout_s + 60)
            except EndpointError as e:
                raise PipelineError("promote", f"{e}; version {version} is built and verified at "
                                    f"{self.cfg.index.out}/{version}: promote it later with `mgdspr serve promote "
                                    f"{version} --url {self.endpoint}`", ExitCode.NOT_PROMOTED) from e
            d.update(endpoint=self.endpoint, serving=info.get("version"), previous=info.get("previous"))
            self.result.promoted = True

    def serve_config(self) -> None:
        """The run's config (absolute paths) and a Serve config of it, for `serve deploy`."""
        from ray_mgdspr.serve.app import AppArgs, write_serve_config

        with self.stage("serve-config") as d:
            config = self.out / "config.yaml"
            write_text_atomic(config, config_to_yaml(self.cfg))
            path = write_serve_config(AppArgs(config=str(config)), self.out / "serve.yaml")
            d.update(config=str(config), serve_config=str(path))

    # ------------------------------------------------------------------------------------------ run

    def run(self) -> PipelineResult:
        """All stages in order; never raises a stage's error (``result.code`` / ``result.error`` hold it)."""
        from ray_mgdspr.runtime import connect_ray

        try:
            self.check()
            self.logs()
            with self.stage("ray"):
                connect_ray(self.cfg.ray)
            bundle = self.train()
            version = self.index(self.embed(bundle))
            self.serve_config()
            self.promote(version)
        except PipelineError as e:
            self.result.error, self.result.code = str(e), e.code
        self.write_report()
        return self.result

    def write_report(self) -> Path:
        r = self.result
        report = {"status": "ok" if r.code == ExitCode.OK else "failed", "exit_code": int(r.code), "error": r.error,
                  "version": r.version, "promoted": r.promoted, "endpoint": self.endpoint,
                  "started": self.started.isoformat(), "finished": dt.datetime.now(dt.UTC).isoformat(),
                  "stages": [asdict(s) for s in r.stages]}
        write_text_atomic(r.report, json.dumps(report, indent=2, default=str))
        return r.report



