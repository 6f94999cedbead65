"""Tokenize, truncate, count and pad: the single implementation used by Triton's tokenizer model,
the embedded backend and export's parity check.

The tokenizer is called exactly as sentence-transformers calls it (``truncation="longest_first"``,
``max_length``), one sequence per input, so token counts are real and padding is ours to choose.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import spec


@dataclasses.dataclass
class Encoded:
    """Unpadded token sequences, one per input, in input order."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    # Per input: was it cut to the model's context? None: not asked (or nothing was cut).
    truncated: list[bool] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def cut(self) -> list[bool]:
        """``truncated`` with one flag per input; False where it was not asked for."""
        return self.truncated if self.truncated is not None else [False] * len(self.input_ids)


def _not_overflow_notice(record: logging.LogRecord) -> bool:
    # transformers warns on every pair it truncates that it does not return the cut tokens; we never
    # ask for them, and a reranker fed long documents would log it on every request.
    return not record.getMessage().startswith("Be aware, overflowing tokens are not returned")


class Tokenizer:
    def __init__(self, path: str | Path, max_length: int):
        from transformers import AutoTokenizer

        for name in ("transformers.tokenization_python", "transformers.tokenization_utils_base"):
            log = logging.getLogger(name)
            if _not_overflow_notice not in log.filters:
                log.addFilter(_not_overflow_notice)

        self.hf = AutoTokenizer.from_pretrained(str(path))
        # MeCab's tagger (fugashi) is not thread-safe: two threads in it at once corrupt its state and
        # return None. Tokenization holds the GIL anyway, so one at a time costs nothing.
        self._lock = threading.Lock()
        self.max_length = max_length
        self.returns_token_types = spec.TOKEN_TYPE_IDS in self.hf.model_input_names

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, detect_truncation: bool = False) -> Encoded:
        """``detect_truncation`` also tells which inputs were cut; it tokenizes those a second time, so
        it is asked for only by requests that refuse truncation."""
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        out = self._call(texts, pairs, self.max_length)
        types = out.get(spec.TOKEN_TYPE_IDS)
        encoded = Encoded(input_ids=list(out[spec.INPUT_IDS]), token_type_ids=list(types) if types is not None else None)
        if detect_truncation:
            encoded.truncated = self._truncated(texts, pairs, encoded.lengths)
        return encoded

    def _call(self, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int):
        with self._lock:
            return self.hf(list(texts), list(pairs) if pairs is not None else None,
                           truncation="longest_first", max_length=max_length, padding=False)

    def _truncated(self, texts: Sequence[str], pairs: Sequence[str] | None, lengths: list[int]) -> list[bool]:
        """Only an input that came out exactly max_length long can have been cut; tokenizing those
        again with room for one more token tells which were (a pair is cut to exactly max_length too)."""
        full = [i for i, n in enumerate(lengths) if n >= self.max_length]
        truncated = [False] * len(lengths)
        if full:
            again = self._call([texts[i] for i in full], [pairs[i] for i in full] if pairs is not None else None,
                               self.max_length + 1)
            for i, ids in zip(full, again[spec.INPUT_IDS]):
                truncated[i] = len(ids) > self.max_length
        return truncated


def truncate_ids(sequences: Sequence[Sequence[int]], max_length: int) -> Encoded:
    """Token-id input (the OpenAI API's list of ints): taken as the full sequence, cut to max_length."""
    return Encoded(input_ids=[list(s[:max_length]) for s in sequences], truncated=[len(s) > max_length for s in sequences])


def pad(encoded: Encoded, pad_token_id: int, inputs: Sequence[str], order: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Right-pad the sequences picked by ``order`` (default: all) into the encoder's input arrays.

    ``inputs`` names the tensors the encoder takes; token types that the tokenizer did not produce
    are zeros, which is what the Hugging Face model does when it gets none.
    """
    idx = list(range(len(encoded.input_ids))) if order is None else list(order)
    width = max((len(encoded.input_ids[i]) for i in idx), default=0)
    ids = np.full((len(idx), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64)
    for row, i in enumerate(idx):
        seq = encoded.input_ids[i]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        if encoded.token_type_ids is not None:
            types[row, : len(seq)] = encoded.token_type_ids[i]
    arrays = {spec.INPUT_IDS: ids, spec.ATTENTION_MASK: mask, spec.TOKEN_TYPE_IDS: types}
    return {name: arrays[name] for name in inputs}


def length_batches(lengths: Sequence[int], max_batch: int, max_tokens: int, max_padding: float = 0.15,
                   row_slack: int = 4) -> list[list[int]]:
    """Group input indices into batches of similar length, so padding stays small.

    Sorted by length, a batch holds at most ``max_batch`` inputs and ``max_tokens`` padded tokens
    (rows x longest row), and wastes on padding at most ``max_padding`` of what it computes, or
    ``row_slack`` tokens a row where that is more (short inputs gain more from sharing a run than
    they lose to a few pad tokens). A single over-long input still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        width = max(lengths[i], 1)  # sorted ascending: the newest input is the widest
        rows = len(current) + 1
        padded = rows * width
        waste = padded - (real + lengths[i])
        if current and (rows > max_batch or padded > max_tokens or waste > max(max_padding * padded, row_slack * rows)):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def unpad(arrays: dict[str, np.ndarray]) -> Encoded:
    """The inverse of ``pad``: sequences back from padded arrays and their attention mask."""
    lengths = arrays[spec.ATTENTION_MASK].sum(axis=1).tolist()
    ids = [row[:n].tolist() for row, n in zip(arrays[spec.INPUT_IDS], lengths)]
    types = arrays.get(spec.TOKEN_TYPE_IDS)
    return Encoded(input_ids=ids, token_type_ids=[row[:n].tolist() for row, n in zip(types, lengths)] if types is not None else None)
