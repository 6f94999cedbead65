"""The backend contract: what the service asks of Triton or of the embedded runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fos_runtime.spec import ModelSpec
from fos_runtime.tokenization import Encoded


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


class Backend(Protocol):
    async def start(self) -> None:
        """Load or discover the models; must not raise when the inference server is down."""

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...

    def specs(self) -> list[ModelSpec]:
        """The models served now."""

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
