"""One served version as a Serve application, and the version manager that deploys, switches and drains them.

A version application (``<app_name>-<version>``, no route) is deployed as ``serve.placement`` says:

- ``per_stage``: ``encoder`` (``QueryEncoderDeployment``), ``shard-0`` .. ``shard-{S-1}`` (``IndexShard``, one
  deployment per shard, since replicas of one deployment are load-balanced, not fanned out) and ``head``
  (``VersionHead``: the lexical channel; it binds the others into one application). Each wraps a Ray-free class
  of ``serve/engine.py``.
- ``colocated``: ``version`` (``VersionReplica``), each replica the whole version (``engine.Retriever``).

With ``inline`` there is no version application: every ingress replica holds the whole version
(``WholeVersion``), and a promotion loads the new one in each of them (``Ingress.stage``) before the switch.

``VersionManager`` (one replica, in the front application beside ``serve/ingress.py``'s ``Ingress``) says which
version serves. Promotion deploys the new version's application beside the old, waits until every replica has
loaded and verified it, flips the manager's choice (ingress replicas hear of it at once: ``watch``), and
deletes the old application after ``drain_s``. A version that fails verification or loading is deleted and the
old one keeps serving. Replicas started later (autoscaling, restarts) load their own application's version.
The index side of a version (staging, commit, ``CURRENT``) is ``index/`` 's.
"""

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_mgdspr.config import ResolvedServeConfig
from ray_mgdspr.index.versions import current_version, set_current
from ray_mgdspr.model.bundle import bundle_summary
from ray_mgdspr.serve.batching import Batcher
from ray_mgdspr.serve.canary import CanaryHits, RecallWindow
from ray_mgdspr.serve.engine import (
    Encoded,
    Hits,
    LexicalChannel,
    QueryEncoder,
    Release,
    ReleaseError,
    Retriever,
    ShardSearcher,
    each_alone,
    recent_behaviours,
    verify_release,
)
from ray_mgdspr.serve.errors import RETRYABLE, cause, public_message
from ray_mgdspr.serve.metrics import BatchSizes
from ray_mgdspr.serve.relevance import KeyTerm
from ray_mgdspr.serve.schemas import CanaryRecall, RetrieveRequest, VersionInfo
from ray_mgdspr.serve.store import Store, open_store
from ray_mgdspr.serve.tasks import replica_task, to_the_end

log = logging.getLogger("ray.serve")
R = TypeVar("R")
INGRESS = "Ingress"
"""The front application's HTTP deployment (``serve/ingress.py``)."""
CANARY_VERSIONS = 8
"""The version manager keeps the recall canary of this many versions (the most recently sampled first seen)."""
ASK_INGRESS_S = 10.0
"""How long a restarted version manager (placement inline) waits for the running ingress replicas to say what they
serve."""


def adopted_version(reported: set[str], current: str | None) -> str | None:
    """What a restarted version manager (placement inline) adopts of the versions the ingress replicas say they
    serve: the one ``CURRENT`` names (every switch moves it; several are reported during a switch), else the only
    one reported, else None (the manager then starts as at a start)."""
    if current in reported:
        return current
    return next(iter(reported)) if len(reported) == 1 else None


def version_app_name(app_name: str, version: str) -> str:
    return f"{app_name}-{version}"


def _batched(fn: Callable[[list[Any]], list[Any]], cfg: ResolvedServeConfig, sizes: BatchSizes) -> Batcher:
    """``fn`` over batches of concurrent requests (``serve/batching.py``), each request failing alone
    (``engine.each_alone``), with the configured batch size and wait, each batch's size into ``sizes``."""
    return Batcher(functools.partial(each_alone, fn), cfg.batch_size, cfg.batch_wait_ms / 1000, sizes.observe)


def _own(result: R | Exception) -> R:
    """One caller's share of a batch (``engine.each_alone``): its result, or its own failure raised."""
    if isinstance(result, Exception):
        raise result
    return result


# ------------------------------------------------------------------------------------- a version


@serve.deployment
class QueryEncoderDeployment:
    """H_qu of batched requests (``serve/batching.py``), with histories from the behaviour store."""

    def __init__(self, settings: dict, version: str) -> None:
        cfg = ResolvedServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)  # load_bundle checks its files
        self.core = QueryEncoder(release.bundle_path, cfg.world, open_store(cfg.store, release.bundle.features),
                                 threads=cfg.torch_threads, tower=cfg.query_tower)
        self._encode = _batched(self._encode_now, cfg, BatchSizes("encoder"))

    async def encode(self, request: tuple[str, int | None, int]) -> Encoded:
        """H_qu of one (query, user id, ts), computed in a batch with concurrent requests."""
        return _own(await self._encode(request))

    def _encode_now(self, requests: list[tuple[str, int | None, int]]) -> list[Encoded]:
        queries, users, ts = (list(x) for x in zip(*requests, strict=True))
        return self.core.encode(queries, users, ts)


@serve.deployment
class IndexShard:
    """One shard of one version: batched top-k with each hit's relevance verdict."""

    def __init__(self, settings: dict, version: str, shard_no: int) -> None:
        cfg = ResolvedServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)  # load_shard checks its files
        self.core = ShardSearcher(release.index_path, shard_no, cfg.backend, nprobe=cfg.nprobe,
                                  ef_search=cfg.ef_search, faiss_threads=cfg.faiss_threads,
                                  verdict_cache_mb=cfg.verdict_cache_mb)
        self.canary_ef_search = cfg.canary_ef_search
        self._search = _batched(self._search_now, cfg, BatchSizes("shard"))

    async def search(self, request: tuple[np.ndarray, int, tuple[KeyTerm, ...], int | None]) -> Hits:
        """One request: (H_qu, depth, key terms, k when the filter is on else None; see ``ShardSearcher.search``),
        searched in a batch with concurrent requests."""
        return _own(await self._search(request))

    async def canary(self, request: tuple[np.ndarray, int]) -> CanaryHits:
        """A recall canary sample of one query (H_qu, k): this shard's top k as served and its exact reference
        (``ShardSearcher.canary``), in a thread beside the batched live searches, never in their batches."""
        embedding, k = request
        return await asyncio.to_thread(self.core.canary, embedding[None, :], k, self.canary_ef_search)

    def _search_now(self, requests: list[tuple[np.ndarray, int, tuple[KeyTerm, ...], int | None]]) -> list[Hits]:
        return self.core.search(np.stack([r[0] for r in requests]), [r[1] for r in requests],
                                [r[2] for r in requests], need=[r[3] for r in requests])


@serve.deployment
class VersionHead:
    """The version application's root: the lexical channel (BM25 over titles) of this version's catalogue, and a
    user's behaviours with this version's titles (``GET /v1/users/{user_id}/behaviours``).

    It takes the encoder and shard handles only so that one application deploys them all; the ingress
    calls those deployments itself.
    """

    def __init__(self, settings: dict, version: str, encoder: DeploymentHandle,
                 shards: list[DeploymentHandle]) -> None:
        cfg = ResolvedServeConfig.model_validate(settings)
        release = verify_release(cfg.index_root, version, check_files=False)
        self.version = version
        self.lexical = LexicalChannel(release.index_path, cfg.verdict_cache_mb)
        self._bound = (encoder, shards)
        # the encoder's store and windows (the bundle's features), opened on the first read: a store that is down
        # fails those reads (503 for the store), never the loading of the version
        self._store_url, self._features = cfg.store, release.bundle.features
        self._store: Store | None = None
        self._store_lock = threading.Lock()

    async def search(self, words: list[str], k: int, terms: tuple[KeyTerm, ...]) -> Hits:
        return (await asyncio.to_thread(self.lexical.search, [words], k, [terms]))[0]

    async def behaviours(self, user_id: int, ts: int, limit: int) -> list[dict]:
        """The user's behaviours the encoder reads at ``ts``, most recent first, with titles
        (``engine.recent_behaviours``)."""
        return await asyncio.to_thread(self._behaviours, user_id, ts, limit)

    def _behaviours(self, user_id: int, ts: int, limit: int) -> list[dict]:
        with self._store_lock:
            if self._store is None:
                self._store = open_store(self._store_url, self._features)
        return recent_behaviours(self._store, self.lexical.titles, user_id, ts, limit)


class WholeVersion:
    """The whole version in this process: ``engine.Retriever``, answering batches of concurrent requests
    (``serve/batching.py``) with one forward pass and one search per shard (``Retriever.answer_batch``); the recall
    canary's searches and users' behaviours too. A replica of ``VersionReplica`` holds one (``serve.placement:
    colocated``: one hop from the ingress per request); so does each ingress replica (``inline``: no hop)."""

    def __init__(self, cfg: ResolvedServeConfig, version: str) -> None:
        release = verify_release(cfg.index_root, version, check_files=False)  # the loaders check their files
        self.core = Retriever(release, cfg)
        self.canary_ef_search = cfg.canary_ef_search
        self._answer = _batched(self.core.answer_batch, cfg, BatchSizes("version"))

    async def answer(self, request: tuple[RetrieveRequest, int]) -> tuple[dict, np.ndarray]:
        """One request (its k from ``engine.request_k``): its response and its H_qu, answered in a batch with
        concurrent requests."""
        return _own(await self._answer(request))

    async def canary(self, request: tuple[np.ndarray, int]) -> list[CanaryHits]:
        """A recall canary sample of one query (H_qu, k) on every shard, in a thread beside the live batches."""
        embedding, k = request
        return await asyncio.to_thread(self.core.canary, embedding, k, self.canary_ef_search)

    async def behaviours(self, user_id: int, ts: int, limit: int) -> list[dict]:
        """As ``VersionHead.behaviours``."""
        return await asyncio.to_thread(recent_behaviours, self.core.encoder.store, self.core.lexical.titles,
                                       user_id, ts, limit)


@serve.deployment
class VersionReplica(WholeVersion):
    """The whole version in each replica (``serve.placement: colocated``; ``WholeVersion``)."""

    def __init__(self, settings: dict, version: str) -> None:
        super().__init__(ResolvedServeConfig.model_validate(settings), version)


def version_app(cfg: ResolvedServeConfig, version: str, shards: int) -> serve.Application:
    """The Serve application of one version (see the module docstring; ``serve.placement``)."""
    settings = cfg.model_dump()
    if cfg.placement == "colocated":
        return VersionReplica.options(name="version", **cfg.retriever.serve_options()).bind(settings, version)
    encoder = QueryEncoderDeployment.options(name="encoder", **cfg.encoder.serve_options()).bind(settings, version)
    shard_handles = [IndexShard.options(name=f"shard-{s}", **cfg.shard.serve_options()).bind(settings, version, s)
                     for s in range(shards)]
    return VersionHead.options(name="head", **cfg.head.serve_options()).bind(settings, version, encoder,
                                                                                shard_handles)


# ------------------------------------------------------------------------------- the version manager


class PromotionRefused(RuntimeError):
    """A version that was not switched to; the old one keeps serving."""


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class VersionManager:
    """Which version serves; loads new ones beside it and switches (one replica: the single writer)."""

    def __init__(self, settings: dict) -> None:
        self.cfg = ResolvedServeConfig.model_validate(settings)
        self.info = VersionInfo(version=None)
        self._switched = asyncio.Event()  # set (and replaced) at every switch: wakes the ingresses' long polls
        self._lock = asyncio.Lock()
        self._draining: dict[str, float] = {}  # version -> when its application is deleted
        self._refused: set[str] = set()
        self._loop: asyncio.Task | None = None  # the housekeeping
        self._first_load: asyncio.Task | None = None  # from a health check (held: tasks are weak)
        self._canary: dict[str, RecallWindow] = {}  # version -> the recall canary's samples from every ingress
        self._first = self.cfg.version or current_version(self.cfg.index_root)
        if self._first is None:
            raise RuntimeError(f"nothing to serve: {self.cfg.index_root} has no CURRENT version and serve.version "
                               "is not set; build an index (`mgdspr index build`) or name a version")

    async def active(self, known: str | None = None) -> dict:
        """The serving version (``VersionInfo`` fields); loads the first one on the first call.

        ``known``: the version the caller (an ingress replica) serves. With ``serve.placement: inline`` the
        versions live in the ingress replicas, so a restarted manager adopts the version they serve
        (``_inline_serving``). The first version is chosen and loaded to its end even if the caller is cancelled."""
        if self._loop is None or self._loop.done():
            self._loop = replica_task(self._housekeeping(), "version housekeeping")
        if self.info.version is None:
            await to_the_end(self._first_version(known), "load the first version")
        return self.info.model_dump()

    async def _first_version(self, known: str | None) -> None:
        async with self._lock:
            if self.info.version is None:
                serving = await self._inline_serving(known) if self.cfg.placement == "inline" else None
                if serving is not None:
                    await self._adopt(serving, "the ingress replicas")
                else:
                    await self._switch_to(self._first, initial=True)

    async def _inline_serving(self, known: str | None) -> str | None:
        """Placement inline, this manager just started: the version the ingress replicas already serve (this is a
        restart), else None (the endpoint is starting: its replicas ask from their constructors, serving nothing
        yet). A caller that serves a version says so (``known``: a replica's long poll); one that serves nothing
        (a promotion, a replica just started by autoscaling) cannot, so the running replicas are asked
        (``_ask_ingress``): choosing ``serve.version`` then would switch every replica back to it, a rollback.
        Of several versions reported (a restart in the middle of a switch), the one ``CURRENT`` names (every switch
        moves it); a version the replicas serve that ``CURRENT`` does not name (an operator moved it while the
        manager was down) is adopted all the same: the housekeeping then promotes what ``CURRENT`` names."""
        reported = {known} if known is not None else await self._ask_ingress()
        if not reported:
            return None
        return adopted_version(reported, await asyncio.to_thread(current_version, self.cfg.index_root))

    async def _ask_ingress(self) -> set[str]:
        """The versions the running ingress replicas serve (``Ingress.serving_version``; none while the endpoint
        starts, its replicas still in their constructors), asked within ``ASK_INGRESS_S``; an empty set when
        none runs or none answers in time."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), ASK_INGRESS_S)
            app = status.applications.get(self.cfg.app_name)
            ingress = app.deployments.get(INGRESS) if app is not None else None
            if ingress is None or not ingress.replica_states.get("RUNNING", 0):
                return set()
            answers = await serve.get_deployment_handle(INGRESS, self.cfg.app_name).broadcast(
                "serving_version").results_async(timeout_s=ASK_INGRESS_S, return_exceptions=True)
        except Exception as e:  # no answer: decide as at a start (serve.version, else CURRENT)
            log.warning("could not ask the ingress replicas which version they serve: %s", e)
            return set()
        return {a for a in answers if isinstance(a, str)}

    async def watch(self, known: str | None, timeout_s: float, loading: str | None = None) -> dict:
        """A long poll of the serving version: ``active()`` as soon as it is not ``known`` (or the version being
        loaded is not ``loading``), else when either changes, else after ``timeout_s``. The ingress replicas hold
        one each, so a switch reaches them at once and an idle endpoint asks nothing in between (a poll every
        0.25 s cost the ingress and this replica ~0.02 cores each, idle)."""
        info = await self.active(known)
        if info["version"] != known or info["loading"] != loading:
            return info
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._switched.wait(), timeout_s)
        return self.info.model_dump()

    async def check_health(self) -> None:
        """Serve's periodic health check, the first right after the replica starts: begin loading the first
        version in the background, so an app started by `serve deploy` serves without waiting for a request.
        Placement inline: the ingress replicas ask for it from their constructors, and a restarted manager must
        hear from them what they serve before it chooses (``_inline_serving``)."""
        if self.cfg.placement == "inline":
            return
        if self.info.version is None and not self._lock.locked() and self._first not in self._refused:
            self._first_load = replica_task(self._load_first(), "load the first version")

    async def _load_first(self) -> None:
        try:
            await self.active()
        except Exception as e:  # recorded in info.last_error; the next request tries again
            log.error("loading the first version %s failed: %s", self._first, e)

    async def promote(self, version: str) -> dict:
        """Load ``version`` beside the serving one, then switch; raises ``PromotionRefused`` (old one serves). A
        caller that is cancelled meanwhile (its client disconnected) leaves the promotion running to its end."""
        await self.active()
        await to_the_end(self._promote(version), f"promote {version}")
        return self.info.model_dump()

    async def _promote(self, version: str) -> None:
        async with self._lock:
            if version != self.info.version:
                await self._switch_to(version, initial=False)

    async def _switch_to(self, version: str, initial: bool) -> None:
        if self.cfg.placement == "inline":
            await self._switch_inline(version, initial)
            return
        if initial:
            # a restarted manager adopts the version that serves: the one CURRENT names (every switch moves it)
            # when its application runs, before ``version`` (serve.version: what the endpoint started with, maybe
            # several promotions ago; redeploying it would roll back)
            apps = (await asyncio.to_thread(serve.status)).applications
            for candidate in dict.fromkeys(v for v in (current_version(self.cfg.index_root), version) if v):
                running = apps.get(version_app_name(self.cfg.app_name, candidate))
                if running is not None and running.status in ("RUNNING", "DEPLOYING", "UNHEALTHY"):
                    await self._adopt(candidate, version_app_name(self.cfg.app_name, candidate))
                    return
        name = version_app_name(self.cfg.app_name, version)
        self.info.loading = version
        drain_at = self._draining.pop(version, None)  # promoted back while it drains: keep its application
        self.info.draining = sorted(self._draining)
        try:
            release = await asyncio.to_thread(verify_release, self.cfg.index_root, version)
            deadline = time.time() + self.cfg.load_timeout_s
            await self._wait_deleted(name, deadline)  # drained earlier and still being deleted: deploy afresh
            await asyncio.to_thread(serve._run, version_app(self.cfg, version, release.shards), _blocking=False,
                                    name=name, route_prefix=None,  # private API, pinned by tests/serve
                                    logging_config={"enable_access_log": False})
            await self._wait_running(name, deadline)
        except (ReleaseError, PromotionRefused, RuntimeError, ValueError) as e:
            refusal = self._refusal(version, e)
            if not isinstance(e, ReleaseError):
                await asyncio.to_thread(serve.delete, name, _blocking=False)
            elif drain_at is not None:  # refused before deploying: its draining application is deleted as planned
                self._draining[version] = drain_at
                self.info.draining = sorted(self._draining)
            if initial:
                raise
            raise refusal from None
        finally:
            self.info.loading = None
        old = self.info.version
        if old is not None:
            self._draining[old] = time.time() + self.cfg.drain_s + 4 * self.cfg.version_refresh_s
        self._switched_to(version, release, old)

    def _switched_to(self, version: str, release: Release, old: str | None) -> None:
        """New requests go to ``version`` (a verified ``engine.Release``) from now on: the ingress replicas hear
        of it at once (``watch``), and ``CURRENT`` names it, so that a restart serves it."""
        self.info = self.info.model_copy(update={
            "version": version, "shards": release.shards, "dim": release.index.dim,
            "model": bundle_summary(release.bundle), "previous": old, "switched_at": time.time(),
            "last_error": None, "draining": sorted(self._draining)})
        if current_version(self.cfg.index_root) != version:
            set_current(self.cfg.index_root, version)  # a restart serves what serves now
        self._announce()
        log.info("serving version %s (was %s)", version, old)

    async def _switch_inline(self, version: str, initial: bool) -> None:
        """``serve.placement: inline``: every ingress replica loads ``version`` beside the one it serves
        (``Ingress.stage``, called on each replica at once: ``DeploymentHandle.broadcast``), and only when all of
        them have it does the switch happen, so that no replica answers with a version that it must first load.
        A replica that fails to load it refuses the promotion; the replicas drop what they loaded when they
        hear that (``watch``). The first version is not staged: each ingress replica loads it before it takes
        requests (``Ingress.__init__``). Replicas started during staging load both (``VersionInfo.loading``)."""
        self.info.loading = version
        self._announce()  # replicas started meanwhile load it too, off their long poll
        try:
            release = await asyncio.to_thread(verify_release, self.cfg.index_root, version)
            if not initial:
                ingress = serve.get_deployment_handle(INGRESS, self.cfg.app_name)
                try:  # every running replica's answer, or its failure
                    staged = await ingress.broadcast("stage", version).results_async(
                        timeout_s=self.cfg.load_timeout_s, return_exceptions=True)
                except TimeoutError:
                    raise PromotionRefused(f"not loaded in every ingress replica within load_timeout_s="
                                           f"{self.cfg.load_timeout_s}") from None
                except RETRYABLE as e:  # no ingress replica runs (all restarting)
                    raise PromotionRefused(f"no ingress replica could load it ({type(cause(e)).__name__})") from None
                failed = [r for r in staged if isinstance(r, BaseException)]
                if failed:
                    raise PromotionRefused(f"{len(failed)} of {len(staged)} ingress replicas could not load it: "
                                           f"{cause(failed[0])}")
        except (ReleaseError, PromotionRefused) as e:
            refusal = self._refusal(version, e)
            if initial:
                raise
            raise refusal from None
        finally:
            self.info.loading = None
            self._announce()  # on a refusal: the replicas drop what they loaded
        self._switched_to(version, release, self.info.version)

    def _refusal(self, version: str, e: Exception) -> PromotionRefused:
        """Record that ``version`` was refused: ``GET /v1/version``'s ``last_error`` (no paths), the log (in full),
        no automatic promotion of it again; returns the error for the promoter (the serving version unchanged)."""
        self.info.last_error = public_message(f"{version}: {e}")
        self._refused.add(version)
        log.error("version %s refused, %s keeps serving: %s", version, self.info.version, e)
        return PromotionRefused(self.info.last_error)

    async def _adopt(self, version: str, name: str) -> None:
        """This manager restarted (its node was lost, say) while ``version``'s application (or, placement inline,
        the ingress replicas) kept serving: take it over as it is. It was verified when it was promoted; it is not
        redeployed, and never deleted here, even while some of its replicas are being replaced."""
        release = await asyncio.to_thread(verify_release, self.cfg.index_root, version, False)
        self.info = self.info.model_copy(update={
            "version": version, "shards": release.shards, "dim": release.index.dim,
            "model": bundle_summary(release.bundle), "last_error": None})
        self._announce()
        log.info("adopted the running application %s: serving version %s", name, version)

    def _announce(self) -> None:
        """Wake every ``watch`` waiting on the version that served before."""
        self._switched.set()
        self._switched = asyncio.Event()

    async def _wait_deleted(self, name: str, deadline: float) -> None:
        while time.time() < deadline:
            status = (await asyncio.to_thread(serve.status)).applications.get(name)
            if status is None or status.status != "DELETING":
                return
            await asyncio.sleep(0.2)
        raise PromotionRefused(f"its previous application was still being deleted after "
                               f"load_timeout_s={self.cfg.load_timeout_s}")

    async def _wait_running(self, name: str, deadline: float) -> None:
        while time.time() < deadline:
            status = (await asyncio.to_thread(serve.status)).applications.get(name)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise PromotionRefused(f"its replicas failed to start: {status.message[-2000:]}")
            if status is not None and status.status == "DELETING":  # never RUNNING again: say so now
                raise PromotionRefused("its application is being deleted")
            await asyncio.sleep(0.2)
        raise PromotionRefused(f"not loaded within load_timeout_s={self.cfg.load_timeout_s}")

    async def _housekeeping(self) -> None:
        """Delete drained versions; promote what CURRENT names when an operator moves it."""
        while True:
            await asyncio.sleep(0.5)
            try:
                now = time.time()
                if any(now >= at for at in self._draining.values()) and not self._lock.locked():
                    # under the switch lock: a promotion of a draining version takes it back from the queue
                    # (``_switch_to``) instead of loading it while it is being deleted here
                    async with self._lock:
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

    async def canary(self, version: str, recall: float, reference: str | None = None) -> None:
        """One recall canary sample of ``version`` from an ingress replica (``serve/canary.py``); the running
        recall over the last ``serve.canary_window`` samples is in ``describe()`` (GET /v1/version)."""
        window = self._canary.get(version)
        if window is None:
            window = self._canary[version] = RecallWindow(self.cfg.canary_window)
            for old in list(self._canary)[:-CANARY_VERSIONS]:
                del self._canary[old]
        window.add(recall, reference)

    async def describe(self) -> dict:
        """``VersionInfo``, with the recall canary of the versions sampled since this manager started."""
        canary = {v: CanaryRecall.model_validate(w.summary(self.cfg.canary_k)) for v, w in self._canary.items()}
        return self.info.model_copy(update={"canary": canary}).model_dump()
