"""The backend contract: what the service asks of Triton or of the embedded runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fos_runtime.batching import Stats
from fos_runtime.engines import Choice
from fos_runtime.spec import ModelSpec
from fos_runtime.tokenization import Encoded

from .coalescing import RoundStats


@dataclasses.dataclass(frozen=True)
class Engine:
    """How an in-process encoder runs: the engine and precision, each run's threads, and the runs computed at once."""

    choice: Choice
    threads: int
    streams: int


@dataclasses.dataclass
class Output:
    """What a backend returns for one request, row i for input i."""

    values: np.ndarray  # embed: (n, dimension) vectors; rerank: (n,) scores
    tokens: list[int]  # tokens each input was computed with (after truncation)
    truncated: list[bool]  # whether each input was cut to the model's context

    @classmethod
    def of(cls, values: np.ndarray, encoded: Encoded) -> Output:
        """For inputs tokenized in this process."""
        return cls(values, encoded.lengths, encoded.cut)


@dataclasses.dataclass
class BatchingStats:
    """How one model's work was grouped, for /metrics."""

    rounds: int  # rounds run (one encoder pass on the embedded backend, a set of Triton calls on Triton's)
    requests: int  # requests those rounds answered
    rows: int  # inputs those rounds carried
    queued: int  # requests waiting for a round now
    encoder_runs: int | None = None  # padded batches the encoder ran (known where it runs in process)
    padding_efficiency: float | None = None  # real tokens / computed tokens, likewise
    encoder_seconds: float | None = None  # time the encoder computed (rounds at once counted once), likewise

    @classmethod
    def of(cls, rounds: RoundStats, queued: int, encoder: Stats | None = None) -> BatchingStats:
        return cls(
            rounds=rounds.rounds,
            requests=rounds.requests,
            rows=rounds.rows,
            queued=queued,
            encoder_runs=encoder.runs if encoder else None,
            padding_efficiency=encoder.padding_efficiency if encoder else None,
            encoder_seconds=encoder.seconds if encoder else None,
        )


class Backend(Protocol):
    async def start(self) -> None:
        """Load or discover the models; must not raise when the inference server is down."""

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...

    def specs(self) -> list[ModelSpec]:
        """The models served now."""

    def stats(self) -> dict[str, BatchingStats]:
        """Per served model: how its requests were grouped."""

    def engines(self) -> dict[str, Engine]:
        """Per served model, the engine running its encoder, where this process knows it (in process, not in Triton)."""

    async def embed(
        self, s: ModelSpec, texts: Sequence[str] | None = None, encoded: Encoded | None = None, detect_truncation: bool = False
    ) -> Output:
        """Exactly one of ``texts`` (tokenized by the backend) and ``encoded`` (token ids) is given.
        ``Output.truncated`` is reliable only with ``detect_truncation`` (it costs tokenization time)."""

    async def rerank(
        self,
        s: ModelSpec,
        query: str,
        documents: Sequence[str],
        detect_truncation: bool = False,
        max_doc_tokens: int | None = None,
    ) -> Output:
        """Scores for the (query, document) pairs, in document order; ``max_doc_tokens`` cuts each
        document to that many tokens before the pair is fitted to the model's context."""
