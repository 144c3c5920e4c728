"""The endpoint's error taxonomy: which failures are the client's, which are retryable, which are bugs.

==========  ==============================================================  ======================
status      meaning                                                         client should
==========  ==============================================================  ======================
400         the body is not UTF-8 JSON (or nests too deep to parse)          fix the request
401 / 403   a write path or a history read without the right bearer token,  send the token
            or with none set
409         a promotion refused (the serving version is unchanged)           fix the version
413         the body is larger than the endpoint's byte limit                split or shorten it
422         a field is missing, of the wrong type, unknown or out of range   fix the named field
            (or a query parameter repeated)
503         a stage is unavailable or overloaded (``Retry-After`` header)    retry after the wait
500         a bug; the body carries only the request id, the server log      report the request id
            holds the traceback under it
==========  ==============================================================  ======================

Reads that fail because a replica died or is unavailable (``RETRYABLE``) are retried on another replica
within the request's deadline before they become a 503. No error body carries a traceback, a server path, an
address, an actor id or terminal colour codes (``public_message``).
"""

from __future__ import annotations

import re
from typing import Any

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

# a replica died, is restarting, is unreachable or sheds load: the same read can succeed on another replica
RETRYABLE: tuple[type[BaseException], ...] = (
    RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, BackPressureError,
    DeploymentUnavailableError, ReplicaUnavailableError)
RETRY_AFTER_S = 1  # the Retry-After of a 503: a replica restart or a scale-up takes seconds

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PATH = re.compile(r"(?<![\w.~])(?:/[^\s/:'\"(),\[\]]+)+/?")
_ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b")
_ACTOR = re.compile(r"\b(?:actor_id|pid|ip|node_id|worker_id|Actor ID|Worker ID|Node ID)[=:]\s*\S+", re.I)
MAX_MESSAGE_CHARS = 600


class HttpError(Exception):
    """An error response: the status, a message for the client, extra body fields and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


def unavailable(message: str) -> HttpError:
    """A 503 with ``Retry-After``: only for a stage that is really unavailable or overloaded."""
    return HttpError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)}, retry_after_s=RETRY_AFTER_S)


def cause(e: BaseException) -> BaseException:
    """The exception raised inside a replica, not Ray's wrapper of it (which carries the remote traceback)."""
    inner = getattr(e, "cause", None)
    return inner if isinstance(inner, BaseException) else e


def public_message(text: str) -> str:
    """``text`` fit for a response body: no traceback (only its last line), no colour codes, no server paths
    (``/srv/index/v3/shard-0.faiss`` becomes ``.../v3/shard-0.faiss``), no addresses or actor/process ids, at
    most ``MAX_MESSAGE_CHARS`` characters."""
    text = _ANSI.sub("", text)
    if "Traceback (most recent call last)" in text:
        head, _, tail = text.partition("Traceback (most recent call last)")
        last = [line.strip() for line in tail.splitlines() if line.strip()]
        text = (head.strip() + " " + (last[-1] if last else "")).strip()
    text = _PATH.sub(lambda m: ".../" + "/".join(m.group(0).rstrip("/").split("/")[-2:]), text)
    text = _ACTOR.sub("", _ADDRESS.sub("<address>", text))
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."
