"""Dynamic batching: requests wait in one bounded queue; a collector takes the first, then whatever else
arrives within ``window_s`` of it (or is already waiting), up to ``max_rows`` rows of history or ``max_jobs``
requests, and hands that batch to ``handle`` (which runs it in one packed forward). It stops waiting as soon
as the batch holds every API request the server is handling (``active``, counted from the moment a request
reaches the application): with one client, waiting could only add latency. While a batch runs, new requests
queue up and form the next one, so under load batches fill without waiting.

Backpressure: ``submit`` raises ``QueueFull`` when ``queue_size`` requests are already waiting (the server
answers 503 with Retry-After). A request whose caller stopped waiting (its timeout) is dropped if it has not
started. ``stop`` lets every queued request finish first (the graceful drain).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

QueueFull = asyncio.QueueFull
log = logging.getLogger("patchrec.serve")


@dataclass
class Job:
    kind: str  # "events" or "recommend"
    payload: Any
    rows: int  # history rows it adds to a batch (0 for events)
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        handle: Callable[[list[Job]], Awaitable[None]],
        *,
        window_s: float,
        max_rows: int,
        max_jobs: int,
        queue_size: int,
        on_depth: Callable[[int], None] | None = None,
        active: Callable[[], int] | None = None,
    ) -> None:
        if window_s < 0 or max_rows < 1 or max_jobs < 1 or queue_size < 1:
            raise ValueError("batch window must be >= 0 and row budget, batch size and queue size >= 1")
        self.handle = handle
        self.window_s, self.max_rows, self.max_jobs = window_s, max_rows, max_jobs
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue(queue_size)
        self.on_depth = on_depth or (lambda depth: None)
        self.active = active  # API requests being handled (None: unknown, always wait the window)
        self._carry: Job | None = None  # a job that did not fit the previous batch's row budget
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="patchrec-batcher")

    def submit(self, job: Job) -> None:
        """Queue ``job`` (raises ``QueueFull``)."""
        self.queue.put_nowait(job)
        self.on_depth(self.queue.qsize())

    async def stop(self) -> None:
        """Finish every queued job, then stop."""
        if self._task is None:
            return
        await self.queue.put(None)
        await self._task
        self._task = None

    async def _next(self, timeout: float | None) -> Job | None | bool:
        """The next job, None at the stop marker, False when ``timeout`` passes first."""
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            if timeout is None:
                return await self.queue.get()
            if timeout <= 0:
                return self.queue.get_nowait()
            return await asyncio.wait_for(self.queue.get(), timeout)
        except (asyncio.QueueEmpty, TimeoutError):
            return False

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._next(None)
            if first is None:
                break
            jobs, rows = [first], first.rows
            deadline = time.perf_counter() + self.window_s
            while len(jobs) < self.max_jobs and rows < self.max_rows:
                alone = self.active is not None and len(jobs) >= self.active()
                job = await self._next(0.0 if alone else deadline - time.perf_counter())
                if job is False:
                    break
                if job is None:
                    stopping = True  # run what was collected, then stop
                    break
                if rows + job.rows > self.max_rows:
                    self._carry = job
                    break
                jobs.append(job)
                rows += job.rows
            self.on_depth(self.queue.qsize())
            live = [j for j in jobs if not j.future.done()]  # a timed-out caller cancelled its future
            if not live:
                continue
            try:
                await self.handle(live)
            except Exception as err:  # a bug in a batch must not stop the server: its requests get a 500
                log.exception("a batch failed")
                for job in live:
                    if not job.future.done():
                        job.future.set_result(err)  # the waiting handler raises it


__all__ = ["Batcher", "Job", "QueueFull"]
