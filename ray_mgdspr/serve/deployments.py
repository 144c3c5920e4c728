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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
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
from ray_mgdspr.serve.relevance import KeyTerm
from ray_mgdspr.serve.schemas import EventsRequest, PromoteRequest, RetrieveRequest, VersionInfo
from ray_mgdspr.serve.store import open_store

log = logging.getLogger("ray.serve")

TOKEN_ENV = "MGDSPR_SERVE_TOKEN"
STAGES = ("encode", "search", "merge", "lexical", "filter", "fallback", "relaxed", "total")


def version_app_name(app_name: str, version: str) -> str:
    return f"{app_name}-{version}"


def _batched(fn: Any, cfg: ServeConfig) -> None:
    """Apply the configured batch size and wait to a ``@serve.batch`` method."""
    fn.set_max_batch_size(cfg.batch_size)
    fn.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)


# ------------------------------------------------------------------------------------- version app


@serve.deployment
class QueryEncoderDeployment:
    """H_qu of batched requests (``@serve.batch``), with histories from the behaviour store."""

    def __init__(self, settings: dict, version: str) -> None:
        cfg = ServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)  # load_bundle checks its files
        self.core = QueryEncoder(release.bundle_path, cfg.world, open_store(cfg.store, release.bundle.features),
                                 threads=cfg.torch_threads)
        _batched(self.encode, cfg)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode(self, requests: list[tuple[str, int | None, int]]) -> list[Encoded]:
        queries, users, ts = (list(x) for x in zip(*requests, strict=True))
        return await asyncio.to_thread(self.core.encode, queries, users, ts)


@serve.deployment
class IndexShard:
    """One shard of one version: batched top-k with each hit's relevance verdict."""

    def __init__(self, settings: dict, version: str, shard_no: int) -> None:
        cfg = ServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)  # load_shard checks its files
        self.core = ShardSearcher(release.index_path, shard_no, cfg.backend or "auto", nprobe=cfg.nprobe or 16,
                                  ef_search=cfg.ef_search or 128, faiss_threads=cfg.faiss_threads)
        _batched(self.search, cfg)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def search(self, requests: list[tuple[np.ndarray, int, tuple[KeyTerm, ...], int | None]]) -> list[Hits]:
        """Each request: (H_qu, depth, key terms, k when the filter is on else None; see ``ShardSearcher.search``)."""
        return await asyncio.to_thread(self.core.search, np.stack([r[0] for r in requests]),
                                       [r[1] for r in requests], [r[2] for r in requests],
                                       need=[r[3] for r in requests])


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
            self.info.last_error = f"{version}: {e}"
            self._refused.add(version)
            log.error("version %s refused, %s keeps serving: %s", version, self.info.version, e)
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


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@app.exception_handler(HttpError)
async def _http_error(_: Request, e: HttpError) -> JSONResponse:
    return JSONResponse({"error": e.message, **e.extra}, status_code=e.status)


@dataclass(frozen=True)
class _Serving:
    """One version's handles, read once per request."""

    version: str
    encoder: DeploymentHandle
    shards: list[DeploymentHandle]
    head: DeploymentHandle


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP: validation, auth, fan-out to the shards, merge, relevance filter, metrics."""

    def __init__(self, settings: dict, manager: DeploymentHandle) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        self.manager = manager
        self.serving: _Serving | None = None
        self._refresher: asyncio.Task | None = None
        self._store = None
        self._token = os.environ.get(TOKEN_ENV) or self.cfg.token
        self.registry = CollectorRegistry()
        self.requests = Counter("mgdspr_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("mgdspr_stage_seconds", "latency of each stage of /v1/retrieve", ["stage"],
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.filtered = Counter("mgdspr_filtered_items", "hits removed by the relevance filter",
                                registry=self.registry)
        self.fallbacks = Counter("mgdspr_fallback_pages", "responses the lexical fallback filled because the "
                                 "filter left fewer than k embedding hits", registry=self.registry)
        self.relaxed = Counter("mgdspr_relaxed_pages", "responses filled with the query's product type because too "
                               "few items have every key term", registry=self.registry)
        self.version_gauge = Gauge("mgdspr_serving_version", "1 for the version this replica serves",
                                   ["version"], registry=self.registry)

    # ------------------------------------------------------------------ version

    async def _current(self) -> _Serving:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        if self.serving is None:
            await self._refresh()
        if self.serving is None:
            raise HttpError(503, "no version is loaded yet; retry shortly")
        return self.serving

    async def _refresh(self) -> None:
        info = VersionInfo.model_validate(await self.manager.active.remote())
        if info.version is None or (self.serving and self.serving.version == info.version):
            return
        name = version_app_name(self.cfg.app_name, info.version)
        self.serving = _Serving(
            info.version, serve.get_deployment_handle("encoder", name),
            [serve.get_deployment_handle(f"shard-{s}", name) for s in range(info.shards or 0)],
            serve.get_deployment_handle("head", name))
        self.version_gauge.clear()
        self.version_gauge.labels(info.version).set(1)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.version_refresh_s)
            try:
                await self._refresh()
            except Exception:
                log.exception("asking the version manager failed; keeping %s",
                              self.serving.version if self.serving else None)

    # ------------------------------------------------------------------ input

    async def _json(self, request: Request, endpoint: str) -> Any:
        """The request body as JSON, after the size and encoding checks (413 / 400)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise HttpError(413, f"request body of {declared} bytes exceeds serve.max_body_bytes="
                                 f"{self.cfg.max_body_bytes}")
        body = await request.body()
        if len(body) > self.cfg.max_body_bytes:
            raise HttpError(413, f"request body of {len(body)} bytes exceeds serve.max_body_bytes="
                                 f"{self.cfg.max_body_bytes}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HttpError(400, f"{endpoint}: request body is not valid UTF-8 (byte {e.start})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise HttpError(400, f"{endpoint}: request body is not valid JSON ({e.msg} at line {e.lineno} "
                                 f"column {e.colno})") from None

    def _parse(self, model: type, data: Any, endpoint: str) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as e:
            problems = [{"field": ".".join(str(p) for p in err["loc"]) or "(body)", "problem": err["msg"]}
                        for err in e.errors()]
            raise HttpError(422, f"{endpoint}: invalid request: " + "; ".join(
                f"{p['field']}: {p['problem']}" for p in problems), problems=problems) from None

    def _authorize(self, request: Request, what: str) -> None:
        if not self._token:
            raise HttpError(403, f"{what} is disabled: set the {TOKEN_ENV} environment variable or serve.token")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            raise HttpError(401, f"{what} needs the header 'Authorization: Bearer <token>'")

    def _count(self, endpoint: str, code: int) -> None:
        self.requests.labels(endpoint, str(code)).inc()

    # ------------------------------------------------------------------ routes

    @app.post("/v1/retrieve")
    async def retrieve(self, request: Request) -> JSONResponse:
        try:
            req: RetrieveRequest = self._parse(RetrieveRequest, await self._json(request, "retrieve"), "retrieve")
            k = req.k if req.k is not None else self.cfg.default_k
            if not 1 <= k <= self.cfg.max_k:
                raise HttpError(422, f"retrieve: k must be between 1 and serve.max_k={self.cfg.max_k} (got {k})")
            if len(req.query) > self.cfg.max_query_chars:
                raise HttpError(422, f"retrieve: query has {len(req.query)} characters, more than "
                                     f"serve.max_query_chars={self.cfg.max_query_chars}")
            body = await asyncio.wait_for(self._answer(req, k), self.cfg.request_timeout_s)
        except HttpError as e:
            self._count("retrieve", e.status)
            raise
        except TimeoutError:  # a stage overloaded, or a replica died with requests on it: retryable
            self._count("retrieve", 503)
            raise HttpError(503, "retrieve: no answer within serve.request_timeout_s="
                                 f"{self.cfg.request_timeout_s} (a stage is overloaded or restarting); retry") \
                from None
        except Exception as e:  # a replica died or is restarting: retryable, never a crash of the server
            self._count("retrieve", 503)
            log.warning("retrieve failed: %r", e)
            raise HttpError(503, f"retrieve: a stage is unavailable ({type(e).__name__}); retry") from None
        self._count("retrieve", 200)
        return JSONResponse(body)

    async def _answer(self, req: RetrieveRequest, k: int) -> dict:
        v = await self._current()
        t0 = time.perf_counter()
        latency: dict[str, float] = {}
        ts = req.ts or int(time.time() * 1000)
        enc: Encoded = await v.encoder.encode.remote((req.query, req.user_id, ts))
        latency["encode"] = time.perf_counter() - t0


        async def timed(stage: str, call: Any) -> Any:
            t = time.perf_counter()
            result = await call
            latency[stage] = time.perf_counter() - t
            return result

        fetch = fetch_size(k, req.filter, self.cfg.filter_fetch, self.cfg.max_fetch)
        depth = embedding_depth(k, req.filter, enc.terms, self.cfg.filter_depth)
        need = k if req.filter else None
        calls = {}  # the channels run concurrently: the shard fan-out ("search") beside BM25 ("lexical")
        if "embedding" in req.channels:
            calls["embedding"] = timed("search", asyncio.gather(
                *(s.search.remote((enc.embedding, depth, enc.terms, need)) for s in v.shards)))
        if "lexical" in req.channels:
            calls["lexical"] = timed("lexical", v.head.search.remote(enc.words, fetch, enc.terms))
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
            fill_page(result, await v.head.search.remote(enc.words, fetch, enc.terms), k)
            latency["fallback"] = time.perf_counter() - t
            self.fallbacks.inc()
        if needs_relaxing(result, k, req.filter, req.channels, self.cfg.fallback, enc.terms):
            # still short: too few items have every key term; fill with the query's product type (BM25-ranked)
            t = time.perf_counter()
            relaxed = relaxed_terms(enc.terms)
            fill_page(result, await v.head.search.remote(enc.words, fetch, relaxed), k, relaxed)
            latency["relaxed"] = time.perf_counter() - t
            self.relaxed.inc()
        latency["total"] = time.perf_counter() - t0
        for stage, seconds in latency.items():
            self.latency.labels(stage).observe(seconds)
        self.filtered.inc(result.filtered)
        return response_body(v.version, result, enc.terms, {s: round(x * 1000, 3) for s, x in latency.items()})

    @app.post("/v1/events")
    async def events(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request, "POST /v1/events")
            req: EventsRequest = self._parse(EventsRequest, await self._json(request, "events"), "events")
            n = len(req.behaviours) + len(req.queries)
            if n > self.cfg.max_events:
                raise HttpError(422, f"events: {n} events in one request, more than serve.max_events="
                                     f"{self.cfg.max_events}")
            if self._store is None:
                self._store = open_store(self.cfg.store, FeatureConfig())  # appending reads no windows
            await asyncio.to_thread(self._store.append, req.behaviours, req.queries)
        except HttpError as e:
            self._count("events", e.status)
            raise
        self._count("events", 200)
        return JSONResponse({"appended": {"behaviours": len(req.behaviours), "queries": len(req.queries)}})

    @app.post("/v1/admin/promote")
    async def promote(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request, "POST /v1/admin/promote")
            req: PromoteRequest = self._parse(PromoteRequest, await self._json(request, "promote"), "promote")
            try:
                info = await self.manager.promote.remote(req.version)
            except PromotionRefused as e:
                raise HttpError(409, f"version {req.version} refused; the serving version is unchanged: {e}") \
                    from None
            await self._refresh()
        except HttpError as e:
            self._count("promote", e.status)
            raise
        self._count("promote", 200)
        return JSONResponse(info)

    @app.get("/v1/version")
    async def version(self) -> JSONResponse:
        return JSONResponse(await self.manager.describe.remote())

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        v = await self._current()
        return JSONResponse({"status": "ok", "version": v.version})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

