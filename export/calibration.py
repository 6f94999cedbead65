"""The inputs OpenVINO's int8 takes its activation ranges from (NNCF's static quantization, ``convert.to_openvino_int8``).

Built-in: the parity check's Japanese sentences (short, long, mixed scripts, one past the model's context) with each of
the model's prompts; a cross-encoder's are paired with the parity queries. ``fos export --calibration FILE`` adds the
user's own text, one input a line (a cross-encoder's lines are documents, each paired with every one of those queries): ranges
taken from text like what will be served clip less of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fos_runtime import padding, spec, tokenization

from .parity import QUERIES, SENTENCES

BATCH = 8  # inputs a calibration batch, padded to its longest
MAX_BATCHES = 64  # NNCF takes about half a minute a batch for ruri-large on 2 cores; more text is sampled evenly


def read(path) -> list[str]:
    """A calibration file's inputs: its non-empty lines."""
    with open(path, encoding="utf-8-sig") as f:  # a BOM is not text
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"--calibration {path}: no text in it")
    return texts


def batches(s: spec.ModelSpec, tokenizer: tokenization.Tokenizer, extra: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:
    """Padded encoder inputs, as serving tokenizes and pads them, in batches of ``BATCH``."""
    texts = [*SENTENCES, *extra]
    if s.task == "embed":
        names = [None, *(name for name, text in s.prompts.items() if text)]
        items: list[tuple[str, str | None]] = [(t, None) for name in names for t in s.with_prompt(texts, name)]
    else:
        items = [(query, text) for query in s.with_prompt(QUERIES, None) for text in texts]
    if len(items) > BATCH * MAX_BATCHES:
        step = len(items) / (BATCH * MAX_BATCHES)
        items = [items[int(k * step)] for k in range(BATCH * MAX_BATCHES)]
    out = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        pairs = [d or "" for _, d in chunk] if s.task == "rerank" else None
        encoded = tokenizer.encode([q for q, _ in chunk], pairs)
        out.append(padding.pad(encoded, s.pad_token_id, s.encoder_inputs))
    return out
