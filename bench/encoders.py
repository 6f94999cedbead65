"""What the engine-level bench tools share: the served model's spec in an export, ``ROWSxTOKENS`` shapes, uniform
feeds padded as serving pads them, and rounds through ``Encoder.run_many`` timed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fos_runtime import engines, spec
from fos_runtime.encoder import Encoder
from fos_runtime.padding import pad
from fos_runtime.tokenization import Encoded
from shim.repository import read_specs


def served_spec(repository: str | Path, name: str) -> spec.ModelSpec:
    """The spec of the model served as ``name`` in ``repository``; exits with the names it does serve otherwise."""
    specs = read_specs(Path(repository))
    found = next((s for s in specs if s.served_name == name), None)
    if found is None:
        raise SystemExit(f"{repository} serves no {name!r}: {', '.join(s.served_name for s in specs)}")
    return found


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x18,8x18"`` as [(4, 18), (8, 18)]: rows and tokens."""
    return _int_pairs(text, "x")


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"0:1,2:2"`` as [(0, 1), (2, 2)]: threads (0: every core) and streams."""
    return _int_pairs(text, ":")


def _int_pairs(text: str, sep: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        first, second = item.split(sep)
        pairs.append((int(first), int(second)))
    return pairs


def streams_encoder(path: Path, threads: int, streams: int, engine: str | engines.Choice, precision: str, device: str) -> Encoder:
    """The encoder at ``path`` on ``threads`` (0: every core) in exactly ``streams`` streams; exits where the engine
    grants another number (OpenVINO may), since a figure would then be another configuration's."""
    encoder = Encoder(path, threads=threads or None, engine=engine, precision=precision, streams=streams, device=device)
    if encoder.streams != streams:
        raise SystemExit(f"{encoder.engine} runs {encoder.streams} streams, not {streams}")
    return encoder


def uniform_feeds(s: spec.ModelSpec, rows: int, tokens: int) -> dict[str, np.ndarray]:
    """``rows`` inputs of ``tokens`` constant tokens, padded as serving pads them (speed does not depend on values)."""
    return pad(Encoded(input_ids=[[1] * tokens] * rows), s.pad_token_id, s.encoder_inputs)


def time_rounds(encoder: Encoder, feeds: dict[str, np.ndarray], streams: int, seconds: float) -> tuple[float, float]:
    """Rounds of ``streams`` copies of ``feeds`` through ``encoder.run_many`` for ``seconds``: the first round's
    milliseconds, timed on its own, and a later round's mean."""
    # A new shape's first run prepares its kernels: OpenVINO int8 ~40 ms of it on 2 Zen 4 cores, keyed on rows x tokens,
    # which a server that forms new shapes pays again and again (docs/benchmarks.md).
    first = time.perf_counter()
    encoder.run_many([feeds] * streams)
    first_ms = (time.perf_counter() - first) * 1000
    rounds, began = 0, time.perf_counter()
    while rounds == 0 or time.perf_counter() - began < seconds:
        encoder.run_many([feeds] * streams)
        rounds += 1
    return first_ms, (time.perf_counter() - began) / rounds * 1000
