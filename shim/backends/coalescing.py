"""Concurrent requests for one model become rounds, each run as one piece of work: shared by both backends.

A request waits only while earlier rounds are in flight. With nothing in flight a lone request runs at once (no timer,
no added latency); under load each round takes everything that queued meanwhile, up to its budget, so the encoder sees
large batches exactly when there is a queue. Dify sends one input per request: this is what turns sixteen of them into
one encoder run instead of sixteen.

Cancellation is exact. A request that leaves before its round starts is dropped from the queue; one that leaves while
its round runs waits for the round to end before it gives up, so whoever counts admitted work (``service.Admission``)
counts what really runs. ``run`` is told when every request of its round has left (``wanted``), and may stop early.
One request's failure is its own: ``run`` returns a result or an exception per request.

No round is larger than its budget, even for one request: a request larger than that goes in pieces (``pieces``,
``submit_pieces``), at most as many in flight as rounds may be, so that requests queued meanwhile, another client's
single query, go into the rounds between them rather than waiting for the whole of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import numpy as np

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


def pieces(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """A request's input indices in pieces of at most ``budget`` (an input larger than that alone), sorted by length
    so that each piece holds inputs of like length, as one round of them all would have grouped them."""
    out: list[list[int]] = []
    piece: list[int] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if piece and total + lengths[i] > budget:
            out.append(piece)
            piece, total = [], 0
        piece.append(i)
        total += lengths[i]
    if piece:
        out.append(piece)
    return out


def in_order(groups: Sequence[Sequence[int]], parts: Sequence[np.ndarray]) -> np.ndarray:
    """The rows of ``parts`` (part k holding the inputs ``groups[k]``) put back in input order."""
    joined = np.concatenate(parts)
    out = np.empty_like(joined)
    out[np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])] = joined
    return out


# run(payloads, wanted): wanted() turns False once every request of the round has left (its answers go to nobody).
RunRound = Callable[[Sequence[P], Callable[[], bool]], Awaitable[Sequence["R | BaseException"]]]


class Coalescer(Generic[P, R]):
    """Queue of requests for one model; ``run`` gets one round's payloads and returns one result (or exception) each.

    A round holds at least one request and adds more while it stays within ``max_cost`` (tokens, or characters where
    tokens are not known yet) and ``max_rows``; at most ``concurrency`` rounds are in flight."""

    def __init__(self, run: RunRound[P, R], *, max_rows: int, max_cost: int, concurrency: int = 1, name: str = ""):
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

    async def submit_request(
        self,
        payload: P,
        lengths: Sequence[int],
        subset: Callable[[list[int]], P],
        join: Callable[[list[list[int]], list[R]], R],
    ) -> R:
        """``submit`` for a request of inputs of these ``lengths``, whole if it fits a round, else in ``pieces``:
        ``subset(indices)`` is a piece's payload, and ``join(groups, results)`` the request's result from its pieces'."""
        groups = pieces(lengths, self.max_cost)
        if len(groups) <= 1:  # one piece, or none (no inputs)
            return await self.submit(payload, rows=len(lengths), cost=sum(lengths))
        parts = [(subset(g), len(g), sum(lengths[i] for i in g)) for g in groups]
        return join(groups, await self.submit_pieces(parts))

    async def submit_pieces(self, parts: Sequence[tuple[P, int, int]]) -> list[R]:
        """``submit`` for each (payload, rows, cost) of one request, at most ``concurrency`` in flight, each next one
        queued once one ends: behind whatever queued meanwhile. The first failure fails the request, and the pieces not
        yet answered are given up as ``submit`` gives up a request whose client left."""
        tasks: list[asyncio.Task[R]] = []
        try:
            for part in parts:
                running = [t for t in tasks if not t.done()]
                if len(running) >= self.concurrency:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    if t.done():
                        t.result()  # a piece failed: so does the request, now
                tasks.append(asyncio.create_task(self.submit(*part)))
            return [await t for t in tasks]
        finally:
            left = [t for t in tasks if not t.done()]
            for t in left:
                t.cancel()
            if left:  # each ends once its round has (``submit``): until then its work still counts as admitted
                await asyncio.wait(left)
            for t in tasks:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: the request has failed with the first

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
            # Here, not in the round's finally: a round cancelled (close) before its first step never runs that.
            task.add_done_callback(functools.partial(_cancel_unanswered, jobs))

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
            self._slots.release()


def _cancel_unanswered(jobs: Sequence[_Job], _round: asyncio.Task) -> None:
    """A round's requests it ended without answering (it was cancelled) end too, rather than wait forever."""
    for job in jobs:
        if not job.future.done():
            job.future.cancel()
