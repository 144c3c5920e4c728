"""Batching a replica's concurrent requests: while one batch runs, the next gathers every request that arrives,
and it starts as soon as the batch before it ends (continuous batching, as Triton's dynamic batcher and vLLM do).

Ray Serve's ``@serve.batch`` (2.60) forms the next batch while the one before it still runs, then queues it for
its turn (``max_concurrent_batches``). With a wait of 0 ms that next batch is the one request that came first, so
under load its batches held 1.01 requests while each request waited ~140 ms inside the replica for batches of one
to run ahead of it (16 clients, ``benchmarks/results/serve-batching-before.md``). Here a batch is formed only
when the replica is free to run it, so whatever queued meanwhile (up to ``max_size``) runs as one query-tower
forward pass and one Faiss search per shard.

Ray-free (asyncio only): each replica holds one ``Batcher`` per batched method and awaits it on its event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await batcher(item)``: ``fn`` over a batch of concurrent items, in a worker thread, one batch at a time.

    Args:
        fn: items -> one result per item, in order; a result may be an ``Exception`` for that item alone
            (``engine.each_alone`` gives that). It runs in a thread (``asyncio.to_thread``), so the event loop
            takes new requests meanwhile.
        max_size: the most items in one batch (``serve.batch_size``); the rest wait for the next.
        wait_s: how long a batch may wait after its first item for more, unless it fills
            (``serve.batch_wait_ms``; 0: it takes what queued while the one before it ran).
        on_batch: called with each batch's size as it starts (the ``mgdspr_batch_size`` metric).
    """

    def __init__(self, fn: Callable[[list[T]], list[R | Exception]], max_size: int, wait_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_size < 1 or wait_s < 0:
            raise ValueError(f"a batch needs max_size >= 1 and wait_s >= 0, got {max_size} and {wait_s}")
        self.fn, self.max_size, self.wait_s, self.on_batch = fn, max_size, wait_s, on_batch
        self._queue: collections.deque[tuple[T, asyncio.Future, float]] = collections.deque()
        self._full = asyncio.Event()
        self._runner: asyncio.Task | None = None

    async def __call__(self, item: T) -> R | Exception:
        """``item``'s result from the batch it ran in (or its own exception, as ``fn`` returned it). A caller that
        is cancelled before its batch starts is left out of it."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, time.monotonic()))
        if len(self._queue) >= self.max_size:
            self._full.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        """Batches, one after another, until nothing is queued."""
        try:
            await self._batches()
        except asyncio.CancelledError:  # the replica's loop is stopping: no caller is left waiting for nothing
            for _, future, _ in self._queue:
                future.cancel()
            raise

    async def _batches(self) -> None:
        while self._queue:
            if self.wait_s > 0 and len(self._queue) < self.max_size:
                left = self._queue[0][2] + self.wait_s - time.monotonic()
                if left > 0:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):  # the wait ended: the batch goes as it is
                        await asyncio.wait_for(self._full.wait(), left)
            batch: list[tuple[T, asyncio.Future]] = []
            while self._queue and len(batch) < self.max_size:
                item, future, _ = self._queue.popleft()
                if not future.done():  # its caller gave up (a timeout, a disconnect): not computed
                    batch.append((item, future))
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as e:  # fn itself broke (not one item): every caller of the batch gets it
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
