"""Ray Serve deployments of the retrieval endpoint.

Two kinds of Serve application:

- the **front** application (``serve.app_name``, route ``/``): ``Ingress`` (FastAPI: validation, auth,
  fan-out, merge, metrics) and ``VersionManager`` (one replica: which version serves, promotion, drain);
- one **version** application per served version (``<app_name>-<version>``, no route): ``encoder``
  (``QueryEncoderDeployment``), ``shard-0`` .. ``shard-{S-1}`` (``IndexShard``, one deployment per shard,
  since replicas of one deployment are load-balanced, not fanned out) and ``head`` (``VersionHead``: the
  lexical channel; it binds the others into one application).

A request reads the serving version once and calls only that version's application, so it is answered by
one version end to end. Promotion deploys the new version's application beside the old, waits until every
replica has loaded and verified it, flips the manager's choice (ingress replicas follow within
``version_refresh_s``), and deletes the old application after ``drain_s``. A version that fails
verification or loading is deleted and the old one keeps serving. Replicas started later (autoscaling,
restarts) load their own application's version.
"""


import asyncio
import hmac
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_mgdspr.config import FeatureConfig, ServeConfig
from ray_mgdspr.index.shards import current_version, set_current
from ray_mgdspr.model.bundle import bundle_summary
from ray_mgdspr.serve.engine import (
    Encoded,
    Hits,
    LexicalChannel,
    QueryEncoder,
    ReleaseError,
    ShardSearcher,
    assemble,
    each_alone,
    embedding_depth,
    fetch_size,
    fill_page,
    merge_hits,
    needs_fallback,
    needs_relaxing,
    relaxed_terms,
    response_body,
    verify_release,
)
from ray_mgdspr.serve.errors import RETRYABLE, HttpError, cause, public_message, unavailable
from ray_mgdspr.serve.metrics import BatchSizes, ServingMetrics
from ray_mgdspr.serve.relevance import KeyTerm
from ray_mgdspr.serve.schemas import EventsRequest, PromoteRequest, RetrieveRequest, VersionInfo
from ray_mgdspr.serve.store import open_store

log = logging.getLogger("ray.serve")

TOKEN_ENV = "MGDSPR_SERVE_TOKEN"
STAGES = ("encode", "search", "merge", "lexical", "filter", "fallback", "relaxed", "total")
R = TypeVar("R")


def version_app_name(app_name: str, version: str) -> str:
    return f"{app_name}-{version}"


def _batched(fn: Any, cfg: ServeConfig) -> None:
    """Apply the configured batch size and wait to a ``@serve.batch`` method."""
    fn.set_max_batch_size(cfg.batch_size)
    fn.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)


def _own(result: R | Exception) -> R:
    """One caller's share of a batch (``engine.each_alone``): its result, or its own failure raised."""
    if isinstance(result, Exception):
        raise result
    return result


# ------------------------------------------------------------------------------------- version app


@serve.deployment
class QueryEncoderDeployment:
    """H_qu of batched requests (``@serve.batch``), with histories from the behaviour store."""

    def __init__(self, settings: dict, version: str) -> None:
        cfg = ServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)  # load_bundle checks its files
        self.core = QueryEncoder(release.bundle_path, cfg.world, open_store(cfg.store, release.bundle.features),
                                 threads=cfg.torch_threads)
        self.batch_sizes = BatchSizes("encoder")
        _batched(self._encode, cfg)

    async def encode(self, request: tuple[str, int | None, int]) -> Encoded:
        """H_qu of one (query, user id, ts), computed in a batch with concurrent requests."""
        return _own(await self._encode(request))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _encode(self, requests: list[tuple[str, int | None, int]]) -> list[Encoded | Exception]:
        self.batch_sizes.observe(len(requests))
        return await asyncio.to_thread(each_alone, self._encode_now, requests)

    def _encode_now(self, requests: list[tuple[str, int | None, int]]) -> list[Encoded]:
        queries, users, ts = (list(x) for x in zip(*requests, strict=True))
        return self.core.encode(queries, users, ts)


@serve.deployment
class IndexShard:
    """One shard of one version: batched top-k with each hit's relevance verdict."""

    def __init__(self, settings: dict, version: str, shard_no: int) -> None:
        cfg = ServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)  # load_shard checks its files
        self.core = ShardSearcher(release.index_path, shard_no, cfg.backend or "auto", nprobe=cfg.nprobe or 16,
                                  ef_search=cfg.ef_search or 128, faiss_threads=cfg.faiss_threads)
        self.batch_sizes = BatchSizes("shard")
        _batched(self._search, cfg)

    async def search(self, request: tuple[np.ndarray, int, tuple[KeyTerm, ...], int | None]) -> Hits:
        """One request: (H_qu, depth, key terms, k when the filter is on else None; see ``ShardSearcher.search``),
        searched in a batch with concurrent requests."""
        return _own(await self._search(request))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _search(self, requests: list[tuple[np.ndarray, int, tuple[KeyTerm, ...], int | None]]
                      ) -> list[Hits | Exception]:
        self.batch_sizes.observe(len(requests))
        return await asyncio.to_thread(each_alone, self._search_now, requests)

    def _search_now(self, requests: list[tuple[np.ndarray, int, tuple[KeyTerm, ...], int | None]]) -> list[Hits]:
        return self.core.search(np.stack([r[0] for r in requests]), [r[1] for r in requests],
                                [r[2] for r in requests], need=[r[3] for r in requests])


@serve.deployment
class VersionHead:
    """The version application's root: the lexical channel (BM25 over titles) of this version's catalogue.

    It takes the encoder and shard handles only so that one application deploys them all; the ingress
    calls those deployments itself.
    """

    def __init__(self, settings: dict, version: str, encoder: DeploymentHandle,
                 shards: list[DeploymentHandle]) -> None:
        cfg = ServeConfig.model_validate(settings)
        self.version = version
        self.lexical = LexicalChannel(cfg.world)
        self._bound = (encoder, shards)

    async def search(self, words: list[str], k: int, terms: tuple[KeyTerm, ...]) -> Hits:
        return (await asyncio.to_thread(self.lexical.search, [words], k, [terms]))[0]


def version_app(cfg: ServeConfig, version: str, shards: int) -> serve.Application:
    """The Serve application of one version (see the module docstring)."""
    settings = cfg.model_dump()
    encoder = QueryEncoderDeployment.options(name="encoder", **cfg.encoder.serve_options()).bind(settings, version)
    shard_handles = [IndexShard.options(name=f"shard-{s}", **cfg.shard.serve_options()).bind(settings, version, s)
                     for s in range(shards)]
    return VersionHead.options(name="head", **cfg.head.serve_options()).bind(settings, version, encoder,
                                                                                shard_handles)


# --------------------------------------------------------------------------------------- front app


class PromotionRefused(RuntimeError):
    """A version that was not switched to; the old one keeps serving."""


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class VersionManager:
    """Which version serves; loads new ones beside it and switches (one replica: the single writer)."""

    def __init__(self, settings: dict) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        self.info = VersionInfo(version=None)
        self._lock = asyncio.Lock()
        self._draining: dict[str, float] = {}  # version -> when its application is deleted
        self._refused: set[str] = set()
        self._loop: asyncio.Task | None = None
        self._first = self.cfg.version or current_version(self.cfg.index_root)
        if self._first is None:
            raise RuntimeError(f"nothing to serve: {self.cfg.index_root} has no CURRENT version and serve.version "
                               "is not set; build an index (`mgdspr index build`) or name a version")

    async def active(self) -> dict:
        """The serving version (``VersionInfo`` fields); loads the first one on the first call."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._housekeeping())
        if self.info.version is None:
            async with self._lock:
                if self.info.version is None:
                    await self._switch_to(self._first, initial=True)
        return self.info.model_dump()

    async def check_health(self) -> None:
        """Serve's periodic health check, the first right after the replica starts: begin loading the first
        version in the background, so an app started by `serve deploy` serves without waiting for a request."""
        if self.info.version is None and not self._lock.locked() and self._first not in self._refused:
            asyncio.get_running_loop().create_task(self._load_first())

    async def _load_first(self) -> None:
        try:
            await self.active()
        except Exception as e:  # recorded in info.last_error; the next request tries again
            log.error("loading the first version %s failed: %s", self._first, e)

    async def promote(self, version: str) -> dict:
        """Load ``version`` beside the serving one, then switch; raises ``PromotionRefused`` (old one serves)."""
        await self.active()
        async with self._lock:
            if version != self.info.version:
                await self._switch_to(version, initial=False)
        return self.info.model_dump()

    async def _switch_to(self, version: str, initial: bool) -> None:
        name = version_app_name(self.cfg.app_name, version)
        running = (await asyncio.to_thread(serve.status)).applications.get(name) if initial else None
        if running is not None and running.status in ("RUNNING", "DEPLOYING", "UNHEALTHY"):
            await self._adopt(version, name)
            return
        self.info.loading = version
        try:
            release = await asyncio.to_thread(verify_release, self.cfg.index_root, version)
            await asyncio.to_thread(serve._run, version_app(self.cfg, version, release.shards), _blocking=False,
                                    name=name, route_prefix=None,  # private API, pinned by tests/serve
                                    logging_config={"enable_access_log": False})
            await self._wait_running(name)
        except (ReleaseError, PromotionRefused, RuntimeError, ValueError) as e:
            self.info.last_error = public_message(f"{version}: {e}")  # GET /v1/version shows it: no paths
            self._refused.add(version)
            log.error("version %s refused, %s keeps serving: %s", version, self.info.version, e)  # in full
            if not isinstance(e, ReleaseError):
                await asyncio.to_thread(serve.delete, name, _blocking=False)
            if initial:
                raise
            raise PromotionRefused(self.info.last_error) from None
        finally:
            self.info.loading = None
        old = self.info.version
        if old is not None:
            self._draining[old] = time.time() + self.cfg.drain_s + 4 * self.cfg.version_refresh_s
        self.info = self.info.model_copy(update={
            "version": version, "shards": release.shards, "dim": release.index.dim,
            "model": bundle_summary(release.bundle), "previous": old, "switched_at": time.time(),
            "last_error": None, "draining": sorted(self._draining)})
        if current_version(self.cfg.index_root) != version:
            set_current(self.cfg.index_root, version)  # a restart serves what serves now
        log.info("serving version %s (was %s)", version, old)

    async def _adopt(self, version: str, name: str) -> None:
        """This manager restarted (its node was lost, say) while ``version``'s application kept serving: take it
        over as it is. It was verified when it was promoted; it is not redeployed, and never deleted here, even
        while some of its replicas are being replaced."""
        release = await asyncio.to_thread(verify_release, self.cfg.index_root, version, False)
        self.info = self.info.model_copy(update={
            "version": version, "shards": release.shards, "dim": release.index.dim,
            "model": bundle_summary(release.bundle), "last_error": None})
        log.info("adopted the running application %s: serving version %s", name, version)

    async def _wait_running(self, name: str) -> None:
        deadline = time.time() + self.cfg.load_timeout_s
        while time.time() < deadline:
            status = (await asyncio.to_thread(serve.status)).applications.get(name)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise PromotionRefused(f"its replicas failed to start: {status.message[-2000:]}")
            await asyncio.sleep(0.2)
        raise PromotionRefused(f"not loaded within load_timeout_s={self.cfg.load_timeout_s}")

    async def _housekeeping(self) -> None:
        """Delete drained versions; promote what CURRENT names when an operator moves it."""
        while True:
            await asyncio.sleep(0.5)
            try:
                now = time.time()
                for version, at in list(self._draining.items()):
                    if now >= at and version != self.info.version:
                        await asyncio.to_thread(serve.delete, version_app_name(self.cfg.app_name, version),
                                                _blocking=False)
                        del self._draining[version]
                        self.info.draining = sorted(self._draining)
                if self.cfg.watch_current_s and self.info.version is not None and not self._lock.locked():
                    wanted = current_version(self.cfg.index_root)
                    if wanted and wanted != self.info.version and wanted not in self._refused:
                        log.info("CURRENT of %s moved to %s: promoting", self.cfg.index_root, wanted)
                        await self.promote(wanted)
            except PromotionRefused:
                pass
            except Exception:
                log.exception("version housekeeping failed; retrying")

    async def describe(self) -> dict:
        return self.info.model_dump()


app = FastAPI(title="ray-mgdspr retrieval", version="1", docs_url="/docs", redoc_url=None)
UI_PAGE = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
"""The search page served at ``GET /ui``."""


def request_id(request: Request) -> str:
    """Serve's id of this request (its proxy sets ``x-request-id``, echoing a client's own), else a new one."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


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


@dataclass(frozen=True)
class _Serving:
    """One version's handles, read once per request."""

    version: str
    encoder: DeploymentHandle
    shards: list[DeploymentHandle]
    head: DeploymentHandle


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


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP: validation, auth, fan-out to the shards, merge, relevance filter, metrics.

    Errors follow ``serve/errors.py``: 4xx name the field and the problem, 503 (with ``Retry-After``) only when
    a stage is unavailable, 500 for a bug. Reads are idempotent: one that fails because its replica died is
    retried on another replica within the request's deadline (``_read``)."""

    def __init__(self, settings: dict, manager: DeploymentHandle) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        self.manager = manager
        self.serving: _Serving | None = None
        self._refresher: asyncio.Task | None = None
        self._store = None
        self._token = os.environ.get(TOKEN_ENV) or self.cfg.token
        self.metrics = ServingMetrics()  # exported through Ray (all replicas) and GET /metrics (this one)

    # ------------------------------------------------------------------ version

    async def _current(self, deadline: float | None = None) -> _Serving:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        if self.serving is None:
            await self._refresh(deadline)
        if self.serving is None:
            raise unavailable("no version is loaded yet; retry shortly")
        return self.serving

    async def _refresh(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.cfg.request_timeout_s
        info = VersionInfo.model_validate(await self._read("manager", lambda: self.manager.active.remote(),
                                                           deadline))
        if info.version is None or (self.serving and self.serving.version == info.version):
            return
        name = version_app_name(self.cfg.app_name, info.version)
        self.serving = _Serving(
            info.version, serve.get_deployment_handle("encoder", name),
            [serve.get_deployment_handle(f"shard-{s}", name) for s in range(info.shards or 0)],
            serve.get_deployment_handle("head", name))
        self.metrics.serving(info.version)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.version_refresh_s)
            try:
                await self._refresh()
            except Exception:
                log.exception("asking the version manager failed; keeping %s",
                              self.serving.version if self.serving else None)

    async def _read(self, stage: str, call: Callable[[], Awaitable[R]], deadline: float) -> R:
        """``call()`` (a handle call), retried while its replica died or is unavailable (``errors.RETRYABLE``):
        Serve routes the retry to another replica (or waits for a replacement), after ``serve.retry_backoff_ms``,
        doubling, until ``deadline`` (monotonic seconds). Raises a 503 when the deadline comes first; any other
        failure (a bug in the stage) is raised as it is."""
        wait = self.cfg.retry_backoff_ms / 1000
        while True:
            try:
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
            body = await asyncio.wait_for(handle(deadline), timeout_s)
        except HttpError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        except TimeoutError:  # a stage overloaded, or every replica of one restarting: retryable
            self.metrics.requests.labels(endpoint, "503").inc()
            raise unavailable(f"{endpoint}: no answer within {timeout_s} s (a stage is overloaded or "
                              "restarting); retry") from None
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

    @app.post("/v1/retrieve", openapi_extra=_body(RetrieveRequest))
    async def retrieve(self, request: Request) -> JSONResponse:
        async def handle(deadline: float) -> dict:
            req: RetrieveRequest = self._parse(RetrieveRequest, await self._json(request, "retrieve"), "retrieve")
            k = req.k if req.k is not None else self.cfg.default_k
            if not 1 <= k <= self.cfg.max_k:
                raise HttpError(422, f"retrieve: k must be between 1 and serve.max_k={self.cfg.max_k} (got {k})",
                                problems=[{"field": "k", "problem": f"not in 1..{self.cfg.max_k}"}])
            if len(req.query) > self.cfg.max_query_chars:
                raise HttpError(422, f"retrieve: query has {len(req.query)} characters, more than "
                                     f"serve.max_query_chars={self.cfg.max_query_chars}",
                                problems=[{"field": "query", "problem": "too long"}])
            return await self._answer(req, k, deadline)

        return await self._respond("retrieve", request, handle)

    async def _answer(self, req: RetrieveRequest, k: int, deadline: float) -> dict:
        v = await self._current(deadline)
        t0 = time.perf_counter()
        latency: dict[str, float] = {}
        ts = req.ts or int(time.time() * 1000)
        enc: Encoded = await self._read("encode", lambda: v.encoder.encode.remote((req.query, req.user_id, ts)),
                                        deadline)
        latency["encode"] = time.perf_counter() - t0

        async def timed(stage: str, call: Any) -> Any:
            t = time.perf_counter()
            result = await call
            latency[stage] = time.perf_counter() - t
            return result

        def lexical(terms: tuple[KeyTerm, ...]) -> Awaitable[Hits]:
            return self._read("lexical", lambda: v.head.search.remote(enc.words, fetch, terms), deadline)

        fetch = fetch_size(k, req.filter, self.cfg.filter_fetch, self.cfg.max_fetch)
        depth = embedding_depth(k, req.filter, enc.terms, self.cfg.filter_depth)
        need = k if req.filter else None
        calls = {}  # the channels run concurrently: the shard fan-out ("search") beside BM25 ("lexical")
        if "embedding" in req.channels:
            calls["embedding"] = timed("search", asyncio.gather(*(
                self._read("search", lambda s=s: s.search.remote((enc.embedding, depth, enc.terms, need)), deadline)
                for s in v.shards)))
        if "lexical" in req.channels:
            calls["lexical"] = timed("lexical", lexical(enc.terms))
        found: dict[str, Hits] = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
        if "embedding" in found:
            t = time.perf_counter()
            found["embedding"] = merge_hits(found["embedding"], depth)
            latency["merge"] = time.perf_counter() - t
        t = time.perf_counter()
        result = assemble(found, k, req.filter)
        latency["filter"] = time.perf_counter() - t
        if needs_fallback(result, found, k, req.filter, req.channels, self.cfg.fallback):
            # the filter left the page short: BM25's passing hits fill it (only then: one more hop)
            t = time.perf_counter()
            fill_page(result, await lexical(enc.terms), k)
            latency["fallback"] = time.perf_counter() - t
            self.metrics.fallbacks.inc()
        if needs_relaxing(result, k, req.filter, req.channels, self.cfg.fallback, enc.terms):
            # still short: too few items have every key term; fill with the query's product type (BM25-ranked)
            t = time.perf_counter()
            relaxed = relaxed_terms(enc.terms)
            fill_page(result, await lexical(relaxed), k, relaxed)
            latency["relaxed"] = time.perf_counter() - t
            self.metrics.relaxed.inc()
        latency["total"] = time.perf_counter() - t0
        for stage, seconds in latency.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.filtered.inc(result.filtered)
        return response_body(v.version, result, enc.terms, {s: round(x * 1000, 3) for s, x in latency.items()})

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

    @app.post("/v1/admin/promote", openapi_extra=_body(PromoteRequest))
    async def promote(self, request: Request) -> JSONResponse:
        async def handle(_: float) -> dict:
            self._authorize(request, "POST /v1/admin/promote")
            req: PromoteRequest = self._parse(PromoteRequest, await self._json(request, "promote"), "promote")
            try:
                info = await self.manager.promote.remote(req.version)
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
        v = await self._current()
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
