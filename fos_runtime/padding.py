"""Right-padding of token sequences into the encoder's input arrays, and back.

On a GPU, padding also rounds shapes up to a few buckets: onnxruntime's CUDA provider spends about 47 ms the
first time it meets an input shape and 2.5 ms after that (ruri-large fp16 on an H100, 20 to 2,000 tokens a run),
so a server that meets a new (rows, length) pair at every run would run twenty times slower than its encoder.
"""

from __future__ import annotations

import itertools
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
    idx = _run_rows(range(len(encoded.input_ids)) if order is None else order, bucket_rows_too)
    lengths = np.fromiter((len(encoded.input_ids[i]) for i in idx), dtype=np.int64, count=len(idx))
    width = _run_width(lengths, length_limit)
    # Every row's tokens in one flat array, scattered through the mask (row by row, left to right): no Python loop
    # over rows, which cost ~1.6 ms of each 214-row execution of Triton's encoder.
    real = np.arange(width) < lengths[:, None]
    total = int(lengths.sum())

    def scattered(rows: Sequence[Sequence[int]], fill: int) -> np.ndarray:
        out = np.full((len(idx), width), fill, dtype=np.int64)
        out[real] = np.fromiter(itertools.chain.from_iterable(rows[i] for i in idx), dtype=np.int64, count=total)
        return out

    arrays: dict[str, np.ndarray] = {}
    for name in inputs:
        if name == spec.INPUT_IDS:
            arrays[name] = scattered(encoded.input_ids, pad_token_id)
        elif name == spec.ATTENTION_MASK:
            arrays[name] = real.astype(np.int64)
        elif name == spec.TOKEN_TYPE_IDS:
            types = encoded.token_type_ids
            if types is not None and any(len(types[i]) != n for i, n in zip(idx, lengths.tolist(), strict=True)):
                raise ValueError("token types and token ids differ in length")  # the flat scatter would misplace them
            arrays[name] = scattered(types, 0) if types is not None else np.zeros((len(idx), width), dtype=np.int64)
        else:
            raise KeyError(name)
    return arrays


def check_padded(
    arrays: dict[str, np.ndarray | None], inputs: Sequence[str], max_length: int, vocab_size: int
) -> dict[str, np.ndarray]:
    """One request's padded arrays as the encoder takes them, or ValueError saying what is wrong with them. A request
    shares its execution with others: whatever would make the engine fail (a token id outside the vocabulary, a row
    longer than the model's context) or make the rows' lengths wrong (a mask that is not 1s then 0s) is refused
    here, so that it fails alone."""
    shapes: dict[str, tuple[int, ...]] = {name: a.shape for name in inputs if (a := arrays.get(name)) is not None}
    if len(shapes) != len(inputs) or spec.ATTENTION_MASK not in inputs:
        raise ValueError(f"wants {', '.join(inputs)}, got {', '.join(shapes)}")
    if len(set(shapes.values())) != 1 or len(shapes[spec.ATTENTION_MASK]) != 2:
        raise ValueError(f"the inputs must be 2-D arrays of one shape, not {shapes}")
    out = {name: np.asarray(arrays[name], dtype=np.int64) for name in inputs}
    mask = out[spec.ATTENTION_MASK]
    lengths = mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(mask.shape[1]) < lengths[:, None]) or (lengths < 1).any():
        raise ValueError("each row's attention_mask must be 1s (at least one), then 0s")
    if (lengths > max_length).any():
        raise ValueError(f"a row is longer than the model's {max_length} tokens")
    ids = out.get(spec.INPUT_IDS)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    types = out.get(spec.TOKEN_TYPE_IDS)
    if types is not None and types.size and (types.min() < 0 or types.max() > 1):  # BERT's two segments
        raise ValueError("token_type_ids must be 0 or 1")
    return out


def merge_padded(
    parts: Sequence[dict[str, np.ndarray]], pad_token_id: int, length_limit: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Requests that arrive right-padded, each to its own longest row (Triton's encoder), as one set of arrays: their
    rows stacked and padded to the longest row (its length bucket with ``length_limit``, so that ``take`` never needs
    more columns); and each row's length. Rows are never turned into Python lists and back. Tokens past a row's
    attention mask are kept as sent: nothing attends to them, and pooling leaves them out."""
    names = list(parts[0]) if parts else [spec.INPUT_IDS, spec.ATTENTION_MASK]
    lengths = np.concatenate([p[spec.ATTENTION_MASK].sum(axis=1) for p in parts] or [np.zeros(0)]).astype(np.int64)
    width = _run_width(lengths, length_limit)
    merged = {}
    for name in names:
        out = np.full((len(lengths), width), pad_token_id if name == spec.INPUT_IDS else 0, dtype=np.int64)
        start = 0
        for p in parts:
            block = p[name][:, :width]
            out[start : start + len(block), : block.shape[1]] = block
            start += len(block)
        merged[name] = out
    return merged, lengths


def take(
    arrays: dict[str, np.ndarray],
    lengths: np.ndarray,
    order: Sequence[int],
    length_limit: int | None = None,
    bucket_rows_too: bool = False,
) -> dict[str, np.ndarray]:
    """Rows ``order`` of ``merge_padded``'s arrays, cut to the longest of them: what ``pad`` makes of the same rows."""
    idx = _run_rows(order, bucket_rows_too)
    width = _run_width(lengths[idx], length_limit)
    return {name: a[idx, :width] for name, a in arrays.items()}


def _run_rows(order: Sequence[int], bucket_rows_too: bool) -> list[int]:
    """The rows a run computes: ``order``, with copies of its first row up to a row bucket if asked."""
    idx = list(order)
    if bucket_rows_too and idx:
        idx += [idx[0]] * (bucket_rows(len(idx)) - len(idx))
    return idx


def _run_width(lengths: np.ndarray, length_limit: int | None) -> int:
    """A run's width: its longest row, rounded up to a length bucket with ``length_limit``."""
    width = int(lengths.max()) if len(lengths) else 0
    if length_limit is not None and len(lengths):
        width = bucket_length(width, length_limit)
    return width
