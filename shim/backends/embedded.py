"""The in-process backend: the repository's tokenizer files and ONNX encoder, run with onnxruntime.

Concurrent requests are coalesced: while the encoder runs one batch, new requests queue up, and
the next round takes them all (up to a token budget), regroups their inputs by length and runs
them. There is no waiting for a batch to fill, so a lone request is never delayed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fos_runtime import batching
from fos_runtime import spec as specs
from fos_runtime.batching import BatchPlan, Stats
from fos_runtime.encoder import Encoder
from fos_runtime.spec import ModelSpec
from fos_runtime.tokenization import Encoded, Tokenizer

from ..errors import BackendUnavailable
from ..repository import read_specs
from .base import Output

log = logging.getLogger("fos.embedded")


@dataclasses.dataclass
class _Job:
    encoded: Encoded
    future: asyncio.Future


class _Model:
    def __init__(self, s: ModelSpec, repository: Path, executor, plan: BatchPlan | None, threads: int | None):
        self.spec = s
        self.tokenizer = Tokenizer(repository / specs.tokenizer_model(s.name) / "1" / "tokenizer", s.max_length)
        self.encoder = Encoder(repository / specs.encoder_model(s.name) / "1" / "model.onnx", threads=threads)
        self.executor = executor
        self.plan = plan or batching.plan_for(self.encoder.device)
        self.stats = Stats()
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.create_task(self._serve(), name=f"batcher:{self.spec.served_name}")

    async def submit(self, encoded: Encoded) -> np.ndarray:
        if not encoded.input_ids:
            width = self.spec.dimension if self.spec.task == "embed" else 1
            return np.zeros((0, width), dtype=np.float32)
        job = _Job(encoded, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            budget = sum(jobs[0].encoded.lengths)
            while not self.queue.empty() and budget < self.plan.round_tokens:
                job = self.queue.get_nowait()
                jobs.append(job)
                budget += sum(job.encoded.lengths)
            jobs = [j for j in jobs if not j.future.done()]  # clients that went away
            if not jobs:
                continue
            try:
                outputs = await loop.run_in_executor(self.executor, self._run, [j.encoded for j in jobs])
            except Exception as exc:  # the encoder failed: fail these requests, keep serving
                log.exception("encoder run failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            for j, out in zip(jobs, outputs, strict=True):
                if not j.future.done():
                    j.future.set_result(out)

    def _run(self, encodeds: list[Encoded]) -> list[np.ndarray]:
        return batching.run(self.encoder, encodeds, self.spec.pad_token_id, self.spec.encoder_inputs, self.plan, self.stats)


class EmbeddedBackend:
    def __init__(self, repository: Path, plan: BatchPlan | None = None, threads: int | None = None):
        self.repository = Path(repository)
        self.plan = plan  # None: per model, from its encoder's device
        self.threads = threads
        self.models: dict[str, _Model] = {}
        # One inference thread: onnxruntime already spreads one run over every core, and two runs
        # at once would only fight over them.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fos-infer")
        self._ready = False

    async def start(self) -> None:
        found = read_specs(self.repository)
        if not found:
            log.warning("no exported models in %s", self.repository)
        for s in found:
            log.info("loading %s (%s, %s) from %s", s.served_name, s.task, s.precision, self.repository)
            model = await asyncio.to_thread(_Model, s, self.repository, self.executor, self.plan, self.threads)
            model.start()
            self.models[s.served_name] = model
        self._ready = True

    async def close(self) -> None:
        for model in self.models.values():
            if model.worker is not None:
                model.worker.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def ready(self) -> bool:
        return self._ready and bool(self.models)

    def specs(self) -> list[ModelSpec]:
        return [m.spec for m in self.models.values()]

    def stats(self) -> dict[str, tuple[Stats, int]]:
        """Per model: batching counters and the number of requests waiting."""
        return {name: (m.stats, m.queue.qsize()) for name, m in self.models.items()}

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
            encoded = await asyncio.to_thread(model.tokenizer.encode, list(texts or []), None, detect_truncation)
        return Output.of(await model.submit(encoded), encoded)

    async def rerank(
        self,
        s: ModelSpec,
        query: str,
        documents: Sequence[str],
        detect_truncation: bool = False,
        max_doc_tokens: int | None = None,
    ) -> Output:
        model = self._model(s)
        encoded = await asyncio.to_thread(
            model.tokenizer.encode, [query] * len(documents), list(documents), detect_truncation, max_doc_tokens
        )
        return Output.of((await model.submit(encoded)).reshape(-1), encoded)
