"""The Ray-free parts of the error taxonomy: strict request types, limits that agree, batch isolation, and
error messages that carry no internals."""

from __future__ import annotations

import contextlib
import json
from collections import Counter

import pytest
from pydantic import ValidationError

from ray_mgdspr.config import BEHAVIOUR_JSON_BYTES, ServeConfig
from ray_mgdspr.serve.engine import each_alone
from ray_mgdspr.serve.errors import public_message
from ray_mgdspr.serve.schemas import EventsRequest, PromoteRequest, RetrieveRequest
from ray_mgdspr.serve.store import MAX_ID, MAX_TS_MS


@pytest.mark.parametrize("body", [
    {"query": "dress", "k": True}, {"query": "dress", "k": "5"}, {"query": "dress", "k": 5.0},
    {"query": "dress", "filter": "no"}, {"query": "dress", "filter": 0}, {"query": "dress", "user_id": "42"},
    {"query": "dress", "user_id": MAX_ID + 1}, {"query": "dress", "user_id": -1},
    {"query": "dress", "ts": 10**30}, {"query": "dress", "ts": 0}, {"query": "dress", "ts": MAX_TS_MS + 1},
    {"query": "dress", "channels": "embedding"}, {"query": "dress", "channels": ["embedding", "embedding"]},
    {"query": ["dress"]}, {"query": "dress", "colour": "red"},
])
def test_retrieve_requests_are_strict_and_bounded(body: dict) -> None:
    with pytest.raises(ValidationError):
        RetrieveRequest.model_validate(body)


def test_retrieve_request_at_its_bounds_is_valid() -> None:
    r = RetrieveRequest.model_validate({"query": " red dress ", "user_id": MAX_ID, "ts": MAX_TS_MS, "k": 7,
                                        "filter": False, "channels": ["lexical", "embedding"]})
    assert r.query == "red dress" and r.user_id == MAX_ID and r.ts == MAX_TS_MS


@pytest.mark.parametrize("event", [
    {"user_id": 1, "item_id": 2, "action": "click", "ts": 5, "extra": 1},  # unknown key inside an event
    {"user_id": 2**63, "item_id": 2, "action": "click", "ts": 5},
    {"user_id": 1, "item_id": 2, "action": "click", "ts": 10**30},
    {"user_id": True, "item_id": 2, "action": "click", "ts": 5},
    {"user_id": 1, "item_id": "2", "action": "click", "ts": 5},
    {"user_id": 1, "item_id": 2, "action": "like", "ts": 5},
])
def test_events_are_strict_closed_and_bounded(event: dict) -> None:
    with pytest.raises(ValidationError):
        EventsRequest.model_validate({"behaviours": [event]})


def test_past_queries_are_bounded() -> None:
    ok = {"user_id": 1, "ts": 5, "query_words": ["red", "dress"]}
    assert EventsRequest.model_validate({"queries": [ok]}).queries[0].query_words == ["red", "dress"]
    for words in (["w"] * 65, ["x" * 65], [""], "red dress", [1]):
        with pytest.raises(ValidationError):
            EventsRequest.model_validate({"queries": [{**ok, "query_words": words}]})


def test_promote_version_names_cannot_walk_paths() -> None:
    for bad in ("../v1", "/etc", "v1/../../x", "", ".hidden", "a" * 129, 5):
        with pytest.raises(ValidationError):
            PromoteRequest.model_validate({"version": bad})


def test_events_limits_agree_with_the_body_limit() -> None:
    cfg = ServeConfig()
    largest = {"user_id": MAX_ID, "item_id": MAX_ID, "action": "collect", "ts": MAX_TS_MS}
    body = json.dumps({"behaviours": [largest] * cfg.max_events}).encode()
    assert len(body) <= cfg.max_events_bytes  # serve.max_events of the largest behaviours fit the default limit
    assert len(json.dumps(largest)) + 2 == BEHAVIOUR_JSON_BYTES
    with pytest.raises(ValidationError, match="max_events_bytes"):
        ServeConfig(max_events=5000)  # 5,000 events could never fit 128 KiB: refused when configured


def test_each_alone_fails_only_the_failing_request() -> None:
    def square(batch: list[int]) -> list[int]:
        if any(x < 0 for x in batch):
            raise OverflowError("negative")
        return [x * x for x in batch]

    assert each_alone(square, [1, 2, 3]) == [1, 4, 9]
    out = each_alone(square, [1, -2, 3])
    assert out[0] == 1 and out[2] == 9 and isinstance(out[1], OverflowError)
    assert isinstance(each_alone(square, [-1])[0], OverflowError)


def test_public_messages_carry_no_internals() -> None:
    text = ("\x1b[36mray::VersionManager.promote()\x1b[39m (pid=4242, ip=10.1.2.3, actor_id=abc123def)\n"
            "Traceback (most recent call last):\n  File \"/srv/app/ray_mgdspr/serve/deployments.py\", line 9\n"
            "PromotionRefused: version v3: index /srv/data/index/v3 fails verification: shard-0.faiss does not "
            "match its sha256")
    out = public_message(text)
    assert out.endswith("index .../index/v3 fails verification: shard-0.faiss does not match its sha256")
    for leak in ("\x1b", "/srv", "4242", "10.1.2.3", "abc123def", "Traceback", "deployments.py"):
        assert leak not in out
    assert len(public_message("x " * 5000)) <= 600


def test_a_bug_is_a_500_with_the_request_id_and_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The ingress's last-resort handler: what escaped a route is answered 500 with the request id (the one Serve's
    proxy put in ``x-request-id``); the traceback goes to the server log under that id, never into the body."""
    import asyncio

    from starlette.requests import Request

    from ray_mgdspr.serve.errors import unavailable
    from ray_mgdspr.serve.ingress import _bug, _http_error

    scope = {"type": "http", "method": "POST", "path": "/v1/retrieve", "headers": [(b"x-request-id", b"rid-7")],
             "query_string": b""}
    try:
        raise KeyError("/srv/secret/path.sqlite")
    except KeyError as e:
        with caplog.at_level("ERROR", logger="ray.serve"):
            r = asyncio.run(_bug(Request(scope), e))
    assert r.status_code == 500 and json.loads(r.body) == {
        "error": "internal error; the server log has its traceback under this request id", "request_id": "rid-7"}
    assert "rid-7" in caplog.text and "/srv/secret/path.sqlite" in caplog.text  # the log has it all
    r = asyncio.run(_http_error(Request(scope), unavailable("the encoder stage is unavailable; retry")))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert json.loads(r.body)["request_id"] == "rid-7"


def test_a_request_out_of_time_names_the_stages_it_still_waited_on() -> None:
    """What a 503 for a request past its deadline names (``Ingress._respond``): the stage calls still awaited when
    it was cancelled, with the concurrent ones counted; those that ended (answered or failed) are not named."""
    import asyncio

    from ray_mgdspr.serve.ingress import awaited_stages, waited_for, waiting_on

    async def stage(name: str, seconds: float, fails: bool = False) -> None:
        with waiting_on(name):
            await asyncio.sleep(seconds)
            if fails:
                raise ConnectionError(name)

    async def request() -> None:
        await stage("encode", 0)
        with contextlib.suppress(ConnectionError):
            await stage("lexical", 0, fails=True)
        await asyncio.gather(stage("search", 10), stage("search", 10), stage("search", 0))

    async def run() -> str:
        with awaited_stages() as waiting, pytest.raises(TimeoutError):
            await asyncio.wait_for(request(), 0.2)
        return waited_for(waiting)

    assert asyncio.run(run()) == "search x2"
    with waiting_on("encode"):  # outside a request: counted nowhere, no error
        pass
    assert waited_for(Counter()) == "nothing"
