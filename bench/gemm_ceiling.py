"""The most an engine could make of a BERT-shaped encoder on this CPU: a stand-in graph that holds only each layer's
matrix products (query/key/value, attention output, the two feed-forward ones) at the model's sizes, run through the
server's ``Encoder`` as ``bench.engine_shapes`` runs it. Everything else the real graph computes (attention's scores,
GELU, layer norms, quantizing activations) adds work, so the stand-in's tokens/s is about the most that grouping
requests or rounds differently can reach on this machine. It is a ceiling within the machine's swings, not a strict
one: an engine may run the real graph's fused products faster than the stand-in's plain ones (OpenVINO f32 reached
1.04-1.07 of it on an AVX-512 Xeon, docs/benchmarks.md). With ``--repository`` the real encoder of each precision runs
the same shapes and configurations, alternated with the stand-in, and its share of the ceiling is printed.

    uv run python -m bench.gemm_ceiling --variants onnxruntime-fp32,openvino-fp32,onnxruntime-int8 \\
        --configs 0:1,2:2 --shapes 4x18,8x18 --seconds 3 \\
        --repository FP32_DIR --repository INT8_DIR --model cl-nagoya/ruri-large

The defaults are ruri-large's sizes (hidden 1024, feed-forward 4096, 24 layers); give another model's with it (an
embedder's hidden size is checked against its export). The stand-in holds ``--graph-layers`` of them (4: a smaller
file, the same products per layer); tokens/s is counted for the model's ``--layers``. Attention's own products (QK^T
and the scores times V) are left out: 0.3% of ruri-large's work at 18 tokens, about 8% at 512.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fos_runtime import engines, spec
from fos_runtime.encoder import Encoder

from .encoders import parse_configs, parse_shapes, served_spec, streams_encoder, time_rounds, uniform_feeds
from .machine import describe

# Which stand-in graph each variant runs: onnxruntime's dynamic int8 is export's own (export.convert.to_precision).
VARIANTS = {
    "onnxruntime-fp32": (engines.Choice(engines.ONNXRUNTIME, "fp32"), "fp32"),
    "onnxruntime-int8": (engines.Choice(engines.ONNXRUNTIME, "int8"), "int8"),
    "openvino-fp32": (engines.Choice(engines.OPENVINO, "fp32"), "fp32"),
    # The fp32 graph computed in bf16, as fos serve's auto serves an fp32 export on a CPU with AMX or AVX512-BF16.
    "openvino-bf16": (engines.Choice(engines.OPENVINO, "bf16"), "fp32"),
}


def macs_per_token(hidden: int, intermediate: int, layers: int) -> int:
    """Multiply-accumulates of a BERT encoder's matrix products per token: per layer the query/key/value projection
    (3 h^2), the attention output (h^2) and the feed-forward pair (2 h i)."""
    return layers * (4 * hidden * hidden + 2 * hidden * intermediate)


def model_depth(tokens_per_s: float, graph_layers: int, layers: int) -> float:
    """The stand-in's tokens/s as the model's: a stand-in token passes ``graph_layers`` layers, a model's ``layers``."""
    return tokens_per_s * graph_layers / layers


def stand_in(path: Path, hidden: int, intermediate: int, layers: int, seed: int = 0) -> None:
    """Write the stand-in: ``input_ids`` [batch, tokens], looked up in a small table, then ``layers`` times
    x <- q + k + v + x Wo + (x W1) W2 with [q k v] = x Wqkv. The sums are its only other operators: they make every
    product feed the one output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name: str, shape: tuple[int, int]) -> onnx.TensorProto:
        # Small weights keep 24 stacked layers' activations finite and clear of denormals.
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), name)

    inits = [weight("table", (8, hidden))]
    nodes = [helper.make_node("Gather", ["table", spec.INPUT_IDS], ["x0"])]
    for n in range(layers):
        x = f"x{n}"
        inits += [weight(f"qkv{n}", (hidden, 3 * hidden)), weight(f"o{n}", (hidden, hidden))]
        inits += [weight(f"in{n}", (hidden, intermediate)), weight(f"out{n}", (intermediate, hidden))]
        nodes += [
            helper.make_node("MatMul", [x, f"qkv{n}"], [f"qkv_{n}"]),
            helper.make_node("Split", [f"qkv_{n}"], [f"q{n}", f"k{n}", f"v{n}"], axis=-1, num_outputs=3),
            helper.make_node("MatMul", [x, f"o{n}"], [f"a{n}"]),
            helper.make_node("MatMul", [x, f"in{n}"], [f"h{n}"]),
            helper.make_node("MatMul", [f"h{n}", f"out{n}"], [f"y{n}"]),
            helper.make_node("Sum", [f"q{n}", f"k{n}", f"v{n}", f"a{n}", f"y{n}"], [f"x{n + 1}"]),
        ]
    graph = helper.make_graph(
        nodes,
        "gemm_stand_in",
        [helper.make_tensor_value_info(spec.INPUT_IDS, TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info(f"x{layers}", TensorProto.FLOAT, ["batch", "tokens", hidden])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _encoder(path: Path, choice: engines.Choice, threads: int, streams: int) -> Encoder:
    precision = choice.compute if choice.engine == engines.ONNXRUNTIME else "fp32"
    return streams_encoder(path, threads, streams, choice, precision, "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="onnxruntime-fp32,openvino-fp32,onnxruntime-int8", help=", ".join(VARIANTS))
    p.add_argument("--configs", default="0:1", help="threads:streams, comma-separated (threads 0: every core)")
    p.add_argument("--shapes", default="4x18,8x18", help="ROWSxTOKENS, comma-separated")
    p.add_argument("--seconds", type=float, default=2.0, help="per shape, configuration and graph, each alternation")
    p.add_argument("--alternations", type=int, default=2, help="stand-in then real model, this many times a shape")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=24, help="the model's: tokens/s counts its products per token")
    p.add_argument("--graph-layers", type=int, default=4, help="the stand-in's")
    p.add_argument("--repository", action="append", default=[], help="an export to time beside it (once per precision)")
    p.add_argument("--model", help="served name in --repository")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: use {', '.join(VARIANTS)}")
    if args.repository and not args.model:
        raise SystemExit("--repository needs --model")
    real = {}  # precision -> (encoder file, the model's spec)
    for repository in args.repository:
        served = served_spec(repository, args.model)
        if served.precision not in ("fp32", "int8") or served.precision in real:
            raise SystemExit(f"{repository}: one fp32 and one int8 export at most ({served.precision} here)")
        if served.dimension and served.dimension != args.hidden:
            raise SystemExit(f"{args.model} has hidden size {served.dimension}, not --hidden {args.hidden}")
        real[served.precision] = (spec.encoder_file(repository, served.name), served)
    shapes = parse_shapes(args.shapes)
    per_token = macs_per_token(args.hidden, args.intermediate, args.layers)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"fp32": Path(tmp) / "fp32.onnx", "int8": Path(tmp) / "int8.onnx"}
        stand_in(graphs["fp32"], args.hidden, args.intermediate, args.graph_layers)
        if "onnxruntime-int8" in variants:
            from export.convert import to_precision

            to_precision(graphs["fp32"], graphs["int8"], "int8")
        for variant in variants:
            choice, graph = VARIANTS[variant]
            for threads, streams in parse_configs(args.configs):
                ceiling = _encoder(graphs[graph], choice, threads, streams)
                model = _encoder(real[graph][0], choice, threads, streams) if graph in real else None
                for rows, length in shapes:
                    tokens = streams * rows * length  # a round's
                    runs = [(ceiling, {spec.INPUT_IDS: np.ones((rows, length), dtype=np.int64)})]
                    if model is not None:
                        runs.append((model, uniform_feeds(real[graph][1], rows, length)))
                    # Alternated, so that the machine's swings fall on both alike.
                    ms = [[time_rounds(e, f, streams, args.seconds)[1] for e, f in runs] for _ in range(args.alternations)]
                    ceiling_tps = [model_depth(1000 * tokens / block[0], args.graph_layers, args.layers) for block in ms]
                    row = {"variant": variant, "threads": threads, "streams": streams, "rows": rows, "tokens": length}
                    row["ms_per_round"] = ms
                    row["ceiling_tokens_per_s"] = ceiling_tps
                    row["gmacs_per_s"] = [t * per_token / 1e9 for t in ceiling_tps]
                    line = ", ".join(f"{t:,.0f}" for t in ceiling_tps)
                    line += f" tokens/s ({', '.join(f'{g:.0f}' for g in row['gmacs_per_s'])} GMAC/s)"
                    if model is not None:
                        model_tps = [1000 * tokens / block[1] for block in ms]
                        row["model_tokens_per_s"] = model_tps
                        row["share"] = float(np.mean(model_tps) / np.mean(ceiling_tps))
                        line += f"; the model {', '.join(f'{t:,.0f}' for t in model_tps)}: {row['share']:.2f} of it"
                    results.append(row)
                    print(f"{variant} threads {threads or 'all'} streams {streams} {rows}x{length}: ceiling {line}", flush=True)
                del ceiling, model
    print(json.dumps({"macs_per_token": per_token, "results": results, "machine": describe()}))


if __name__ == "__main__":
    main()
