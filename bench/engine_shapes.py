"""An engine's throughput on uniform batch shapes, for a few thread and stream counts: the ceiling that a server's
rounds can reach on this machine, and what a run costs beyond its tokens (a line fitted per configuration).

Rounds of ``streams`` equal batches go through ``Encoder.run_many`` as the embedded backend sends a round's batches;
inputs are constant tokens (speed does not depend on their values). Each shape's first round is timed on its own; its
time beyond a later round's (``first_extra_ms``) is what preparing a new shape costs. The line fitted to each
configuration's rounds of one width, milliseconds = fixed + per_token * padded tokens of one batch, gives ``fixed /
per_token``: a run's cost in padded tokens, what ``fos_runtime.batching``'s ``run_cost_tokens`` stands for.

    uv run python -m bench.engine_shapes --repository DIR --model cl-nagoya/ruri-large --engine openvino-bf16 \\
        --configs 16:1,8:1,16:4 --shapes 1x32,4x32,16x32,64x32,4x128,16x128,32x128,64x128
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fos_runtime import spec

from .encoders import parse_configs, parse_shapes, served_spec, streams_encoder, time_rounds, uniform_feeds
from .machine import describe


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``ms = fixed + per_token * tokens`` over (tokens, ms) points: (fixed, per_token)."""
    tokens = np.array([p[0] for p in points], dtype=float)
    ms = np.array([p[1] for p in points], dtype=float)
    per_token, fixed = np.polyfit(tokens, ms, 1)
    return float(fixed), float(per_token)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True, help="served name")
    p.add_argument("--engine", default=None, help="as fos serve --engine (default: the model's own)")
    p.add_argument("--configs", default="0:1", help="threads:streams, comma-separated (threads 0: every core)")
    p.add_argument("--shapes", default="1x32,4x32,16x32,64x32", help="ROWSxTOKENS, comma-separated")
    p.add_argument("--seconds", type=float, default=1.5, help="per shape and configuration")
    # On a GPU host onnxruntime would go to the GPU and OpenVINO be refused: this measures the CPU unless told otherwise.
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="as fos serve --device")
    args = p.parse_args()
    s = served_spec(args.repository, args.model)
    shapes = parse_shapes(args.shapes)
    results = []
    for threads, streams in parse_configs(args.configs):
        path = spec.encoder_file(args.repository, s.name)
        encoder = streams_encoder(path, threads, streams, args.engine or s.engine, s.precision, args.device)
        points: dict[int, list[tuple[int, float]]] = {}  # by width: a line for each (attention grows with it)
        # The engine's own first inference, on a shape not measured, so that it is not counted as the first shape's.
        encoder.run_many([uniform_feeds(s, 1, 3)] * streams)
        for rows, length in shapes:
            first_ms, ms = time_rounds(encoder, uniform_feeds(s, rows, length), streams, args.seconds)
            points.setdefault(length, []).append((rows * length, ms))
            tps = streams * rows * length / ms * 1000
            shape = {"threads": threads, "streams": streams, "rows": rows, "tokens": length}
            # The first round's time beyond a later one's: what preparing the shape cost (noise: several ms either way).
            timing = {"tokens_per_s": tps, "ms_per_round": ms, "first_round_ms": first_ms, "first_extra_ms": first_ms - ms}
            results.append(shape | timing)
            label = f"threads {threads or 'all'} streams {streams} {rows}x{length}"
            print(f"{label}: {tps:,.0f} tokens/s, {ms:.1f} ms a round, the first {first_ms - ms:+.1f} ms more", flush=True)
        for length, line in points.items():
            if len(line) > 1:
                fixed, per_token = fit(line)
                print(
                    f"threads {threads or 'all'} streams {streams} x{length}: a run {fixed:.1f} ms + {per_token:.4f} ms a "
                    f"padded token; run cost {fixed / per_token:.0f} padded tokens",
                    flush=True,
                )
    print(json.dumps({"engine": f"{encoder.engine.engine} {encoder.engine.compute}", "results": results, "machine": describe()}))


if __name__ == "__main__":
    main()
