"""The HTTP front of the retrieval endpoint: ``Ingress`` (FastAPI on Serve: validation, auth, metrics, and the
serving version: held in the replica itself with ``serve.placement: inline``, else called over its deployment
handles, with retries).

The front application (``serve.app_name``, route ``/``) is ``Ingress`` and ``VersionManager``
(``serve/versions.py``). A request reads the serving version once and uses only that version, so it is answered
by one version end to end.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_mgdspr.config import FeatureConfig, ResolvedServeConfig
from ray_mgdspr.serve.canary import MAX_IN_FLIGHT, CanaryHits, RecallWindow, merged_recall
from ray_mgdspr.serve.engine import (
    Encoded,
    Hits,
    RequestRefused,
    behaviours_body,
    request_k,
    request_ts,
    retrieve,
)
from ray_mgdspr.serve.errors import RETRYABLE, HttpError, cause, public_message, unavailable
from ray_mgdspr.serve.metrics import GAUGE_REFRESH_S, ServingMetrics
from ray_mgdspr.serve.relevance import KeyTerm
from ray_mgdspr.serve.schemas import (
    BehavioursRequest,
    BehavioursResponse,
    EventsRequest,
    PromoteRequest,
    RetrieveRequest,
    RetrieveResponse,
    VersionInfo,
)
from ray_mgdspr.serve.store import open_store
from ray_mgdspr.serve.tasks import replica_task
from ray_mgdspr.serve.versions import PromotionRefused, WholeVersion, version_app_name

log = logging.getLogger("ray.serve")

TOKEN_ENV = "MGDSPR_SERVE_TOKEN"
LONG_POLL_S = 2.0
"""The longest the ingress's long poll of the version manager waits before it is renewed."""
LOAD_RETRY_S = 10.0
"""Placement inline: after a failed load of the serving version, a request loads it again after this long."""
R = TypeVar("R")
_WAITING: ContextVar[Counter[str] | None] = ContextVar("waiting_on", default=None)
"""The calls one request awaits now, by stage (``waiting_on``): what a request that ran out of time names."""


app = FastAPI(title="ray-mgdspr retrieval", version="1", docs_url="/docs", redoc_url=None)
UI_PAGE = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
"""The search page served at ``GET /ui``."""


def request_id(request: Request) -> str:
    """Serve's id of this request (its proxy sets ``x-request-id``, echoing a client's own), else a new one."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


@contextlib.contextmanager
def awaited_stages() -> Iterator[Counter[str]]:
    """The stages this request awaits (``_WAITING``), counted by the ``waiting_on`` blocks run inside."""
    waiting: Counter[str] = Counter()
    reset = _WAITING.set(waiting)
    try:
        yield waiting
    finally:
        _WAITING.reset(reset)


@contextlib.contextmanager
def waiting_on(stage: str) -> Iterator[None]:
    """Count ``stage`` as awaited by this request (``_WAITING``) while the block runs, and after, when the block
    was cancelled (the request's deadline): then it is what the request still waited on."""
    waiting = _WAITING.get()
    if waiting is None:
        yield
        return
    waiting[stage] += 1
    try:
        yield
    except asyncio.CancelledError:
        raise
    except BaseException:
        waiting[stage] -= 1
        raise
    waiting[stage] -= 1


def waited_for(waiting: Counter[str]) -> str:
    """The stages a request still awaited, for its 503 and the log: ``"encode"``, ``"search x2"``, ``"nothing"``
    (its time went on its own work: the event loop or the CPU were busy)."""
    return ", ".join(s if n == 1 else f"{s} x{n}" for s, n in sorted(waiting.items()) if n > 0) or "nothing"


@app.exception_handler(HttpError)
async def _http_error(request: Request, e: HttpError) -> JSONResponse:
    return JSONResponse({"error": e.message, **e.extra, "request_id": request_id(request)}, status_code=e.status,
                        headers=e.headers)


@app.exception_handler(Exception)
async def _bug(request: Request, e: Exception) -> JSONResponse:
    """The last resort: whatever escaped a route is a bug, answered 500 with the request id, never a traceback."""
    rid = request_id(request)
    log.error("request %s %s failed (a bug)", rid, request.url.path, exc_info=e)
    return JSONResponse({"error": "internal error; the server log has its traceback under this request id",
                         "request_id": rid}, status_code=500)


@dataclass
class _Serving:
    """One version, read once per request: its handles per stage (``encoder``, ``shards``, ``head``), or the one
    deployment of the whole version (``whole``, ``serve.placement: colocated``), or the whole version in this
    replica (``loader``, which awaits its loading: ``serve.placement: inline``)."""

    version: str
    encoder: DeploymentHandle | None = None
    shards: tuple[DeploymentHandle, ...] = ()
    head: DeploymentHandle | None = None
    whole: DeploymentHandle | None = None
    loader: Callable[[str], Awaitable[WholeVersion]] | None = None
    _local: WholeVersion | None = None

    async def local(self) -> WholeVersion:
        """Placement inline: this replica's copy of the version, once loaded (kept here: a request that started
        on it, or its canary sample, never loads it again after a switch)."""
        if self._local is None:
            self._local = await self.loader(self.version)
        return self._local

    @classmethod
    def of(cls, app_name: str, version: str, placement: str, shards: int) -> "_Serving":
        name = version_app_name(app_name, version)
        if placement == "colocated":
            return cls(version, whole=serve.get_deployment_handle("version", name))
        return cls(version, serve.get_deployment_handle("encoder", name),
                   tuple(serve.get_deployment_handle(f"shard-{s}", name) for s in range(shards)),
                   serve.get_deployment_handle("head", name))

    async def behaviours(self, user_id: int, ts: int, limit: int) -> list[dict]:
        """A user's behaviours with this version's titles (``VersionHead.behaviours``)."""
        if self.loader is not None:
            return await (await self.local()).behaviours(user_id, ts, limit)
        return await (self.whole or self.head).behaviours.remote(user_id, ts, limit)

    async def canary(self, embedding: np.ndarray, k: int) -> list[CanaryHits]:
        """Every shard's canary sample of one query (its top k as served and exact), in shard order."""
        if self.loader is not None:
            return await (await self.local()).canary((embedding, k))
        if self.whole is not None:
            return await self.whole.canary.remote((embedding, k))
        return list(await asyncio.gather(*(s.canary.remote((embedding, k)) for s in self.shards)))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _inline(schema: Any, defs: dict) -> Any:
    """A JSON schema with its ``#/$defs/...`` references replaced by what they name."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def _body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its body itself (size, encoding, then the strict model),
    so that ``/openapi.json`` documents it and schema-driven clients and fuzzers can generate it."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}}}


def _params(model: type[BaseModel], path: tuple[str, ...]) -> dict:
    """The OpenAPI parameters of a GET route that parses its path and query string itself with ``model``
    (``Ingress._query``): the fields named in ``path`` are path parameters, the others query parameters."""
    schema = model.model_json_schema()
    defs, required = schema.get("$defs", {}), set(schema.get("required", ()))

    def given(field: dict) -> dict:  # a parameter is given or absent, never null
        options = [o for o in field.get("anyOf", ()) if o.get("type") != "null"]
        return {**{k: v for k, v in field.items() if k != "anyOf"}, **options[0]} if len(options) == 1 else field

    return {"parameters": [
        {"name": name, "in": "path" if name in path else "query", "required": name in path or name in required,
         "description": field.get("description", ""), "schema": _inline(given(field), defs)}
        for name, field in schema["properties"].items()]}


class _HandleStages:
    """``engine.Stages`` over one version's deployment handles: each call retried within the request's deadline
    (``Ingress._read``), the shard fan-out and BM25 run concurrently."""

    def __init__(self, ingress: "Ingress", serving: _Serving, deadline: float) -> None:
        self.ingress, self.serving, self.deadline = ingress, serving, deadline
        self.encoded: Encoded | None = None  # the query's encoding, for a recall canary sample of the request

    async def encode(self, query: str, user_id: int | None, ts: int) -> Encoded:
        self.encoded = await self.ingress._read(
            "encode", lambda: self.serving.encoder.encode.remote((query, user_id, ts)), self.deadline)
        return self.encoded

    async def shards(self, embedding: np.ndarray, depth: int, terms: tuple[KeyTerm, ...], need: int | None
                     ) -> list[Hits]:
        return list(await asyncio.gather(*(
            self.ingress._read("search", lambda s=s: s.search.remote((embedding, depth, terms, need)), self.deadline)
            for s in self.serving.shards)))

    async def lexical(self, words: list[str], k: int, terms: tuple[KeyTerm, ...]) -> Hits:
        return await self.ingress._read("lexical", lambda: self.serving.head.search.remote(words, k, terms),
                                        self.deadline)

    def early_fallback(self, words: list[str], k: int, terms: tuple[KeyTerm, ...], limit: int) -> None:
        return None  # a BM25 call beside every key-term request's search would cost a hop each: after, as needed

    async def together(self, *calls: Awaitable[Any]) -> list[Any]:
        return list(await asyncio.gather(*calls))


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP: validation, auth, fan-out to the shards, merge, relevance filter, metrics.

    Errors follow ``serve/errors.py``: 4xx name the field and the problem, 503 (with ``Retry-After``) only when
    a stage is unavailable, 500 for a bug. Reads are idempotent: one that fails because its replica died is
    retried on another replica within the request's deadline (``_read``)."""

    async def __init__(self, settings: dict, manager: DeploymentHandle) -> None:
        self.cfg = ResolvedServeConfig.model_validate(settings)
        self.manager = manager
        self.serving: _Serving | None = None
        self._refresher: asyncio.Task | None = None
        self._loads: dict[str, asyncio.Task[WholeVersion]] = {}  # placement inline: version -> its loading here
        self._failed_at: dict[str, float] = {}  # placement inline: version -> when its loading here failed
        self._loading: str | None = None  # placement inline: the version being staged (VersionInfo.loading)
        self._store = None
        self._token = os.environ.get(TOKEN_ENV) or self.cfg.token
        self.metrics = ServingMetrics()  # exported through Ray (all replicas) and GET /metrics (this one)
        self._canary_tasks: set[asyncio.Task] = set()  # recall canary samples in flight (held: tasks are weak)
        self._canary: dict[str, RecallWindow] = {}  # version -> this replica's last serve.canary_window samples
        if self.cfg.placement == "inline":  # Serve routes requests here once this returns: the version is loaded
            try:
                await self._loaded((await self._current(time.monotonic() + self.cfg.load_timeout_s)).version)
            except Exception as e:  # the manager restarting, a version that fails here: the first request retries
                log.error("this ingress replica starts without its version loaded: %s", e)

    # ------------------------------------------------------------------ version

    async def _current(self, deadline: float | None = None) -> _Serving:
        if self._refresher is None or self._refresher.done():
            if self._refresher is not None:  # a bug, or cancelled: logged, and the replica follows the manager again
                log.error("the long poll of the version manager had ended (%s); restarting it",
                          "cancelled" if self._refresher.cancelled() else repr(self._refresher.exception()))
            self._refresher = replica_task(self._refresh_forever(), "follow the version manager")
        if self.serving is None:
            await self._refresh(deadline)
        if self.serving is None:
            raise unavailable("no version is loaded yet; retry shortly")
        return self.serving

    async def _refresh(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.cfg.request_timeout_s
        known = self.serving.version if self.serving else None
        self._follow(VersionInfo.model_validate(await self._read(
            "manager", lambda: self.manager.active.remote(known), deadline)))

    def _follow(self, info: VersionInfo) -> None:
        """Serve ``info.version`` from now on (new requests; those in flight finish on theirs). Placement inline:
        load it and the version being staged (``info.loading``) here, drop any other."""
        self._loading = info.loading  # the long poll waits while it is unchanged
        if self.cfg.placement == "inline":
            wanted = {v for v in (info.version, info.loading) if v}
            for version in set(self._loads) - wanted:  # requests in flight on it keep their copy
                del self._loads[version]
                self._failed_at.pop(version, None)
            for version in wanted - set(self._loads):  # one that failed is retried by requests (LOAD_RETRY_S)
                self._start_load(version)
        if info.version is None or (self.serving and self.serving.version == info.version):
            return
        if self.cfg.placement == "inline":
            self.serving = _Serving(info.version, loader=self._loaded)
        else:
            self.serving = _Serving.of(self.cfg.app_name, info.version, self.cfg.placement, info.shards or 0)
        self.metrics.serving(info.version)

    # ------------------------------------------------------------------ placement inline: versions held here

    def _start_load(self, version: str) -> asyncio.Task[WholeVersion]:
        """The loading of ``version`` in this replica (``versions.WholeVersion``, in a thread): the one under way
        or done, or a new one (also after a failure more than ``LOAD_RETRY_S`` ago)."""
        task = self._loads.get(version)
        failed = self._failed_at.get(version)
        if task is None or (failed is not None and time.monotonic() - failed > LOAD_RETRY_S):
            self._failed_at.pop(version, None)
            task = self._loads[version] = replica_task(self._load(version), f"load version {version}",
                                                       logs_its_errors=True)  # _load logs; requests await it
        return task

    async def _load(self, version: str) -> WholeVersion:
        started = time.monotonic()
        try:
            whole = await asyncio.to_thread(WholeVersion, self.cfg, version)
        except Exception:
            self._failed_at[version] = time.monotonic()
            log.exception("loading version %s in this ingress replica failed", version)
            raise
        log.info("version %s loaded in this ingress replica in %.1f s", version, time.monotonic() - started)
        return whole

    async def _loaded(self, version: str) -> WholeVersion:
        """This replica's copy of ``version``, once loaded; 503 when it fails to load (the error named) or is no
        longer served here. Cancelling the caller (its deadline) leaves the loading running for the others."""
        if version not in self._loads and version not in (self._loading, self.serving and self.serving.version):
            raise unavailable(f"version {version} is no longer served by this replica; retry")
        task = self._start_load(version)
        try:
            return await asyncio.shield(task)
        except Exception as e:
            raise unavailable(f"version {version} could not be loaded: {public_message(str(e))}") from None

    async def serving_version(self) -> str | None:
        """The version this replica serves (None before its first is known): a restarted version manager asks every
        running replica (``VersionManager._ask_ingress``) before it chooses what serves."""
        return self.serving.version if self.serving else None

    async def stage(self, version: str) -> None:
        """Load ``version`` here beside the one that serves: the version manager calls this on every ingress
        replica at once before it switches (``VersionManager._switch_inline``); raises when it cannot be loaded."""
        if self.cfg.placement != "inline":
            raise RuntimeError(f"stage() is for serve.placement inline, not {self.cfg.placement}")
        self._loading = version
        task = self._start_load(version)
        await self._loaded(version)
        self._loads.setdefault(version, task)  # a poll answered before the staging began may have dropped it

    async def _refresh_forever(self) -> None:
        """Follow the version manager's switches: a long poll (``VersionManager.watch``) that answers at once when
        the version switches, renewed every ``LONG_POLL_S`` (short: a replica shutting down waits for it); after
        a failed poll (the manager restarting), ask again after ``serve.version_refresh_s``."""
        republished = time.monotonic()
        while True:
            known = self.serving.version if self.serving else None
            try:
                self._follow(VersionInfo.model_validate(await self.manager.watch.remote(known, LONG_POLL_S,
                                                                                        self._loading)))
            except Exception:
                log.exception("asking the version manager failed; keeping %s", known)
                await asyncio.sleep(self.cfg.version_refresh_s)
            if time.monotonic() - republished >= GAUGE_REFRESH_S:  # Ray's export drops gauges not set again
                self.metrics.republish()
                republished = time.monotonic()

    async def _read(self, stage: str, call: Callable[[], Awaitable[R]], deadline: float) -> R:
        """``call()`` (a handle call), retried while its replica died or is unavailable (``errors.RETRYABLE``):
        Serve routes the retry to another replica (or waits for a replacement), after ``serve.retry_backoff_ms``,
        doubling, until ``deadline`` (monotonic seconds). Raises a 503 when the deadline comes first; any other
        failure (a bug in the stage) is raised as it is."""
        wait = self.cfg.retry_backoff_ms / 1000
        while True:
            try:
                with waiting_on(stage):
                    return await call()
            except RETRYABLE as e:
                if time.monotonic() + wait >= deadline:
                    raise unavailable(f"the {stage} stage is unavailable (a replica is restarting or overloaded); "
                                      "retry") from e
                self.metrics.retries.labels(stage).inc()
                log.warning("%s call failed (%s); retrying on another replica in %.0f ms", stage,
                            type(cause(e)).__name__, wait * 1000)
                await asyncio.sleep(wait)
                wait *= 2

    # ------------------------------------------------------------------ input

    async def _json(self, request: Request, endpoint: str, limit: str = "max_body_bytes") -> Any:
        """The request body as JSON, after the size and encoding checks (413 / 400); ``limit``: the
        ``ServeConfig`` field that bounds this endpoint's body."""
        max_bytes = getattr(self.cfg, limit)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise HttpError(413, f"{endpoint}: request body of {declared} bytes exceeds serve.{limit}={max_bytes}")
        body = await request.body()
        if len(body) > max_bytes:
            raise HttpError(413, f"{endpoint}: request body of {len(body)} bytes exceeds serve.{limit}={max_bytes}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HttpError(400, f"{endpoint}: request body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise HttpError(400, f"{endpoint}: request body is not valid JSON ({e.msg} at line {e.lineno} "
                                 f"column {e.colno})") from None
        except ValueError as e:  # NaN / Infinity: not JSON (RFC 8259), though Python's parser takes them
            raise HttpError(400, f"{endpoint}: request body is not valid JSON ({e})") from None
        except RecursionError:
            raise HttpError(400, f"{endpoint}: request body nests too deep to parse") from None

    def _parse(self, model: type, data: Any, endpoint: str) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as e:
            problems = [{"field": ".".join(str(p) for p in err["loc"]) or "(body)", "problem": err["msg"]}
                        for err in e.errors(include_url=False, include_input=False)]
            raise HttpError(422, f"{endpoint}: invalid request: " + "; ".join(
                f"{p['field']}: {p['problem']}" for p in problems), problems=problems) from None

    def _query(self, request: Request, endpoint: str) -> dict[str, str]:
        """A GET route's path parameters and query string as one dict of strings, for ``_parse``; a query parameter
        given twice is refused (422 naming it), never one of its values silently taken."""
        given = request.query_params.multi_items()
        twice = sorted({name for name, _ in given if sum(n == name for n, _ in given) > 1})
        if twice:
            problems = [{"field": name, "problem": "given more than once"} for name in twice]
            raise HttpError(422, f"{endpoint}: invalid request: " + "; ".join(
                f"{p['field']}: {p['problem']}" for p in problems), problems=problems)
        return {**dict(given), **request.path_params}

    def _authorize(self, request: Request, what: str) -> None:
        if not self._token:
            raise HttpError(403, f"{what} is disabled: set the {TOKEN_ENV} environment variable or serve.token")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            raise HttpError(401, f"{what} needs the header 'Authorization: Bearer <token>'")

    async def _respond(self, endpoint: str, request: Request, handle: Callable[[float], Awaitable[dict]],
                       timeout_s: float | None = None) -> JSONResponse:
        """Run one route's ``handle(deadline)`` within ``timeout_s`` (default ``serve.request_timeout_s``), count
        its status, and map what it raised onto the taxonomy (``serve/errors.py``)."""
        timeout_s = timeout_s or self.cfg.request_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            with awaited_stages() as waiting:  # copied into handle's task: its stage calls count themselves there
                body = await asyncio.wait_for(handle(deadline), timeout_s)
        except HttpError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        except TimeoutError:  # a stage overloaded, or every replica of one restarting: retryable
            self.metrics.requests.labels(endpoint, "503").inc()
            stages = waited_for(waiting)
            log.warning("request %s to %s: no answer within %s s, still waiting on %s (serving %s)",
                        request_id(request), endpoint, timeout_s, stages,
                        self.serving.version if self.serving else None)
            raise unavailable(f"{endpoint}: no answer within {timeout_s} s (still waiting on {stages}: a stage is "
                              "overloaded or restarting); retry") from None
        except RETRYABLE as e:
            self.metrics.requests.labels(endpoint, "503").inc()
            raise unavailable(f"{endpoint}: a stage is unavailable ({type(cause(e)).__name__}); retry") from None
        except sqlite3.OperationalError as e:  # the behaviour store is locked or unreachable
            self.metrics.requests.labels(endpoint, "503").inc()
            log.warning("%s: behaviour store: %s", endpoint, e)
            raise unavailable(f"{endpoint}: the behaviour store is busy; retry") from None
        except Exception as e:
            self.metrics.requests.labels(endpoint, "500").inc()
            rid = request_id(request)
            log.error("request %s to %s failed (a bug)", rid, endpoint, exc_info=e)
            raise HttpError(500, f"{endpoint}: internal error; the server log has its traceback under this "
                                 "request id") from None
        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(body)

    # ------------------------------------------------------------------ routes

    @app.post("/v1/retrieve", openapi_extra=_body(RetrieveRequest), responses={200: {"model": RetrieveResponse}})
    async def retrieve(self, request: Request) -> JSONResponse:
        async def handle(deadline: float) -> dict:
            req: RetrieveRequest = self._parse(RetrieveRequest, await self._json(request, "retrieve"), "retrieve")
            try:
                k = request_k(req, self.cfg)
            except RequestRefused as e:
                raise HttpError(422, f"retrieve: {e}", problems=[{"field": e.field, "problem": e.problem}]) from None
            v = await self._current(deadline)
            if v.loader is not None:  # the whole version in this replica: no hop
                with waiting_on("load"):
                    whole = await v.local()
                with waiting_on("version"):
                    body, embedding = await whole.answer((req, k))
            elif v.whole is not None:  # the whole version in one replica: one call
                body, embedding = await self._read("version", lambda: v.whole.answer.remote((req, k)), deadline)
            else:
                stages = _HandleStages(self, v, deadline)
                body = await retrieve(req, k, self.cfg, v.version, stages)
                embedding = None if stages.encoded is None else stages.encoded.embedding
            self._observe(body)
            if "embedding" in req.channels and embedding is not None:
                self._sample(v, embedding)
            return body

        return await self._respond("retrieve", request, handle)

    def _observe(self, body: dict) -> None:
        """The metrics of one answer: stage times, the filter's removals, fallbacks and relaxed fills."""
        for stage, ms in body["latency_ms"].items():
            self.metrics.stage_seconds.labels(stage).observe(ms / 1000)
        self.metrics.filtered.inc(body["filtered"])
        if body["fallback"] is not None:
            self.metrics.fallbacks.inc()
        if body["relaxed_to"] is not None:
            self.metrics.relaxed.inc()

    # ------------------------------------------------------------------ the recall canary (serve/canary.py)

    def _sample(self, serving: _Serving, embedding: np.ndarray) -> None:
        """With probability ``serve.canary_share``, measure this request's ANN recall in the background: a task
        the response never waits for (at most ``canary.MAX_IN_FLIGHT`` at once; more are skipped and counted)."""
        if self.cfg.canary_share <= 0 or random.random() >= self.cfg.canary_share:
            return
        if len(self._canary_tasks) >= MAX_IN_FLIGHT:
            self.metrics.canary_samples.labels(serving.version, "skipped").inc()
            return
        task = replica_task(self._canary_sample(serving, embedding), "recall canary sample")
        self._canary_tasks.add(task)
        task.add_done_callback(self._canary_tasks.discard)

    async def _canary_sample(self, serving: _Serving, embedding: np.ndarray) -> None:
        """Every shard's top ``serve.canary_k`` as served and exact (``IndexShard.canary``), each side merged,
        their overlap recorded: this replica's window and gauge, the samples counter, and the version manager's
        window (``GET /v1/version``). Never raises: a failure is logged and counted."""
        version, k = serving.version, self.cfg.canary_k
        try:
            hits = await asyncio.wait_for(serving.canary(embedding, k), self.cfg.request_timeout_s)
            recall = float(merged_recall([h.ann for h in hits], [h.exact for h in hits], k)[0])
        except Exception:
            self.metrics.canary_samples.labels(version, "failed").inc()
            log.warning("a recall canary sample of version %s failed", version, exc_info=True)
            return
        if math.isnan(recall):  # an empty index: nothing to measure
            return
        reference = hits[0].reference
        window = self._canary.setdefault(version, RecallWindow(self.cfg.canary_window))
        self.metrics.canary(version, window.add(recall, reference))
        self.metrics.canary_samples.labels(version, "ok").inc()
        try:
            await asyncio.wait_for(self._tell_manager(version, recall, reference), self.cfg.request_timeout_s)
        except Exception:
            log.warning("the version manager did not take a recall canary sample of %s", version, exc_info=True)

    async def _tell_manager(self, version: str, recall: float, reference: str) -> None:
        await self.manager.canary.remote(version, recall, reference)

    @app.post("/v1/events", openapi_extra=_body(EventsRequest))
    async def events(self, request: Request) -> JSONResponse:
        async def handle(_: float) -> dict:
            self._authorize(request, "POST /v1/events")
            req: EventsRequest = self._parse(EventsRequest, await self._json(request, "events", "max_events_bytes"),
                                             "events")
            n = len(req.behaviours) + len(req.queries)
            if n > self.cfg.max_events:
                raise HttpError(422, f"events: {n} events in one request, more than serve.max_events="
                                     f"{self.cfg.max_events}", problems=[{"field": "(body)", "problem": "too many"}])
            if self._store is None:
                self._store = open_store(self.cfg.store, FeatureConfig())  # appending reads no windows
            await asyncio.to_thread(self._store.append, req.behaviours, req.queries)
            return {"appended": {"behaviours": len(req.behaviours), "queries": len(req.queries)}}

        return await self._respond("events", request, handle)

    @app.get("/v1/users/{user_id}/behaviours", openapi_extra=_params(BehavioursRequest, path=("user_id",)),
             responses={200: {"model": BehavioursResponse}})
    async def behaviours(self, request: Request) -> JSONResponse:
        """A user's behaviours that personalise their searches, most recent first, with the serving version's
        titles (bearer token: a history is personal data; docs/serving.md)."""
        async def handle(deadline: float) -> dict:
            self._authorize(request, "GET /v1/users/{user_id}/behaviours")
            req: BehavioursRequest = self._parse(BehavioursRequest, self._query(request, "behaviours"), "behaviours")
            v = await self._current(deadline)
            ts = request_ts(req.ts)
            data = await self._read("behaviours", lambda: v.behaviours(req.user_id, ts, req.limit), deadline)
            return behaviours_body(req.user_id, v.version, ts, data)

        return await self._respond("behaviours", request, handle)

    @app.post("/v1/admin/promote", openapi_extra=_body(PromoteRequest))
    async def promote(self, request: Request) -> JSONResponse:
        async def handle(deadline: float) -> dict:
            self._authorize(request, "POST /v1/admin/promote")
            req: PromoteRequest = self._parse(PromoteRequest, await self._json(request, "promote"), "promote")
            try:  # retried on the manager's replacement when it restarts (promoting again is a no-op)
                info = await self._read("manager", lambda: self.manager.promote.remote(req.version), deadline)
            except PromotionRefused as e:  # Ray's wrapper of it carries the manager's traceback: not for clients
                raise HttpError(409, f"version {req.version} refused; the serving version is unchanged: "
                                     f"{public_message(str(cause(e)))}") from None
            await self._refresh()
            return info

        # loading a version takes up to serve.load_timeout_s, not a read's request_timeout_s
        return await self._respond("promote", request, handle, timeout_s=self.cfg.load_timeout_s + 30)

    @app.get("/v1/version")
    async def version(self) -> JSONResponse:
        return JSONResponse(await self._read("manager", lambda: self.manager.describe.remote(),
                                             time.monotonic() + self.cfg.request_timeout_s))

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Readiness: 200 once a version is loaded; 503 before, or while the first one cannot be loaded."""
        try:
            v = await self._current()
        except HttpError:
            raise
        except Exception as e:  # the version manager could not load the first version: not ready, not a bug
            raise unavailable(f"no version is loaded: {public_message(str(cause(e)))}") from None
        if v.loader is not None and v._local is None:  # placement inline: loaded here?
            task = self._start_load(v.version)
            if not task.done():
                raise unavailable(f"version {v.version} is still loading in this replica")
            await v.local()  # a 503 naming why it failed
        return JSONResponse({"status": "ok", "version": v.version})

    @app.get("/ui")
    async def ui(self) -> HTMLResponse:
        """The search page (``serve/ui.html``): read-only without the token, like the API it calls."""
        return HTMLResponse(UI_PAGE, headers={"cache-control": "no-cache"})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """This ingress replica's series only; Prometheus should scrape Ray's export (``serve/metrics.py``)."""
        body, content_type = self.metrics.text()
        return Response(body, media_type=content_type)
