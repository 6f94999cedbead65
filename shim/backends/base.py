"""The backend contract: what the service asks of Triton or of the embedded runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..runtime.spec import ModelSpec
from ..runtime.tokenization import Encoded


class Backend(Protocol):
    async def start(self) -> None:
        """Load or discover the models; must not raise when the inference server is down."""

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...

    def specs(self) -> list[ModelSpec]:
        """The models served now."""

    async def embed(
        self, s: ModelSpec, texts: Sequence[str] | None = None, encoded: Encoded | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Vectors (n, dimension) in input order and the token count of each input.

        Exactly one of ``texts`` (tokenized by the backend) and ``encoded`` (token ids) is given.
        """

    async def rerank(self, s: ModelSpec, query: str, documents: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Scores (n,) for the (query, document) pairs in document order, and their token counts."""
