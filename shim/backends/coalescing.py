"""Concurrent requests for one model become rounds, each run as one piece of work: shared by both backends.

A request waits only while earlier rounds are in flight. With nothing in flight a lone request runs at once (no timer,
no added latency); under load each round takes everything that queued meanwhile, up to its budget, so the encoder sees
large batches exactly when there is a queue. Dify sends one input per request: this is what turns sixteen of them into
one encoder run instead of sixteen.

Cancellation is exact. A request that leaves before its round starts is dropped from the queue; one that leaves while
its round runs waits for the round to end before it gives up, so whoever counts admitted work (``service.Admission``)
counts what really runs. ``run`` is told when every request of its round has left (``wanted``), and may stop early.
One request's failure is its own: ``run`` returns a result or an exception per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger("fos.coalescing")


@dataclasses.dataclass(eq=False)
class _Job(Generic[P, R]):
    payload: P
    rows: int
    cost: int
    future: asyncio.Future[R]
    running: bool = False
    abandoned: bool = False


@dataclasses.dataclass
class RoundStats:
    rounds: int = 0
    requests: int = 0
    rows: int = 0

    @property
    def rows_per_round(self) -> float:
        return self.rows / self.rounds if self.rounds else 0.0


# run(payloads, wanted): wanted() turns False once every request of the round has left (its answers go to nobody).
RunRound = Callable[[Sequence[P], Callable[[], bool]], Awaitable[Sequence["R | BaseException"]]]


class Coalescer(Generic[P, R]):
    """Queue of requests for one model; ``run`` gets one round's payloads and returns one result (or exception) each.

    A round holds at least one request and adds more while it stays within ``max_cost`` (tokens, or characters where
    tokens are not known yet) and ``max_rows``; at most ``concurrency`` rounds are in flight."""

    def __init__(self, run: RunRound, *, max_rows: int, max_cost: int, concurrency: int = 1, name: str = ""):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._run = run
        self.max_rows = max_rows
        self.max_cost = max_cost
        self.concurrency = concurrency
        self.name = name
        self.stats = RoundStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._waiting = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._rounds: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"rounds:{self.name}")

    async def close(self) -> None:
        tasks = [t for t in (self._dispatcher, *self._rounds) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        while self._queue:  # never to run: their requests end now rather than wait for their clients to leave
            self._queue.popleft().future.cancel()

    async def submit(self, payload: P, rows: int, cost: int) -> R:
        job: _Job[P, R] = _Job(payload, rows, cost, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._waiting.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.abandoned = True
            if job.running:  # the round cannot be stopped halfway: let it end before giving its capacity back
                await asyncio.wait([job.future])
            else:  # out of the queue now: its payload is not held past the capacity it gave back
                with contextlib.suppress(ValueError):  # close() took it already
                    self._queue.remove(job)
            raise

    def _take_round(self) -> list[_Job]:
        jobs: list[_Job] = []
        rows = cost = 0
        while self._queue:
            job = self._queue[0]
            if jobs and (rows + job.rows > self.max_rows or cost + job.cost > self.max_cost):
                break
            self._queue.popleft()
            jobs.append(job)
            rows += job.rows
            cost += job.cost
        return jobs

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            jobs: list[_Job] = []
            while not jobs:
                if not self._queue:
                    self._waiting.clear()
                    await self._waiting.wait()
                jobs = self._take_round()
            for job in jobs:
                job.running = True
            task = asyncio.create_task(self._round(jobs), name=f"round:{self.name}")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _round(self, jobs: list[_Job]) -> None:
        try:
            self.stats.rounds += 1
            self.stats.requests += len(jobs)
            self.stats.rows += sum(j.rows for j in jobs)
            try:
                results: Sequence[object] = await self._run([j.payload for j in jobs], lambda: not all(j.abandoned for j in jobs))
                if len(results) != len(jobs):
                    raise RuntimeError(f"a round of {len(jobs)} requests returned {len(results)} results")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the whole round failed: each request gets the error
                results = [exc] * len(jobs)
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                    if job.abandoned:
                        job.future.exception()  # nobody awaits it: mark it retrieved
                else:
                    job.future.set_result(result)
        finally:
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()
            self._slots.release()
