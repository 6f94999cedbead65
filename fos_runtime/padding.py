"""Right-padding of token sequences into the encoder's input arrays, and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import spec
from .tokenization import Encoded


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


def unpad(arrays: dict[str, np.ndarray]) -> Encoded:
    """The inverse of ``pad``: sequences back from padded arrays and their attention mask."""
    lengths = arrays[spec.ATTENTION_MASK].sum(axis=1).tolist()
    ids = [row[:n].tolist() for row, n in zip(arrays[spec.INPUT_IDS], lengths, strict=True)]
    types = arrays.get(spec.TOKEN_TYPE_IDS)
    return Encoded(
        input_ids=ids,
        token_type_ids=[row[:n].tolist() for row, n in zip(types, lengths, strict=True)] if types is not None else None,
    )
