"""Right-padding of token sequences into the encoder's input arrays, and back.

On a GPU, padding also rounds shapes up to a few buckets: onnxruntime's CUDA provider spends about 47 ms the
first time it meets an input shape and 2.5 ms after that (ruri-large fp16 on an H100, 20 to 2,000 tokens a run),
so a server that meets a new (rows, length) pair at every run would run twenty times slower than its encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import spec
from .tokenization import Encoded

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def bucket_rows(n: int) -> int:
    """The smallest row bucket that holds ``n`` rows (past 256, a multiple of 64)."""
    return next((b for b in ROW_BUCKETS if b >= n), -(-n // 64) * 64)


def bucket_length(n: int, limit: int) -> int:
    """``n`` tokens rounded up to a length bucket (steps of 16 to 64, 32 to 512, 128 beyond), never past
    ``limit``, the model's context: positions beyond it have no embedding."""
    step = 16 if n <= 64 else 32 if n <= 512 else 128
    return max(n, min(-(-n // step) * step, limit))


def pad(
    encoded: Encoded,
    pad_token_id: int,
    inputs: Sequence[str],
    order: Sequence[int] | None = None,
    length_limit: int | None = None,
    bucket_rows_too: bool = False,
) -> dict[str, np.ndarray]:
    """Right-pad the sequences picked by ``order`` (default: all) into the encoder's input arrays.

    ``inputs`` names the tensors the encoder takes; token types that the tokenizer did not produce
    are zeros, which is what the Hugging Face model does when it gets none. With ``length_limit`` the
    width is rounded up to a length bucket; with ``bucket_rows_too`` the rows too, the extra rows being
    copies of the first (a real sequence: an all-padding row would pool over no token), whose outputs
    the caller drops.
    """
    idx = list(range(len(encoded.input_ids))) if order is None else list(order)
    width = max((len(encoded.input_ids[i]) for i in idx), default=0)
    if length_limit is not None and idx:
        width = bucket_length(width, length_limit)
    if bucket_rows_too and idx:
        idx += [idx[0]] * (bucket_rows(len(idx)) - len(idx))
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
