"""Dynamic batching: requests that arrive together share one forward pass, and the queue in front of the model is
bounded, so a burst gets 503 instead of growing memory.

The event loop only queues; the model runs in one worker thread (torch releases the GIL, so ``/healthz`` and
``/metrics`` keep answering while it computes). The batcher takes the first waiting job, waits at most
``batch_wait`` seconds for up to ``max_batch - 1`` more, and hands them to ``process`` together.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from comneck_cli.errors import ComneckError


class QueueFull(ComneckError):
    """Every place in the queue is taken; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Batcher:
    """Jobs in, results out, ``max_batch`` at a time through ``process(jobs) -> results`` (one result or exception
    per job, in order) on a single worker thread. ``on_batch(size)`` and ``on_depth(waiting)`` feed the metrics."""

    def __init__(self, process: Callable[[Sequence[Any]], list[Any]], *, max_batch: int, batch_wait: float,
                 max_queue: int, on_batch: Callable[[int], None] = lambda n: None,
                 on_depth: Callable[[int], None] = lambda n: None) -> None:
        self.process, self.max_batch, self.batch_wait, self.max_queue = process, max_batch, batch_wait, max_queue
        self.on_batch, self.on_depth = on_batch, on_depth
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comneck-model")
        self._seconds_per_batch = 1.0  # a running estimate, for Retry-After
        self._busy = False

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish every job already queued, then stop the worker (the server has stopped accepting by now)."""
        while self._waiting or self._busy:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, job: Any) -> Any:
        """The result of ``job`` once its batch has run; :class:`QueueFull` at once when the queue is full."""
        if len(self._waiting) >= self.max_queue:
            batches = -(-len(self._waiting) // self.max_batch)
            raise QueueFull(f"the server is busy ({len(self._waiting)} requests waiting); retry later",
                            max(1, round(batches * self._seconds_per_batch)))
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        self.on_depth(len(self._waiting))
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = loop.time() + self.batch_wait
            while len(self._waiting) < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            if self._waiting:  # more than one batch was waiting: go again at once
                self._arrived.set()
            else:
                self._arrived.clear()
            self.on_depth(len(self._waiting))
            self.on_batch(len(batch))
            started, self._busy = loop.time(), True
            try:
                results = await loop.run_in_executor(self._executor, self.process, [job for job, _ in batch])
            except Exception as exc:  # process itself failed: every job of the batch gets the error
                results = [exc] * len(batch)
            finally:
                self._busy = False
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (loop.time() - started)
            for (_, future), result in zip(batch, results):
                if future.done():  # the client went away and its handler was cancelled
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
