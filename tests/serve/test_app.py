"""The retrieval endpoint on a real Serve app on a local Ray cluster, over real HTTP.

One Serve instance for the module (starting it costs tens of seconds), shared by tests that run in any order
(pytest-randomly) and each pass alone: a test that needs a version served establishes it itself
(``serve_version``), whatever earlier tests promoted, and counters are read from requests the test makes.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from helpers import Load, free_port, listener, promote_under_load, retrieve, running_endpoint, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from ray_mgdspr.config import ServeConfig
from ray_mgdspr.data.features import DAY_MS
from ray_mgdspr.data.world import read_table
from ray_mgdspr.index.versions import current_version, set_current
from ray_mgdspr.serve.engine import Retriever
from ray_mgdspr.serve.relevance import RelevanceFilter
from ray_mgdspr.serve.schemas import BehavioursResponse, RetrieveResponse
from ray_mgdspr.serve.store import MAX_ID, MAX_TS_MS

pytestmark = pytest.mark.slow
TOKEN = "test-token-123"
AUTH = {"authorization": f"Bearer {TOKEN}"}
GIVE_UP_S = 0.5
"""How long the impatient clients here wait: far less than loading a version (starting its replicas) takes."""
FILTER_DEPTH = 200  # below world_en's 1,500 items, so that the lexical fallback can run


@pytest.fixture(scope="module")
def store_copy(deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "behaviours.sqlite"
    shutil.copy(deployment.store, out)
    return out


def probe_that_gives_up(url: str) -> None:
    """The endpoint's first request: a readiness probe (a load balancer's) that gives up while the first version
    loads. Serve cancels a cancelled request's handle calls, and the ingress replica starts following the version
    manager on this request: that long poll must outlive it (``serve/tasks.py``). Before, it did not, and the
    replica never heard of a switch again (``test_moving_current_rolls_back`` timed out once v2 was deleted)."""
    with pytest.raises(httpx.TimeoutException):
        httpx.get(f"{url}/healthz", timeout=GIVE_UP_S)


@pytest.fixture(scope="module")
def server(deployment: Any, store_copy: Path) -> Iterator[tuple[str, ServeConfig]]:
    overrides = {
        "port": free_port(), "index_root": str(deployment.index_root), "world": str(deployment.world),
        "store": str(store_copy), "version": "v1", "token": TOKEN, "drain_s": 1.0, "watch_current_s": 0.5,
        "max_k": 2000, "max_fetch": 2000, "max_body_bytes": 16384,
        "filter_depth": FILTER_DEPTH,
        "placement": "per_stage",  # the per-stage graph; tests/serve/test_colocated.py: the other
        "encoder": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                    "downscale_delay_s": 3, "look_back_period_s": 3},
        # back to 1 replica soon after a test's load (test_metrics)
        "ingress": {"downscale_delay_s": 3, "look_back_period_s": 3},
    }
    with running_endpoint(overrides, before_ready=probe_that_gives_up) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def core(server: tuple[str, ServeConfig]) -> Retriever:
    """v1 in one process, with the endpoint's own resolved serve section (the configured system)."""
    return Retriever.open(server[1], "v1")


@pytest.fixture(scope="module")
def titles(deployment: Any) -> dict[int, str]:
    items = read_table(deployment.world, "items", columns=["item_id", "title"])
    return dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist(), strict=True))


def post_events(client: httpx.Client, *behaviours: tuple[int, int, str, int]) -> None:
    """Append (user, item, action, ts) behaviours through POST /v1/events."""
    body = {"behaviours": [{"user_id": u, "item_id": i, "action": a, "ts": t} for u, i, a, t in behaviours]}
    r = client.post("/v1/events", json=body, headers=AUTH)
    assert r.status_code == 200, r.text


def serve_version(client: httpx.Client, version: str) -> str:
    """Set-up of a test that needs ``version`` served: promote it unless it serves, then wait until requests are
    answered by it and every other version's application has drained and been deleted, so the test starts from
    one version and nothing in flight, whatever ran before it."""
    if client.get("/v1/version").json()["version"] != version:
        r = client.post("/v1/admin/promote", json={"version": version},
                        headers={"authorization": f"Bearer {TOKEN}"}, timeout=300)
        assert r.status_code == 200, r.text
    wait_for(lambda: retrieve(client, query="dress", k=5)["version"] == version, 60, f"requests answered by {version}")

    def others() -> list[str]:
        return [a for a in serve.status().applications if a.startswith("mgdspr-") and a != f"mgdspr-{version}"]

    wait_for(lambda: not others(), 60, "the other versions' applications to drain and be deleted")
    return version


def test_health_and_version(client: httpx.Client) -> None:
    serve_version(client, "v1")
    assert client.get("/healthz").json() == {"status": "ok", "version": "v1"}
    info = client.get("/v1/version").json()
    assert info["version"] == "v1" and info["shards"] == 2 and info["dim"] == 16


def test_the_default_http_front_is_haproxy_in_front_of_the_ingress_replicas(server: tuple[str, ServeConfig],
                                                                            client: httpx.Client) -> None:
    _, cfg = server
    assert listener(cfg.port).name() == "haproxy"  # ray.http_proxy's default: Ray's bundled HAProxy holds the port
    assert client.get("/healthz").status_code == 200  # and answers through the ingress replicas


def _browser() -> str:
    """The headless browser of the search page's test: Chromium from the distribution (``.ci/run`` installs it and
    sets MGDSPR_REQUIRE_BROWSER=1, so CI cannot skip this test)."""
    found = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if found is None:
        if os.environ.get("MGDSPR_REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium on PATH but MGDSPR_REQUIRE_BROWSER=1 (.ci/run installs it with apt-get)")
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)")
    return found


def _headless(browser: str, url: str, *flags: str) -> str:
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--virtual-time-budget=20000", *flags, url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


BEHAVIOUR_ROW = re.compile(r'<tr class="behaviour"><td class="time">(.*?)</td><td class="action">(.*?)</td>'
                           r'<td class="item">(.*?)</td><td class="title[^"]*">(.*?)</td></tr>')


def test_search_page_shows_the_endpoint_answer_in_a_real_browser(client: httpx.Client, server: tuple[str, Any],
                                                                 titles: dict[int, str], tmp_path: Path) -> None:
    serve_version(client, "v1")
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert TOKEN not in page.text and 'id="token"' in page.text  # the page holds no secret; a click asks for it
    browser = _browser()
    # a user whose history is three clicks of a few seconds ago (one on an item no version serves)
    user, now = 1_000_002, int(time.time() * 1000)
    a, b = sorted(titles)[3:5]
    post_events(client, (user, a, "click", now - 3_000), (user, 10**15, "click", now - 2_000),
                (user, b, "click", now - 1_000))
    url = f"{server[0]}/ui?q=red+dress&user={user}&k=5&filter=0"
    dom = _headless(browser, url + f"#token={TOKEN}", "--dump-dom")  # the fragment fills the token field
    want = [i["title"] for i in retrieve(client, query="red dress", user_id=user, k=5, filter=False)["data"]]
    rows = re.findall(r'<tr class="result">.*?<td class="title">(.*?)</td>', dom)
    assert [html.unescape(t) for t in rows] == want, dom[-3000:]
    assert "5 results from version v1" in dom and "serving v1" in dom
    history = client.get(f"/v1/users/{user}/behaviours", headers=AUTH).json()["data"]
    assert [(x["action"], x["item_id"], x["title"]) for x in history] == \
        [("click", b, titles[b]), ("click", 10**15, None), ("click", a, titles[a])]
    shown = [(action, int(item), html.unescape(title)) for _, action, item, title in BEHAVIOUR_ROW.findall(dom)]
    assert shown == [(x["action"], x["item_id"], x["title"] or "(not in version v1)") for x in history], dom[-3000:]
    assert f"user {user}: the 3 latest behaviours" in dom
    assert TOKEN not in dom  # neither echoed into the page nor left in it
    # without the token the page shows no one's history, and says what it needs
    dom = _headless(browser, url, "--dump-dom")
    assert not BEHAVIOUR_ROW.findall(dom) and "enter the token to see this user's behaviours" in dom
    assert len(re.findall(r'<tr class="result">', dom)) == 5  # searching needs no token
    shot = tmp_path / "search-page.png"
    _headless(browser, url + f"#token={TOKEN}", f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("MGDSPR_SCREENSHOT_DIR"):  # CI keeps it as an artifact
        shutil.copy(shot, Path(os.environ["MGDSPR_SCREENSHOT_DIR"]) / shot.name)


def test_merged_topk_equals_the_ray_free_core(client: httpx.Client, core: Retriever) -> None:
    serve_version(client, "v1")
    ts = 4_000_000_000_000
    for query, user in [("red dress", 3), ("running shoes", None), ("portable car cover", 17)]:
        got = retrieve(client, query=query, user_id=user, k=20, filter=False, ts=ts)
        want = core.retrieve(query, user, 20, apply_filter=False, ts=ts)
        assert got["version"] == "v1" and got["count"] == 20
        assert [i["item_id"] for i in got["data"]] == [i["item_id"] for i in want["data"]]
        np.testing.assert_allclose([i["scores"]["embedding"] for i in got["data"]],
                                   [i["scores"]["embedding"] for i in want["data"]], rtol=1e-5)
        assert set(got["latency_ms"]) == {"encode", "search", "merge", "filter", "total"}
        # with the filter: the shards' passing prefixes, the merge and the fallback give the core's page
        for k in (5, 50):
            got = retrieve(client, query=query, user_id=user, k=k, ts=ts)
            want = core.retrieve(query, user, k, ts=ts)
            assert [(i["item_id"], i["channels"]) for i in got["data"]] == \
                [(i["item_id"], i["channels"]) for i in want["data"]]
            assert {f: got[f] for f in ("count", "filtered", "fallback", "fallback_added", "key_terms")} == \
                {f: want[f] for f in ("count", "filtered", "fallback", "fallback_added", "key_terms")}


def test_relevance_filter_and_lexical_channel(client: httpx.Client, deployment: Any) -> None:
    assert set(retrieve(client, query="red dress", k=5)["key_terms"]) == {"red", "dress"}
    # with the filter the embedding channel searches FILTER_DEPTH deep; the lexical fallback fills a short page
    off = retrieve(client, query="red", k=2000, filter=False)
    on = retrieve(client, query="red", k=100)
    assert on["key_terms"] == ["red"] and off["count"] == 1500
    assert off["filtered"] == 0 and on["filtered"] > 0 and 0 < on["count"] <= 100
    assert off["fallback"] is None and off["fallback_added"] == 0
    unfiltered = [i["item_id"] for i in off["data"]]
    embedded = [i for i in on["data"] if "embedding" in i["channels"]]
    positions = [unfiltered.index(i["item_id"]) for i in embedded]
    assert positions == sorted(positions)  # the unfiltered ranking with the failing items taken out
    assert on["filtered"] == (positions[-1] + 1 if len(embedded) == 100 else FILTER_DEPTH) - len(embedded)
    assert on["count"] == len(embedded) + on["fallback_added"]
    # k=FILTER_DEPTH: fewer than k of the top FILTER_DEPTH can pass, so the fallback runs, with BM25's passing hits
    page = retrieve(client, query="red", k=FILTER_DEPTH)
    assert page["fallback"] == "lexical" and page["fallback_added"] > 0 and "fallback" in page["latency_ms"]
    added = [i for i in page["data"] if i["channels"] == ["lexical"]]
    assert len(added) == page["fallback_added"] and page["data"][-len(added):] == added  # after the embedding hits
    assert all(set(i["scores"]) == {"lexical"} for i in added)
    passes = RelevanceFilter.from_world(deployment.world).pass_mask([["red"]], np.array([[i["item_id"] for i in
                                                                                          page["data"]]]))
    assert passes.all()  # never padded with items that fail the filter
    assert len(page["data"]) == len({i["item_id"] for i in page["data"]})
    assert 'mgdspr_fallback_pages_total' in client.get("/metrics").text
    both = retrieve(client, query="red dress", k=10, channels=["embedding", "lexical"], filter=False)
    channels = Counter(c for i in both["data"] for c in i["channels"])
    assert channels["lexical"] == 10 and channels["embedding"] == 10
    lexical = [i for i in both["data"] if "lexical" in i["channels"]]
    assert all("red" in i["title"].lower() or "dress" in i["title"].lower() for i in lexical)
    assert "lexical" in both["latency_ms"]


BAD = [
    (b'{"query": "   "}', 422, "query is empty"),
    (b'{"query": ""}', 422, "query is empty"),
    (b'{"query": "' + b"x" * 300 + b'"}', 422, "max_query_chars"),
    (b'{"query": "dress", "k": 0}', 422, "k must be between 1"),
    (b'{"query": "dress", "k": 100000}', 422, "k must be between 1"),
    (b'{"query": "dress", "k": "many"}', 422, "k:"),
    (b'{"query": 5}', 422, "query:"),
    (b'{"query": "dress", "channels": ["sql"]}', 422, "channels"),
    (b'{"query": "dress", "colour": "red"}', 422, "colour: Extra inputs"),
    (b'{"query": "dress"', 400, "not valid JSON"),
    (b'{"query": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'[1, 2]', 422, "(body)"),
    (b'{"query": "' + b"y" * 20000 + b'"}', 413, "max_body_bytes"),
    # values that once passed validation and overflowed the behaviour store, failing a whole batch
    (b'{"query": "dress", "user_id": 9223372036854775808}', 422, "user_id: Input should be less than or equal"),
    (b'{"query": "dress", "ts": 1000000000000000000000000000000}', 422, "ts: Input should be less than or equal"),
    # no coercion: a bool, a string or a float is not an integer, a string is not a bool
    (b'{"query": "dress", "k": true}', 422, "k: Input should be a valid integer"),
    (b'{"query": "dress", "k": "5"}', 422, "k: Input should be a valid integer"),
    (b'{"query": "dress", "k": 5.0}', 422, "k: Input should be a valid integer"),
    (b'{"query": "dress", "filter": "no"}', 422, "filter: Input should be a valid boolean"),
    (b'{"query": "dress", "user_id": "42"}', 422, "user_id: Input should be a valid integer"),
    (b'{"query": "dress", "k": NaN}', 400, "NaN is not a JSON value"),
    (b'[' * 5000 + b']' * 5000, 400, "nests too deep"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_input_is_a_clear_4xx(client: httpx.Client, body: bytes, status: int, message: str) -> None:
    r = client.post("/v1/retrieve", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and r.json()["request_id"]
    assert client.get("/healthz").status_code == 200


def test_out_of_range_values_fail_only_their_own_request(server: tuple[str, ServeConfig],
                                                         client: httpx.Client) -> None:
    """The values that used to overflow the store inside a batch are refused alone; concurrent valid
    requests (batched with them before) are all answered."""
    bad = [{"query": "red dress", "user_id": 2**63}, {"query": "red dress", "ts": 10**30},
           {"query": "red dress", "user_id": 2**64, "ts": 2**70}]
    with Load(server[0], clients=4, query="red dress", k=20, user_id=7) as load:
        for body in bad * 10:
            r = client.post("/v1/retrieve", json=body)
            assert r.status_code == 422, r.text
    assert load.all and all(r[0] == 200 for r in load.all), Counter(r[0] for r in load.all)
    auth = {"authorization": f"Bearer {TOKEN}"}
    for event in ({"user_id": 2**63, "item_id": 1, "action": "click", "ts": 5},
                  {"user_id": 1, "item_id": 1, "action": "click", "ts": 10**30},
                  {"user_id": 1, "item_id": 1, "action": "click", "ts": 5, "weight": 2}):
        r = client.post("/v1/events", json={"behaviours": [event]}, headers=auth)
        assert r.status_code == 422, r.text
    # serve.max_events behaviours at their largest values fit the events body limit
    largest = [{"user_id": MAX_ID - i, "item_id": MAX_ID, "action": "collect", "ts": MAX_TS_MS} for i in range(1000)]
    r = client.post("/v1/events", json={"behaviours": largest}, headers=auth)
    assert r.status_code == 200 and r.json()["appended"]["behaviours"] == 1000, r.text
    assert retrieve(client, query="dress", user_id=MAX_ID, ts=MAX_TS_MS, k=5)["count"] == 5


# ------------------------------------------------------------------ fuzzing (hypothesis, over real HTTP)

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3), max_leaves=6)
INTS = st.one_of(st.integers(0, 2000), st.integers(0, 2000), st.integers(),
                 st.sampled_from([2**63 - 1, 2**63, -2**63 - 1, 10**30, MAX_TS_MS, MAX_TS_MS + 1]))
TEXT = st.text(st.characters(codec="utf-8"), max_size=300) | st.sampled_from(["red dress", "连衣裙 红色", "🙂", "\x00"])


def _field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the right kind (valid or at and past its bounds), sometimes any JSON value."""
    return st.one_of(valid, valid, valid, valid, JSON)


def _closed(required: dict, optional: dict) -> st.SearchStrategy:
    """Objects with these fields, sometimes with an unknown key or without a required one."""
    body = st.fixed_dictionaries({k: _field(v) for k, v in required.items()},
                                 optional={k: _field(v) for k, v in optional.items()})
    extra = st.one_of(st.just({}), st.just({}), st.just({}),
                      st.dictionaries(st.text(min_size=1, max_size=8), JSON, min_size=1, max_size=1))
    drop = st.sampled_from([None, None, None, None, *required])
    return st.tuples(body, extra, drop).map(lambda t: {k: v for k, v in {**t[0], **t[1]}.items() if k != t[2]})


RETRIEVE_BODIES = _closed({"query": TEXT}, {
    "user_id": INTS | st.none(), "k": INTS | st.none(), "filter": st.booleans(), "ts": INTS | st.none(),
    "channels": st.lists(st.sampled_from(["embedding", "lexical", "sql"]), max_size=3)})
BEHAVIOUR = _closed({"user_id": INTS, "item_id": INTS, "action": st.sampled_from(["click", "buy", "collect", "cart",
                                                                                  "like"]), "ts": INTS}, {})
PAST_QUERY = _closed({"user_id": INTS, "ts": INTS, "query_words": st.lists(TEXT, max_size=70)}, {})
EVENTS_BODIES = _closed({}, {"behaviours": st.lists(BEHAVIOUR, max_size=5), "queries": st.lists(PAST_QUERY,
                                                                                                  max_size=3)})
PROMOTE_BODIES = _closed({"version": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,140}", fullmatch=True) | TEXT}, {})


def _raw(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """Request bodies as bytes: mostly JSON objects from ``bodies``, sometimes any JSON or any bytes."""
    return st.one_of(bodies.map(json.dumps), bodies.map(json.dumps), JSON.map(json.dumps)).map(str.encode) | \
        st.binary(max_size=64)


FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _check(r: httpx.Response, answered: dict[int, int]) -> None:
    assert r.status_code < 500, r.text
    answered[r.status_code] = answered.get(r.status_code, 0) + 1
    body = r.json()
    if r.status_code >= 400:
        assert body["error"] and body["request_id"]
        for leak in ("Traceback", "\x1b[", "/tmp/", "pid=", "actor_id"):
            assert leak not in r.text


@pytest.mark.parametrize(("path", "bodies"), [("/v1/retrieve", RETRIEVE_BODIES), ("/v1/events", EVENTS_BODIES),
                                              ("/v1/admin/promote", PROMOTE_BODIES)])
def test_fuzzed_requests_get_no_5xx_and_valid_ones_alongside_are_answered(
        server: tuple[str, ServeConfig], client: httpx.Client, deployment: Any, path: str,
        bodies: st.SearchStrategy) -> None:
    """1,000 generated bodies per endpoint (hypothesis, derandomized: the same ones on every run), with the
    token on the write paths, against the real endpoint; two clients send valid searches meanwhile."""
    answered: dict[int, int] = {}
    auth = {"authorization": f"Bearer {TOKEN}"}
    served = set(deployment.versions) | {p.name for p in deployment.index_root.iterdir()}

    @FUZZ
    @given(body=_raw(bodies))
    def fuzz(body: bytes) -> None:
        if path.endswith("promote") and any(v.encode() in body for v in served):
            return  # a real version would really be promoted (test_version_swap does that)
        r = client.post(path, content=body, headers={"content-type": "application/json", **auth})
        _check(r, answered)
        if path == "/v1/retrieve" and r.status_code == 200:
            RetrieveResponse.model_validate(r.json())

    with Load(server[0], clients=2, query="red dress", k=10, user_id=3) as load:
        fuzz()
    print(f"{path}: {sum(answered.values())} fuzzed requests answered {dict(sorted(answered.items()))}")
    assert sum(answered.values()) >= 900 and len(answered) >= 2  # both valid and refused bodies were generated
    assert load.all and all(r[0] == 200 for r in load.all), Counter(r[0] for r in load.all)


def test_events_need_the_token_and_change_the_next_result(client: httpx.Client) -> None:
    event = {"behaviours": [{"user_id": 42, "item_id": i, "action": "click", "ts": 3_999_999_000_000 + i}
                            for i in range(5)]}
    assert client.post("/v1/events", json=event).status_code == 401
    assert client.post("/v1/events", json=event, headers={"authorization": "Bearer wrong"}).status_code == 401
    ts = 4_000_000_000_000
    before = retrieve(client, query="dress", user_id=42, k=10, filter=False, ts=ts)
    r = client.post("/v1/events", json=event, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["appended"]["behaviours"] == 5
    after = retrieve(client, query="dress", user_id=42, k=10, filter=False, ts=ts)
    assert [i["scores"]["embedding"] for i in after["data"]] != [i["scores"]["embedding"] for i in before["data"]]
    bad = client.post("/v1/events", json={"behaviours": [{"user_id": 1, "item_id": 2, "action": "like", "ts": 5}]},
                      headers={"authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 422 and "action" in bad.json()["error"]


def test_user_behaviours_need_the_token_and_come_most_recent_first_with_titles(
        client: httpx.Client, core: Retriever, titles: dict[int, str]) -> None:
    serve_version(client, "v1")
    user, ts = 1_000_001, 4_100_000_000_000  # a user without history in world_en; a time after its logs
    a, b, c = sorted(titles)[:3]
    unknown = MAX_ID  # no version serves it
    path = f"/v1/users/{user}/behaviours"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        r = client.get(path, headers=headers)
        assert r.status_code == 401 and "needs the header 'Authorization: Bearer <token>'" in r.json()["error"]
    post_events(client, (user, a, "click", ts - 3_000), (user, unknown, "click", ts - 2_000),
                (user, b, "click", ts - 1_000), (user, c, "click", ts + 1_000),  # after the request's ts
                (user, c, "buy", ts - 15 * DAY_MS),  # in L^u (10 to 30 days back)
                (user, a, "buy", ts - DAY_MS))  # in no window: the encoder does not read it, nor does this
    r = client.get(path, params={"ts": ts}, headers=AUTH)
    assert r.status_code == 200, r.text
    want = [{"item_id": b, "action": "click", "ts": ts - 1_000, "title": titles[b]},
            {"item_id": unknown, "action": "click", "ts": ts - 2_000, "title": None},
            {"item_id": a, "action": "click", "ts": ts - 3_000, "title": titles[a]},
            {"item_id": c, "action": "buy", "ts": ts - 15 * DAY_MS, "title": titles[c]}]
    assert r.json() == {"user_id": user, "version": "v1", "ts": ts, "data": want, "count": 4}
    BehavioursResponse.model_validate(r.json())
    assert r.json() == core.behaviours(user, ts=ts)  # the one code path, in one process
    short = client.get(path, params={"ts": ts, "limit": 2}, headers=AUTH).json()
    assert short["data"] == want[:2] and short["count"] == 2
    later = client.get(path, params={"ts": ts + 2_000}, headers=AUTH).json()
    assert [x["item_id"] for x in later["data"]][:2] == [c, b]  # the later request's windows read the later click
    now = client.get(path, headers=AUTH).json()  # default ts: now, before every one of these events
    assert now["count"] == 0 and abs(now["ts"] - time.time() * 1000) < 60_000
    assert "/v1/users/{user_id}/behaviours" in client.get("/openapi.json").json()["paths"]


BAD_BEHAVIOURS = [
    ("/v1/users/abc/behaviours", "user_id", "Input should be an integer in decimal digits"),
    ("/v1/users/5.0/behaviours", "user_id", "Input should be an integer in decimal digits"),
    ("/v1/users/%205/behaviours", "user_id", "Input should be an integer in decimal digits"),
    ("/v1/users/-1/behaviours", "user_id", "Input should be greater than or equal to 0"),
    (f"/v1/users/{2**63}/behaviours", "user_id", "Input should be less than or equal to 9223372036854775807"),
    ("/v1/users/3/behaviours?limit=0", "limit", "Input should be greater than or equal to 1"),
    ("/v1/users/3/behaviours?limit=501", "limit", "Input should be less than or equal to 500"),
    ("/v1/users/3/behaviours?limit=ten", "limit", "Input should be an integer in decimal digits"),
    ("/v1/users/3/behaviours?limit=1&limit=2", "limit", "given more than once"),
    ("/v1/users/3/behaviours?ts=0", "ts", "Input should be greater than 0"),
    (f"/v1/users/3/behaviours?ts={MAX_TS_MS + 1}", "ts", "Input should be less than or equal to"),
    ("/v1/users/3/behaviours?colour=red", "colour", "Extra inputs are not permitted"),
]


def test_bad_behaviour_reads_are_a_4xx_naming_the_field_and_fail_only_themselves(
        server: tuple[str, ServeConfig], client: httpx.Client) -> None:
    with Load(server[0], clients=2, query="red dress", k=10, user_id=3) as load:
        for path, field, problem in BAD_BEHAVIOURS:
            r = client.get(path, headers=AUTH)
            assert r.status_code == 422, (path, r.text)
            body = r.json()
            assert f"behaviours: invalid request: {field}: {problem}" in body["error"], (path, body)
            assert body["problems"] == [{"field": field, "problem": body["problems"][0]["problem"]}]
            assert body["request_id"]
            assert client.get("/v1/users/3/behaviours", params={"limit": 1}, headers=AUTH).status_code == 200
    assert load.all and all(r[0] == 200 for r in load.all), Counter(r[0] for r in load.all)


def test_metrics(client: httpx.Client) -> None:
    """Passes alone and after any test: it makes the requests whose counters it checks, on the one ingress
    replica (GET /metrics is one replica's view; a test's load may have scaled the ingress to 2)."""
    serve_version(client, "v1")
    wait_for(lambda: serve.status().applications["mgdspr"].deployments["Ingress"].replica_states == {"RUNNING": 1},
             120, "the ingress to scale back to 1 replica")
    retrieve(client, query="dress", k=5)
    assert client.post("/v1/retrieve", json={"query": "dress", "k": 0}).status_code == 422
    text = client.get("/metrics").text
    assert 'mgdspr_requests_total{code="200",endpoint="retrieve"}' in text
    assert 'mgdspr_requests_total{code="422",endpoint="retrieve"}' in text
    assert 'mgdspr_stage_seconds_bucket{le="0.005",stage="encode"}' in text
    assert 'mgdspr_serving_version{version="v1"} 1.0' in text


def test_version_swap_under_load_has_no_failures_and_no_mixing(server: tuple[str, ServeConfig], client: httpx.Client,
                                                               deployment: Any) -> None:
    serve_version(client, "v1")
    info, load = promote_under_load(client, "v2", TOKEN)
    assert info["version"] == "v2" and info["previous"] == "v1"
    assert {r[1] for r in load.all} == {"v1", "v2"}
    assert current_version(deployment.index_root) == "v2"  # a restart serves what serves now
    wait_for(lambda: "mgdspr-v1" not in serve.status().applications, 30, "v1's application to be deleted")
    assert retrieve(client, query="dress", k=5)["version"] == "v2"


def test_broken_version_is_refused_and_the_old_keeps_serving(server: tuple[str, ServeConfig], client: httpx.Client,
                                                             deployment: Any) -> None:
    serve_version(client, "v2")
    broken = deployment.index_root / "v3"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(deployment.index_root / "v2", broken)
    (broken / "manifest.json").write_text((broken / "manifest.json").read_text().replace('"v2"', '"v3"', 1))
    shard = next(broken.glob("shard-0*.faiss"))
    shard.write_bytes(shard.read_bytes()[:-16] + b"\0" * 16)  # tampered: checksum no longer matches
    auth = {"authorization": f"Bearer {TOKEN}"}
    with Load(server[0], clients=2) as load:
        r = client.post("/v1/admin/promote", json={"version": "v3"}, headers=auth, timeout=300)
    assert r.status_code == 409 and "serving version is unchanged" in r.json()["error"]
    assert "does not match its sha256" in r.json()["error"]  # refused before anything loads it
    for leak in ("Traceback", "\x1b[", str(deployment.index_root), "pid=", "ip=", "actor_id", "ray::"):
        assert leak not in r.text  # the manager's exception, not Ray's wrapper with its remote traceback
    assert "v3" in client.get("/v1/version").json()["last_error"]
    assert all(r[0] == 200 and r[1] == "v2" for r in load.all)
    missing = client.post("/v1/admin/promote", json={"version": "nope"}, headers=auth)
    assert missing.status_code == 409 and "not an index version" in missing.json()["error"]
    assert client.post("/v1/admin/promote", json={"version": "v1"}).status_code == 401


def test_moving_current_rolls_back(client: httpx.Client, deployment: Any) -> None:
    serve_version(client, "v2")
    set_current(deployment.index_root, "v1")  # what an operator does to roll back
    wait_for(lambda: client.get("/v1/version").json()["version"] == "v1", 120, "the manager to serve v1")
    # ingress replicas follow the manager within serve.version_refresh_s
    wait_for(lambda: retrieve(client, query="dress", k=5)["version"] == "v1", 5, "requests to be answered by v1")


def test_a_promotion_whose_client_gave_up_still_switches(client: httpx.Client, deployment: Any) -> None:
    """The promotion runs to its end in the version manager (deploy, switch, ``CURRENT``) whatever its client does,
    and the ingress follows it (its long poll: the promotion's own request was cancelled)."""
    serve_version(client, "v1")
    with pytest.raises(httpx.TimeoutException):
        client.post("/v1/admin/promote", json={"version": "v2"}, headers=AUTH, timeout=GIVE_UP_S)
    wait_for(lambda: client.get("/v1/version").json()["version"] == "v2", 120, "the promotion of v2 to end",
             lambda: client.get("/v1/version").json())
    wait_for(lambda: retrieve(client, query="dress", k=5)["version"] == "v2", 5, "requests to be answered by v2")
    assert current_version(deployment.index_root) == "v2"


def test_a_draining_version_promoted_back_is_kept(server: tuple[str, ServeConfig], client: httpx.Client,
                                                 deployment: Any) -> None:
    """Roll back from v2, then promote v2 again while its application still drains: the promotion takes it back
    (its deletion is cancelled) instead of loading it while the manager deletes it."""
    serve_version(client, "v2")
    set_current(deployment.index_root, "v1")
    wait_for(lambda: client.get("/v1/version").json()["version"] == "v1", 120, "the manager to serve v1")
    assert "v2" in client.get("/v1/version").json()["draining"]
    r = client.post("/v1/admin/promote", json={"version": "v2"}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == "v2", r.text
    time.sleep(2 * (server[1].drain_s + 4 * server[1].version_refresh_s) + 1.0)  # past v2's drain deadline
    assert serve.status().applications["mgdspr-v2"].status == "RUNNING"
    assert retrieve(client, query="dress", k=5)["version"] == "v2"
    assert "v2" not in client.get("/v1/version").json()["draining"]


def test_killed_shard_replica_fails_clearly_and_recovers(server: tuple[str, ServeConfig],
                                                         client: httpx.Client) -> None:
    """1 replica (the laptop default): reads wait for the replacement within their deadline; those whose deadline
    ends first are 503 with Retry-After, only inside the restart window (2 replicas: test_faults.py)."""
    serve_version(client, "v1")
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "mgdspr-v1" in a["name"] and "shard-0" in a["name"]]
    assert len(names) == 1, names
    replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    with Load(server[0], clients=8) as load:
        time.sleep(1.0)
        killed = time.time()
        ray.kill(replica, no_restart=True)
        time.sleep(1.0)
        # Serve replaces the replica (a new process: seconds, longer on a loaded machine)
        wait_for(lambda: all(rs and rs[-1][0] == 200 and rs[-1][3] > killed + 1 for rs in load.results), 180,
                 "every client to be answered again")
        recovered = time.time()
        time.sleep(2.0)
    results = load.all
    failures = [r for r in results if r[0] != 200]
    assert all(status == 503 and "retry" in error for status, _, error, _ in failures), failures[:3]
    assert all(after == "1" for after in load.retry_after)  # a 503 says when to retry
    assert all(killed <= at <= recovered for *_, at in failures)  # errors only while the shard restarts
    after = [r for r in results if r[3] > recovered]
    assert after and all(r[0] == 200 for r in after)
    print(f"replica kill: {len(failures)} of {len(results)} requests failed (503) in the "
          f"{recovered - killed:.1f} s until every client was answered again")


def test_restarted_version_manager_adopts_the_serving_version(server: tuple[str, ServeConfig],
                                                              client: httpx.Client) -> None:
    """The manager replica dies (its node is lost, say): requests keep being answered by the serving version, and
    the new manager takes that version's application over as it is: no redeploy, no refusal, no deletion."""
    # v2, not serve.version (v1): the new manager adopts what serves, not what the endpoint started with
    serving = serve_version(client, "v2")

    def replicas(kind: str) -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if kind in a["name"]}

    fixed = f"mgdspr-{serving}#shard"  # shards have a fixed replica count here (the encoder autoscales)
    version_replicas = replicas(fixed)
    assert version_replicas
    (manager,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "VersionManager" in a["name"]]
    with Load(server[0], clients=2) as load:
        time.sleep(1.0)
        ray.kill(ray.get_actor(manager["name"], namespace=manager["namespace"]), no_restart=True)
        wait_for(lambda: replicas("VersionManager") - {manager["name"]}, 120, "a new version manager replica")
        wait_for(lambda: client.get("/v1/version").json()["version"] == serving, 60,
                 "the new manager to report the serving version")
        time.sleep(1.0)
    assert all(r[0] == 200 for r in load.all), [r for r in load.all if r[0] != 200][:3]
    info = client.get("/v1/version").json()
    assert info["last_error"] is None and info["loading"] is None
    assert replicas(fixed) == version_replicas  # the same replicas: adopted, not redeployed


def test_encoder_scales_down_when_idle_and_up_under_load(server: tuple[str, ServeConfig],
                                                         client: httpx.Client) -> None:
    serve_version(client, "v1")
    def encoder_replicas() -> int:
        return serve.status().applications["mgdspr-v1"].deployments["encoder"].replica_states.get("RUNNING", 0)

    wait_for(lambda: encoder_replicas() == 1, 120, "the encoder to scale down to 1 replica when idle")
    with Load(server[0], clients=8, query="red dress", k=50, channels=["embedding", "lexical"]):
        wait_for(lambda: encoder_replicas() == 2, 120, "a second encoder replica under load")

