"""A small JSON client of the retrieval endpoint (the CLI and the pipeline job use it; stdlib only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class EndpointError(RuntimeError):
    """The endpoint answered with an HTTP error (``status``), or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


def call(url: str, path: str, body: dict[str, Any] | None = None, token: str | None = None,
         timeout: float = 600, retries: int = 3) -> dict[str, Any]:
    """GET ``url + path`` (or POST ``body`` as JSON) and return the JSON answer.

    A read (a GET, or ``/v1/retrieve``) answered 503 (a stage unavailable: docs/serving.md, "Errors and
    retries") is retried up to ``retries`` times after its ``Retry-After``; writes (events, promotion) and every
    other error are final, since a write that timed out may still have happened.

    Raises:
        EndpointError: an HTTP error (with the server's ``error`` message) or a connection failure.
    """
    for _ in range(retries if body is None or path == "/v1/retrieve" else 0):
        try:
            return _call_once(url, path, body, token, timeout)
        except EndpointError as e:
            if e.status != 503:
                raise
            time.sleep(e.retry_after_s)
    return _call_once(url, path, body, token, timeout)


def _call_once(url: str, path: str, body: dict[str, Any] | None, token: str | None, timeout: float
               ) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", "")
        except ValueError:
            message = e.reason
        try:
            wait = min(float(e.headers.get("retry-after", 1)), 30.0)
        except ValueError:
            wait = 1.0
        raise EndpointError(f"{url}{path}: HTTP {e.code}: {message}", e.code, wait) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise EndpointError(f"{url}: cannot connect ({reason}); is the endpoint running?") from None
