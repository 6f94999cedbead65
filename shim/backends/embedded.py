"""The in-process backend: the repository's tokenizer files and exported encoder, run with onnxruntime or OpenVINO
(``fos_runtime.engines``: ``auto`` picks by the CPU's features and what export's parity check passed).

Each request is tokenized in bounded chunks (a request whose client left stops at the next chunk), then joins its
model's round queue (``coalescing``): the next round takes every request that waited, up to a token budget, and runs
their inputs in length-grouped batches (``fos_runtime.batching``). One model's rounds compute at a time (``Turns``):
one round, or two where its encoder has streams.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from fos_runtime import batching, cores
from fos_runtime import spec as specs
from fos_runtime.batching import BatchPlan, Stats
from fos_runtime.encoder import Encoder
from fos_runtime.spec import ModelSpec
from fos_runtime.tokenization import Encoded, Tokenizer

from ..errors import BackendUnavailable
from ..repository import read_specs
from . import coalescing
from .base import BatchingStats, Engine, Output
from .coalescing import Coalescer

log = logging.getLogger("fos.embedded")

# A tokenization chunk: about 15 ms of MeCab + WordPiece on one core, the longest a departed client's work runs on.
CHUNK_CHARS = 2048
CHUNK_INPUTS = 32

T = TypeVar("T")


async def in_thread(pool: concurrent.futures.Executor, fn: Callable[..., T], *args) -> T:
    """``fn`` on one of ``pool``'s threads. If the caller is cancelled, work that has not started is dropped; work
    that has cannot be interrupted, so the cancellation is passed on only once it ends: until then it still
    counts as admitted."""
    work = pool.submit(fn, *args)
    waiting = asyncio.wrap_future(work)
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        if not work.cancel():
            await asyncio.wait([waiting])
        raise


def chunks(texts: Sequence[str], pairs: Sequence[str] | None) -> list[tuple[int, int]]:
    """Consecutive index ranges of at most CHUNK_INPUTS inputs and, past the first input, CHUNK_CHARS characters."""
    bounds: list[tuple[int, int]] = []
    start = chars = 0
    for i, text in enumerate(texts):
        size = len(text) + (len(pairs[i]) if pairs is not None else 0)
        if i > start and (i - start >= CHUNK_INPUTS or chars + size > CHUNK_CHARS):
            bounds.append((start, i))
            start, chars = i, 0
        chars += size
    if start < len(texts):
        bounds.append((start, len(texts)))
    return bounds


class Turns:
    """The CPU goes to one model's rounds at a time, in the order they asked for it. A model whose encoder takes two
    rounds at once (``Encoder.rounds_at_once``) may run both, but none past another model's round that waits: two
    models' rounds at once would each spread over every core and fight over them."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._waiting: collections.deque[list[object]] = collections.deque()  # a ticket a round: [its model]
        self._model: object | None = None  # whose rounds run now
        self._running = 0

    @contextlib.asynccontextmanager
    async def turn(self, model: object) -> AsyncIterator[None]:
        ticket = [model]
        async with self._changed:
            self._waiting.append(ticket)
            try:
                await self._changed.wait_for(lambda: self._may_start(ticket))
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next of its model may start too; or, cancelled, it no longer blocks
            self._model, self._running = model, self._running + 1
        try:
            yield
        finally:
            async with self._changed:
                self._running -= 1
                if not self._running:
                    self._model = None
                self._changed.notify_all()

    def _may_start(self, ticket: list[object]) -> bool:
        if self._model not in (None, ticket[0]):
            return False
        for waiting in self._waiting:  # only rounds of its own model ahead of it
            if waiting is ticket:
                return True
            if waiting[0] is not ticket[0]:
                return False
        return True


class _Model:
    def __init__(
        self,
        s: ModelSpec,
        repository: Path,
        executor,
        turns: Turns,
        plan: BatchPlan | None,
        threads: int | None,
        engine: str,
        device: str,
        streams: int | None = None,
    ):
        self.spec = s
        # A thread of its own: the tokenizer takes one call at a time (fugashi is not thread-safe), and a shared pool
        # let one model's queued chunks hold every thread, one of them waiting for its lock, while another model's
        # tokenizer sat free (review).
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fos-tokenize")
        self.tokenizer = Tokenizer(specs.tokenizer_files(repository, s.name), s.max_length)
        model = specs.encoder_file(repository, s.name)
        self.encoder = Encoder(model, threads=threads, device=device, engine=engine, precision=s.precision, streams=streams)
        e = self.encoder
        shared = (
            f", {e.streams} streams of {e.run_threads} threads{' (auto)' if streams is None else ''}"
            + (f", a round's lone run over all {e.lone_run_threads}" if e.lone_run_threads else "")
            if e.streams > 1
            else ""
        )
        log.info("%s: %s on the %s%s (%s)", s.served_name, e.engine, e.device, shared, e.reason)
        self.executor = executor
        self.turns = turns
        self.plan = plan or batching.plan_for(self.encoder.device, self.encoder.run_threads)
        started = time.perf_counter()
        shapes = batching.warm_up(self.encoder, self.plan, s.pad_token_id, s.encoder_inputs, s.max_length)
        if shapes:
            log.info("%s: warmed up %d shapes in %.1fs", s.served_name, shapes, time.perf_counter() - started)
        self.stats = Stats()
        self._computing = 0  # rounds inside the encoder now, and since when one has been
        self._busy_since = 0.0
        # One round at a time: a run already spreads over every core. With streams two, so that none waits at a round's
        # end: a round that waits for the one in flight gathers more requests, one computed beside it fewer.
        self.rounds: Coalescer[Encoded, np.ndarray] = Coalescer(
            self._run, max_rows=1 << 30, max_cost=self.plan.round_tokens, concurrency=e.rounds_at_once, name=s.served_name
        )

    async def tokenize(
        self, texts: Sequence[str], pairs: Sequence[str] | None, detect_truncation: bool, max_pair_tokens: int | None = None
    ) -> Encoded:
        parts = []
        for a, b in chunks(texts, pairs):
            chunk_pairs = pairs[a:b] if pairs is not None else None
            encode = self.tokenizer.encode
            parts.append(await in_thread(self.tokenize_pool, encode, texts[a:b], chunk_pairs, detect_truncation, max_pair_tokens))
        return batching.merge(parts)

    async def encode(self, encoded: Encoded) -> np.ndarray:
        if not encoded.input_ids:
            width = self.spec.dimension if self.spec.task == "embed" else 1
            return np.zeros((0, width), dtype=np.float32)
        return await self.rounds.submit_request(encoded, encoded.lengths, encoded.subset, coalescing.in_order)

    async def _run(self, encodeds: Sequence[Encoded], wanted: Callable[[], bool]) -> Sequence[np.ndarray | BaseException]:
        loop = asyncio.get_running_loop()
        stats = Stats()
        try:
            async with self.turns.turn(self):
                if not self._computing:
                    self._busy_since = time.perf_counter()
                self._computing += 1
                try:
                    try:
                        return await loop.run_in_executor(self.executor, self._run_sync, list(encodeds), wanted, stats)
                    except batching.Abandoned:
                        raise
                    except Exception as exc:
                        if len(encodeds) == 1:
                            raise
                        # One request's inputs can fail a run that others share (an engine's error on one shape, memory
                        # for one long input): each request again alone, so that only the one at fault fails.
                        log.warning(
                            "%s: a round of %d requests failed (%s); running each alone",
                            self.spec.served_name,
                            len(encodeds),
                            exc,
                        )
                        return await self._each_alone(encodeds, wanted, stats)
                finally:
                    self._computing -= 1
                    # The encoder's time is while any of its rounds computes: two at once would count their overlap twice.
                    stats.seconds = time.perf_counter() - self._busy_since if not self._computing else 0.0
        finally:
            self.stats.add(stats)  # here, on the event loop: two rounds' threads never add at once; failed runs count too

    async def _each_alone(
        self, encodeds: Sequence[Encoded], wanted: Callable[[], bool], stats: Stats
    ) -> list[np.ndarray | BaseException]:
        loop = asyncio.get_running_loop()
        results: list[np.ndarray | BaseException] = []
        for encoded in encodeds:
            try:
                results.extend(await loop.run_in_executor(self.executor, self._run_sync, [encoded], wanted, stats))
            except batching.Abandoned:
                raise
            except Exception as exc:
                results.append(exc)
        return results

    def _run_sync(self, encodeds: list[Encoded], wanted: Callable[[], bool], stats: Stats) -> list[np.ndarray]:
        # Every model takes its turn: a round whose clients all left stops at its next run, so that the requests behind
        # it (another model's too) do not wait for answers nobody reads.
        s = self.spec
        return batching.run(self.encoder, encodeds, s.pad_token_id, s.encoder_inputs, self.plan, stats, s.max_length, wanted)


class EmbeddedBackend:
    def __init__(
        self,
        repository: Path,
        plan: BatchPlan | None = None,
        threads: int | None = None,
        engine: str | None = None,
        device: str = "auto",
        streams: int | None = None,
    ):
        self.repository = Path(repository)
        self.plan = plan  # None: per model, from its encoder's device
        self.threads = threads
        self.engine = engine  # one of fos_runtime.engines.CHOICES for every model; None: each model's own (its spec)
        # auto: onnxruntime's GPU where it has one; cpu keeps the encoders off a GPU the machine has (OpenVINO, or
        # a GPU left to other work).
        self.device = device
        # CPU encoders: batches of a round computed at once, each on its share of the threads (CPUs with many cores);
        # None: each encoder's own (``encoder.auto_streams``).
        self.streams = streams
        self.models: dict[str, _Model] = {}
        # Rounds computing: one model's at a time (``Turns``), two where its encoder takes two (one with streams).
        self.turns = Turns()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fos-infer")
        self._ready = False

    async def start(self) -> None:
        quota = cores.cpu_quota()
        if quota is not None and self.threads is None:
            log.info("CPU quota of %.2f cores (cgroup): the engines' threads are %d", quota, cores.available_cores())
        found = read_specs(self.repository)
        if not found:
            log.warning("no exported models in %s", self.repository)
        for s in found:
            log.info("loading %s (%s, %s) from %s", s.served_name, s.task, s.precision, self.repository)
            model = await asyncio.to_thread(
                _Model,
                s,
                self.repository,
                self.executor,
                self.turns,
                self.plan,
                self.threads,
                self.engine or s.engine,
                self.device,
                self.streams,
            )
            model.rounds.start()
            self.models[s.served_name] = model
        self._ready = True

    async def close(self) -> None:
        for model in self.models.values():
            await model.rounds.close()
        # A round's thread stops at its next run (its requests ended with close()): no run outlives the backend.
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
        for model in self.models.values():
            model.tokenize_pool.shutdown(wait=False, cancel_futures=True)
            model.encoder.close()

    async def ready(self) -> bool:
        return self._ready and bool(self.models)

    def specs(self) -> list[ModelSpec]:
        return [m.spec for m in self.models.values()]

    def stats(self) -> dict[str, BatchingStats]:
        return {name: BatchingStats.of(m.rounds.stats, m.rounds.queued, encoder=m.stats) for name, m in self.models.items()}

    def engines(self) -> dict[str, Engine]:
        return {name: Engine(m.encoder.engine, m.encoder.run_threads, m.encoder.streams) for name, m in self.models.items()}

    def _model(self, s: ModelSpec) -> _Model:
        model = self.models.get(s.served_name)
        if model is None:
            raise BackendUnavailable(f"model {s.served_name} is not loaded")
        return model

    async def embed(
        self, s: ModelSpec, texts: Sequence[str] | None = None, encoded: Encoded | None = None, detect_truncation: bool = False
    ) -> Output:
        model = self._model(s)
        if encoded is None:
            encoded = await model.tokenize(list(texts or []), None, detect_truncation)
        return Output.of(await model.encode(encoded), encoded)

    async def rerank(
        self,
        s: ModelSpec,
        query: str,
        documents: Sequence[str],
        detect_truncation: bool = False,
        max_doc_tokens: int | None = None,
    ) -> Output:
        model = self._model(s)
        encoded = await model.tokenize([query] * len(documents), list(documents), detect_truncation, max_doc_tokens)
        return Output.of((await model.encode(encoded)).reshape(-1), encoded)
