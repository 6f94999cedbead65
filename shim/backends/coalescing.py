"""Concurrent requests for one model become rounds, each run as one piece of work: shared by both backends.

A request waits only while earlier rounds are in flight. With nothing in flight a lone request runs at once (no timer,
no added latency); under load each round takes everything that queued meanwhile, up to its budget, so the encoder sees
large batches exactly when there is a queue. Dify sends one input per request: this is what turns sixteen of them into
one encoder run instead of sixteen.

Clients that send their next request as soon as they have an answer (Dify's indexing workers) split into cohorts when
one round computes at a time: the requests that arrive during a round form the next one, and the clients that round
answers come back during the one after. Sixteen such clients made two alternating rounds of eight. So a round may also
wait, right after the previous one ends, for as many requests as that one answered (``regather``): only where they came
back within a small share of its time the last time, and never longer than that share.

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
import math
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
class _Returns:
    """Requests arriving after a round ended: how long until as many came as it answered."""

    ended: float  # loop time
    answered: int
    seconds: float  # the round's own time
    arrived: int = 0
    took: float | None = None  # once as many have arrived


@dataclasses.dataclass
class RoundStats:
    rounds: int = 0
    requests: int = 0
    rows: int = 0
    waited_seconds: float = 0.0  # rounds waiting for the last round's clients to come back (``regather``)

    @property
    def rows_per_round(self) -> float:
        return self.rows / self.rounds if self.rounds else 0.0


# run(payloads, wanted): wanted() turns False once every request of the round has left (its answers go to nobody).
RunRound = Callable[[Sequence[P], Callable[[], bool]], Awaitable[Sequence["R | BaseException"]]]


class Coalescer(Generic[P, R]):
    """Queue of requests for one model; ``run`` gets one round's payloads and returns one result (or exception) each.

    A round holds at least one request and adds more while it stays within ``max_cost`` (tokens, or characters where
    tokens are not known yet) and ``max_rows``; at most ``concurrency`` rounds are in flight.

    ``regather``: the longest a round waits for the clients of the one before, as a share of that round's time; 0 never.
    It waits only where as many requests as that round answered arrived within the share after the round before it.
    With several rounds in flight it never waits: the others keep the encoder busy meanwhile."""

    def __init__(
        self, run: RunRound, *, max_rows: int, max_cost: int, concurrency: int = 1, name: str = "", regather: float = 0.0
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0 <= regather < 1:
            raise ValueError("regather is a share of a round's time: at least 0, below 1")
        self._run = run
        self.max_rows = max_rows
        self.max_cost = max_cost
        self.concurrency = concurrency
        self.regather = regather if concurrency == 1 else 0.0
        self.name = name
        self._returns: _Returns | None = None  # since the last round ended
        self._came_back = math.inf  # seconds the round before it took to get as many requests as it answered
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
        loop = asyncio.get_running_loop()
        job: _Job[P, R] = _Job(payload, rows, cost, loop.create_future())
        self._queue.append(job)
        returns = self._returns
        if returns is not None and returns.took is None:
            returns.arrived += 1
            if returns.arrived >= returns.answered:
                returns.took = loop.time() - returns.ended
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
                await self._regather()
                jobs = self._take_round()
            for job in jobs:
                job.running = True
            task = asyncio.create_task(self._round(jobs), name=f"round:{self.name}")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _regather(self) -> None:
        """Wait for as many requests as the last round answered, where they came back soon enough the time before."""
        returns = self._returns
        if not self.regather or returns is None or returns.took is not None:
            return
        budget = self.regather * returns.seconds
        if self._came_back > budget:  # waiting would mostly leave the encoder idle
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        while returns.took is None and (left := returns.ended + budget - loop.time()) > 0:
            self._waiting.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waiting.wait(), left)
        self.stats.waited_seconds += loop.time() - began

    async def _round(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
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
            ended = loop.time()
            if (last := self._returns) is not None:  # not all back yet: at least this long
                self._came_back = last.took if last.took is not None else ended - last.ended
            self._returns = _Returns(ended=ended, answered=len(jobs), seconds=ended - began)
            self._slots.release()
