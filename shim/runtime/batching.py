"""Run many inputs, from one or several requests, through the encoder in length-grouped batches.

Shared by the embedded backend (requests coalesced in process) and Triton's Python-backend encoder
(requests of different lengths that Triton's dynamic batcher hands over together, ragged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from . import spec
from .encoder import Encoder
from .tokenization import Encoded, length_batches, pad


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 32  # rows per encoder run
    max_batch_tokens: int = 8192  # padded tokens per encoder run

    @classmethod
    def for_encoder(cls, encoder: Encoder) -> BatchLimits:
        # A CPU is saturated by 32 rows; a GPU is not: on an H200, ruri-large fp16 ran 1.33x faster in
        # runs of up to 256 rows / 65536 tokens than of 32 / 8192 (bench/gpu.py, docs/benchmarks.md).
        return cls(max_batch=256, max_batch_tokens=65536) if encoder.on_gpu else cls()


@dataclasses.dataclass
class Stats:
    runs: int = 0
    rows: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / tokens computed (padding included)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


def merge(encodeds: Sequence[Encoded]) -> Encoded:
    with_types = any(e.token_type_ids is not None for e in encodeds)
    merged = Encoded(input_ids=[], token_type_ids=[] if with_types else None)
    for e in encodeds:
        merged.input_ids.extend(e.input_ids)
        if with_types:
            merged.token_type_ids.extend(e.token_type_ids or [[0] * len(ids) for ids in e.input_ids])
    return merged


def run(
    encoder: Encoder,
    encodeds: Sequence[Encoded],
    pad_token_id: int,
    inputs: Sequence[str],
    limits: BatchLimits,
    stats: Stats | None = None,
) -> list[np.ndarray]:
    """One output array per element of ``encodeds``, rows in their order."""
    merged = merge(encodeds)
    lengths = merged.lengths
    result: np.ndarray | None = None
    for batch in length_batches(lengths, limits.max_batch, limits.max_batch_tokens):
        feeds = pad(merged, pad_token_id, inputs, order=batch)
        out = encoder.run(feeds)
        if result is None:
            result = np.empty((len(lengths), out.shape[1]), dtype=np.float32)
        result[batch] = out
        if stats is not None:
            stats.runs += 1
            stats.rows += len(batch)
            stats.real_tokens += sum(lengths[i] for i in batch)
            stats.computed_tokens += feeds[spec.INPUT_IDS].size
    if result is None:
        return [np.zeros((0, 0), dtype=np.float32) for _ in encodeds]
    bounds = np.cumsum([0] + [len(e.input_ids) for e in encodeds])
    return [result[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
