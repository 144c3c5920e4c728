"""Background tasks of a Serve replica: the ingress's long poll of the version manager, its recall canary
samples, its loading of versions (placement inline), the version manager's housekeeping.

A task inherits the context variables of the code that creates it, and Serve's request context is one of them.
When a request is cancelled (its client disconnected: a readiness probe that gave up while the first version
loaded, say), Serve cancels every deployment-handle call made under that request's context, as its child
requests (``ray.serve._private.replica``, ``_on_request_cancelled``). A task started by a request therefore dies
with it whenever one of its own handle calls is in flight: an ingress replica whose first request was cancelled
lost its long poll and never heard of a version switch again (found on a loaded machine, where the first version
loaded for longer than ``wait_ready``'s probe waited; ``tests/serve/test_app.py``, ``probe_that_gives_up``).
A task started here runs in a fresh context: it belongs to the replica.

Ray-free (asyncio only).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def replica_task(coro: Coroutine[Any, Any, T], name: str, logs_its_errors: bool = False) -> asyncio.Task[T]:
    """``coro`` as a task of this replica on the running loop, in a fresh context: no request that happens to
    start it can cancel it (see the module docstring). Hold a reference to it: the loop holds tasks weakly.

    ``logs_its_errors``: ``coro`` logs or records its own failures, and callers that await the task see them; an
    exception nobody awaited is then taken when the task ends, so asyncio does not warn that it was never
    retrieved."""
    task = asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())
    if logs_its_errors:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def to_the_end(coro: Coroutine[Any, Any, T], name: str) -> T:
    """``await coro``, run as a ``replica_task`` that a cancelled caller leaves running to its end: a promotion
    whose client disconnected still switches, or is refused, in full (never half-deployed). ``coro`` records its
    own failures (the version manager's ``last_error`` and log): with no caller left, nobody else sees them."""
    return await asyncio.shield(replica_task(coro, name, logs_its_errors=True))
