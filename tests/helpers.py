"""Helpers shared by test modules (imported by name: tests/ is on ``sys.path`` as the root conftest's directory;
``from conftest import`` would find whichever conftest.py was imported first)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from ray_mgdspr.config import SimulateConfig
from ray_mgdspr.runtime import free_port  # noqa: F401 (the serve tests import it from here)

SMALL = dict(n_items=1500, n_users=300, n_brands=120, n_shops=200, warmup_days=10)


def small_config(**overrides: object) -> SimulateConfig:
    """A world that simulates in about a second (synthetic)."""
    return SimulateConfig(**{**SMALL, **overrides})


RAY_TEST_ENV = {
    # Set before Ray starts: the raylet, and every worker it starts, inherits them.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # Train notices finished or dead workers sooner: ~11 s -> ~7 s per fit
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Data 2.60 lists Parquet files with 32 footer-reader actors per read, i.e. per epoch: on 2 cores starting
    # them costs ~10 s of each ~13 s epoch of world_en. One actor reads the 7 footers as fast.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}


def wait_for_state_api(timeout_s: float = 60.0) -> None:
    """The dashboard starts after ``ray.init`` returns (seconds later on a busy machine): wait until the State API
    answers, so tests that list actors do not race it."""
    import ray
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # the address: without it the client looks for "the" cluster and fails when others run on the machine
            list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=5)
            return
        except Exception:
            if time.monotonic() > deadline:
                return  # the tests fall back to finding worker processes without it
            time.sleep(0.5)


# ------------------------------------------------------------------ the endpoint under load (tests/serve)


def retrieve(client: httpx.Client, **body: object) -> dict:
    """POST /v1/retrieve with ``body``; the response, asserted 200."""
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def page(body: dict) -> list[tuple[int, list[str]]]:
    """A /v1/retrieve response's page: (item id, channels) per hit, in order."""
    return [(i["item_id"], i["channels"]) for i in body["data"]]


def same_as_core(client: httpx.Client, cfg: Any, version: str, bodies: list[dict]) -> None:
    """Each /v1/retrieve body answered by the endpoint as the Ray-free core (``Retriever``) of ``version`` with the
    endpoint's resolved serve section ``cfg`` answers it: served by ``version``, the same page and counts."""
    from ray_mgdspr.serve.engine import Retriever

    core = Retriever.open(cfg, version)
    for b in bodies:
        got = retrieve(client, **b)
        want = core.retrieve(b["query"], b.get("user_id"), b["k"], b["filter"], tuple(b["channels"]), b["ts"])
        assert got["version"] == version
        assert page(got) == page(want), b
        assert {f: got[f] for f in ("count", "filtered", "fallback", "fallback_added")} == \
            {f: want[f] for f in ("count", "filtered", "fallback", "fallback_added")}, b


class Load:
    """Clients posting /v1/retrieve in a loop until stopped; records (status, version, error, time answered)."""

    def __init__(self, base: str, clients: int, **body: object) -> None:
        self.base, self.body, self.stop = base, body or {"query": "red dress", "k": 20}, threading.Event()
        self.results: list[list[tuple[int, str | None, str, float]]] = [[] for _ in range(clients)]
        self.retry_after: list[str | None] = []  # the Retry-After header of each non-200 answer
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as c:
            while not self.stop.is_set():
                r = c.post("/v1/retrieve", json=self.body)
                body = r.json()
                self.results[i].append((r.status_code, body.get("version"), body.get("error", ""), time.time()))
                if r.status_code != 200:
                    self.retry_after.append(r.headers.get("retry-after"))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    @property
    def all(self) -> list[tuple[int, str | None, str, float]]:
        return [r for rs in self.results for r in rs]


def promote_under_load(client: httpx.Client, version: str, token: str, clients: int = 4) -> tuple[dict, Load]:
    """``POST /v1/admin/promote`` of ``version`` while ``clients`` clients post /v1/retrieve to the same endpoint;
    asserts that it answered 200, that no request failed and that none mixed versions (each client saw the old
    version, then only ``version``: v1 ... v1 v2 ... v2, never back). Returns the promotion's response and the
    load."""
    with Load(str(client.base_url), clients=clients) as load:
        time.sleep(1.0)
        r = client.post("/v1/admin/promote", json={"version": version},
                        headers={"authorization": f"Bearer {token}"}, timeout=300)
        assert r.status_code == 200, r.text
        time.sleep(2.0)
    assert load.all and all(status == 200 for status, *_ in load.all), Counter(r[:3] for r in load.all)
    for per_client in load.results:
        versions = [r[1] for r in per_client]
        assert versions == sorted(versions) and versions[-1] == version
    return r.json(), load


def canary_recall(client: httpx.Client, version: str, queries: list[tuple[str, int | None]], ts: int) -> float:
    """Retrieve each (query, user id) at ``ts``; once the version manager counts that many more recall canary samples
    of ``version`` (``GET /v1/version``), their running recall."""
    def sampled() -> dict:
        return client.get("/v1/version").json()["canary"].get(version) or {"samples": 0}

    before = sampled()["samples"]
    for q, u in queries:
        retrieve(client, query=q, user_id=u, k=10, ts=ts)
    wait_for(lambda: sampled()["samples"] >= before + len(queries), 30, f"canary samples of {version}")
    return sampled()["recall"]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, explain: Callable[[], object] = lambda: "",
             interval: float = 0.2) -> None:
    """Return once ``predicate()`` holds; fail after ``timeout`` s naming ``what`` (and ``explain()``: the state
    seen last)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} {explain()}".rstrip())
        time.sleep(interval)


@contextmanager
def running_endpoint(overrides: dict[str, Any], metrics_export_port: int | None = None,
                     ray_cfg: dict[str, Any] | None = None,
                     before_ready: Callable[[str], None] | None = None) -> Iterator[tuple[str, Any]]:
    """The retrieval endpoint with these ``serve:`` overrides on a local Ray (started here unless one runs, with
    8 logical CPUs: two versions side by side during a swap hold ~3.5 CPUs of fractional replicas, and Ray's
    Prometheus export on ``metrics_export_port`` when given; Serve's HTTP front and modes from ``ray_cfg``, a
    ``RayConfig``'s fields, its defaults otherwise); yields its URL and resolved ``ServeConfig``, then shuts Serve
    (and the Ray it started) down. ``before_ready(url)``: called once the app is deployed, before the first version
    has loaded (the endpoint's first requests)."""
    import logging

    import ray
    from ray import serve

    from ray_mgdspr.config import RayConfig
    from ray_mgdspr.runtime import serve_environment
    from ray_mgdspr.serve.app import AppArgs, start, wait_ready

    started = not ray.is_initialized()
    if started:
        serve_environment(RayConfig(**(ray_cfg or {})))
        ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False,
                 **({"_metrics_export_port": metrics_export_port} if metrics_export_port else {}))
    try:
        cfg = start(AppArgs(serve=overrides), wait=before_ready is None)
        if before_ready is not None:
            before_ready(f"http://127.0.0.1:{cfg.port}")
            wait_ready(cfg)
        yield f"http://127.0.0.1:{cfg.port}", cfg
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def listener(port: int) -> Any:
    """The process (``psutil.Process``) listening on TCP ``port`` of this machine; fails unless exactly one does."""
    from ray_mgdspr.runtime import port_listeners

    processes = port_listeners(port)
    assert len(processes) == 1, f"{len(processes)} processes listen on port {port}"
    return processes[0]


def reference_matches(terms: tuple[Any, ...], metadata: Any) -> Any:
    """The relevance filter's verdicts written plainly, item by item (what ``relevance.ItemMatcher`` computes with
    numpy): for each field the key terms name, an item passes when it matches one of that field's terms in its
    structured column (category: leaf or first-level category; brand; an attribute's values) or in its title
    (whole words; a substring when the term is Chinese)."""
    import re
    from collections import defaultdict

    import numpy as np

    cjk = re.compile(r"[\u3400-\u9fff]")

    def contains(words: list[str], term: str) -> bool:
        if cjk.search(term):
            return term in "".join(words).lower()
        return f" {term} " in f" {' '.join(words).lower()} "

    n = metadata.num_rows
    keep = np.ones(n, bool)
    if not terms or not n:
        return keep
    by_field: dict[str, list[Any]] = defaultdict(list)
    for t in terms:
        by_field[t.field].append(t)
    leaf = metadata["leaf_id"].fill_null(-1).to_numpy()
    cate1 = metadata["cate1_id"].fill_null(-1).to_numpy()
    brand = metadata["brand_id"].fill_null(-1).to_numpy()
    attrs = [set(a or ()) for a in metadata["attr_value_ids"].to_pylist()]
    titles = [t or [] for t in metadata["title_words"].to_pylist()]
    for kind, group in by_field.items():
        hit = np.zeros(n, bool)
        for t in group:
            if kind == "category":
                hit |= np.isin(leaf, list(t.leaf_ids)) | np.isin(cate1, list(t.cate1_ids))
            elif kind == "brand":
                hit |= np.isin(brand, list(t.value_ids))
            else:
                hit |= np.array([bool(a & t.value_ids) for a in attrs])
            hit |= np.array([contains(title, t.text) for title in titles])
        keep &= hit
    return keep
