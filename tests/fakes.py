"""A backend without a model, for tests of the HTTP layer alone; an encoder without one, for the batching code."""

from __future__ import annotations

import asyncio

import numpy as np

from fos_runtime.spec import ENCODER_INPUTS_ALL, ModelSpec
from shim.backends.base import Output

EMBED_SPEC = ModelSpec(
    served_name="fake/embed",
    task="embed",
    source="fake",
    max_length=16,
    encoder_inputs=("input_ids", "attention_mask"),
    pad_token_id=0,
    vocab_size=100,
    dimension=4,
)
RERANK_SPEC = ModelSpec(
    served_name="fake/rerank",
    task="rerank",
    source="fake",
    max_length=16,
    encoder_inputs=("input_ids", "attention_mask"),
    pad_token_id=0,
    vocab_size=100,
)


class FakeBackend:
    def __init__(self, delay: float = 0.0, ready: bool = True):
        self.delay = delay
        self._ready = ready
        self.calls = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return self._ready

    def specs(self) -> list[ModelSpec]:
        return [EMBED_SPEC, RERANK_SPEC] if self._ready else []

    def engines(self) -> dict:
        return {}

    async def embed(self, s, texts=None, encoded=None, detect_truncation=False):
        self.calls += 1
        await asyncio.sleep(self.delay)
        n = len(texts) if texts is not None else len(encoded.input_ids)
        lengths = [len(t) for t in texts] if texts is not None else encoded.lengths
        vectors = np.array([[float(x), 1.0, 0.0, 0.0] for x in lengths], dtype=np.float32).reshape(n, 4)
        return Output(vectors, lengths, [False] * n)

    async def rerank(self, s, query, documents, detect_truncation=False, max_doc_tokens=None):
        self.calls += 1
        await asyncio.sleep(self.delay)
        scores = np.array([1.0 / (1 + len(d)) for d in documents], dtype=np.float32)
        return Output(scores, [len(query) + len(d) for d in documents], [False] * len(documents))


class SlowBackend(FakeBackend):
    """Records how its calls ended, to see cancellation reach the backend."""

    def __init__(self, delay: float):
        super().__init__(delay=delay)
        self.finished = 0
        self.cancelled = 0

    async def embed(self, s, texts=None, encoded=None, detect_truncation=False):
        try:
            result = await super().embed(s, texts, encoded, detect_truncation)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return result


class EchoEncoder:
    """Returns each row's token count and first token, to see which rows came back from which run."""

    input_names = ENCODER_INPUTS_ALL
    engine = "echo"

    def __init__(self, streams: int = 1):
        self.streams = streams
        self.rounds: list[int] = []  # batches per run_many call

    def run(self, feeds):
        return np.stack([feeds["attention_mask"].sum(axis=1), feeds["input_ids"][:, 0]], axis=1).astype(np.float32)

    def run_many(self, feeds):
        self.rounds.append(len(feeds))
        return [self.run(f) for f in feeds]
