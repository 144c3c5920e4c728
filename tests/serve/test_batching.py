"""``serve/batching.py``: a replica's concurrent requests run in batches formed when the replica is free
(Ray-free: asyncio and threads only)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ray_mgdspr.serve.batching import Batcher
from ray_mgdspr.serve.engine import each_alone


class Slow:
    """A batch function that takes ``seconds`` per batch in its thread, records every batch, and fails the items
    equal to ``bad`` (its whole batch raises; ``each_alone`` then answers the others)."""

    def __init__(self, seconds: float, bad: int | None = None) -> None:
        self.seconds, self.bad, self.batches, self.threads = seconds, bad, [], set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        if self.bad in items:
            raise ValueError(f"item {self.bad} is bad")
        return [i * 10 for i in items]


async def _arrivals(batcher: Batcher, items: list[int], gap_s: float) -> list:
    """``items`` called one after another, ``gap_s`` apart, all awaited together."""
    calls = []
    for i in items:
        calls.append(asyncio.ensure_future(batcher(i)))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*calls)


def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch() -> None:
    """The first request runs alone at once; the 15 that arrive during it run as one batch after it (Ray Serve
    2.60's ``@serve.batch`` with a 0 ms wait ran them as 16 batches of one), every result to its own caller."""
    fn = Slow(0.2)
    results = asyncio.run(_arrivals(Batcher(fn, max_size=32), list(range(16)), 0.005))
    assert results == [i * 10 for i in range(16)]
    assert fn.batches == [[0], list(range(1, 16))]
    assert "MainThread" not in fn.threads  # in a worker thread: the event loop takes requests meanwhile


def test_a_batch_holds_at_most_max_size_and_the_rest_wait_for_the_next() -> None:
    fn = Slow(0.2)
    results = asyncio.run(_arrivals(Batcher(fn, max_size=4), list(range(11)), 0.002))
    assert results == [i * 10 for i in range(11)]
    assert [len(b) for b in fn.batches] == [1, 4, 4, 2]
    assert [i for b in fn.batches for i in b] == list(range(11))  # first come, first served


def test_a_wait_lets_a_batch_gather_requests_and_a_full_batch_goes_at_once() -> None:
    fn = Slow(0.0)

    async def main() -> float:
        batcher = Batcher(fn, max_size=3, wait_s=0.3)
        await _arrivals(batcher, [1, 2], 0.01)  # the 0.3 s wait gathers both
        t = time.monotonic()
        await _arrivals(batcher, [3, 4, 5], 0.0)  # full: no wait
        return time.monotonic() - t

    full_after = asyncio.run(main())
    assert fn.batches == [[1, 2], [3, 4, 5]]
    assert full_after < 0.2


def test_a_failing_request_fails_alone_and_the_batch_function_breaking_fails_only_its_batch() -> None:
    fn = Slow(0.05, bad=7)
    batcher = Batcher(lambda items: each_alone(fn, items), max_size=32)
    results = asyncio.run(_arrivals(batcher, [1, 5, 7, 9], 0.001))
    assert results[:2] == [10, 50] and results[3] == 90
    assert isinstance(results[2], ValueError) and "item 7" in str(results[2])

    # one result for a batch of several: a bug in the batch function, which fails that batch's callers only
    broken = Batcher(lambda items: (time.sleep(0.05), items[:1])[1], max_size=32)
    results = asyncio.run(_arrivals(broken, [1, 2, 3], 0.001))
    assert results[0] == 1  # alone in the first batch
    assert all(isinstance(r, RuntimeError) and "a batch of 2 got 1 results" in str(r) for r in results[1:])

    async def later() -> list:  # the batcher goes on after a broken batch
        return await _arrivals(broken, [4], 0.0)
    assert asyncio.run(later()) == [4]


def test_a_caller_that_gives_up_before_its_batch_is_left_out() -> None:
    fn = Slow(0.2)

    async def main() -> list:
        batcher = Batcher(fn, max_size=32)
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.02)
        impatient = asyncio.ensure_future(asyncio.wait_for(batcher(2), 0.05))
        patient = asyncio.ensure_future(batcher(3))
        with pytest.raises(TimeoutError):
            await impatient
        return [await first, await patient]

    assert asyncio.run(main()) == [10, 30]
    assert fn.batches == [[1], [3]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_size >= 1"):
        Batcher(lambda items: items, max_size=0)
    with pytest.raises(ValueError, match="wait_s >= 0"):
        Batcher(lambda items: items, max_size=1, wait_s=-1)
