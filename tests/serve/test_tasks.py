"""The Ray-free core of a replica's background tasks (``serve/tasks.py``): a task a request starts does not
share that request's context, and work run ``to_the_end`` outlives a cancelled caller."""

from __future__ import annotations

import asyncio
import contextvars
import gc

import pytest

from ray_mgdspr.serve.tasks import replica_task, to_the_end

REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


def test_a_replica_task_does_not_see_the_context_of_the_request_that_started_it() -> None:
    async def seen() -> str | None:
        return REQUEST.get()

    async def request() -> tuple[str | None, str | None]:
        REQUEST.set("request-1")  # what Serve's request context is to a handle call made in it
        plain = asyncio.get_running_loop().create_task(seen())
        return await plain, await replica_task(seen(), "seen")

    assert asyncio.run(request()) == ("request-1", None)


def test_work_run_to_the_end_outlives_its_cancelled_caller() -> None:
    done: list[str] = []

    async def promotion() -> str:
        await asyncio.sleep(0.2)
        done.append("switched")
        return "v2"

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("refused")

    async def main() -> None:
        caller = asyncio.get_running_loop().create_task(to_the_end(promotion(), "promote v2"))
        await asyncio.sleep(0.05)
        caller.cancel()  # its client disconnected
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert done == []
        await asyncio.sleep(0.3)
        assert done == ["switched"]
        assert await to_the_end(promotion(), "again") == "v2"
        with pytest.raises(ValueError, match="refused"):
            await to_the_end(failing(), "refused")

    asyncio.run(main())


@pytest.mark.parametrize("logs_its_errors", [True, False])
def test_an_error_the_task_logs_itself_is_not_reported_again_as_never_retrieved(logs_its_errors: bool) -> None:
    reported: list[str] = []

    async def load() -> None:
        raise OSError("the version's files are gone")  # what the task itself logs (Ingress._load)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx["message"]))
        task = replica_task(load(), "load v2", logs_its_errors=logs_its_errors)
        await asyncio.sleep(0.01)  # it fails; nobody awaits it (no request came for that version)
        assert task.done()
        del task
        gc.collect()  # asyncio reports an unretrieved exception when the task is collected

    asyncio.run(main())
    assert reported == ([] if logs_its_errors else ["Task exception was never retrieved"])
