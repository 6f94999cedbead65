"""The encoder alone, without HTTP, JSON or tokenization in the timed part: what the server could deliver at most.

Requests of a ``fos bench`` workload (the same corpus and items) are tokenized up front, gathered into rounds of
``--round-requests`` requests (what the server's rounds held: ``fos_round_requests_total / fos_rounds_total`` in its
``/metrics``) and run through ``fos_runtime.batching.run`` with the engine the server runs: the same length grouping,
padding and batch shapes. End-to-end tokens/s over this figure is how much of its engine a server delivers.

    uv run python -m bench.engine --repository DIR --model cl-nagoya/ruri-large --workload dify-embed \\
        --round-requests 8 --engine auto
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from fos_runtime import batching, spec
from fos_runtime.encoder import Encoder
from fos_runtime.tokenization import Tokenizer

from . import corpus as corpora
from .encoders import served_spec
from .loadgen import make_items
from .machine import describe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True, help="served name")
    p.add_argument("--workload", default="dify-embed", choices=("dify-embed", "batch-embed", "rerank"))
    p.add_argument("--round-requests", type=float, default=1.0, help="requests per round (the server's average)")
    p.add_argument("--engine", default=None, help="as fos serve --engine (default: the model's own)")
    p.add_argument("--threads", type=int)
    p.add_argument("--streams", type=int, default=1, help="as fos serve --engine-streams")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"), help="as fos serve --device")
    p.add_argument("--run-cost-tokens", type=int, help="the plan's run_cost_tokens instead of its own (a run's fixed cost)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument(
        "--requests",
        type=int,
        default=400,
        help="use the workload's first N requests, those a fos bench run of N requests sent (few long requests vary a lot)",
    )
    p.add_argument("--corpus")
    args = p.parse_args()
    repository = Path(args.repository)
    s = served_spec(repository, args.model)
    tokenizer = Tokenizer(spec.tokenizer_files(repository, s.name), s.max_length)
    encoder = Encoder(
        spec.encoder_file(repository, s.name),
        threads=args.threads,
        device=args.device,
        engine=args.engine or s.engine,
        precision=s.precision,
        streams=args.streams,
    )
    plan = batching.plan_for(encoder.device, encoder.run_threads)
    if args.run_cost_tokens is not None:
        plan = dataclasses.replace(plan, run_cost_tokens=args.run_cost_tokens)
    corpus = corpora.load(Path(args.corpus) if args.corpus else None)
    items = make_items(args.workload, s.served_name, corpus, tokenizer.hf, s.max_length, 400)[: args.requests]
    encodeds = []
    for item in items:  # with the model's default prompt, as the server puts it
        if args.workload == "rerank":
            docs = item.body["documents"]
            (query,) = s.with_prompt([item.body["query"]], None)
            encodeds.append(tokenizer.encode([query] * len(docs), docs))
        else:
            encodeds.append(tokenizer.encode(s.with_prompt(item.body["input"], None)))
    # Rounds of alternately floor and ceil of the average, as the server's rounds vary around it.
    rounds, start, k = [], 0, 0
    while start < len(encodeds):
        size = max(1, int(args.round_requests * (k + 1)) - int(args.round_requests * k))
        rounds.append(encodeds[start : start + size])
        start, k = start + size, k + 1
    stats = batching.Stats()
    # The server's shapes: a GPU plan's buckets, each run once at load as the server does.
    batching.warm_up(encoder, plan, s.pad_token_id, s.encoder_inputs, s.max_length)
    batching.run(encoder, rounds[0], s.pad_token_id, s.encoder_inputs, plan, max_length=s.max_length)
    began = time.perf_counter()
    cpu = time.process_time()
    n = 0
    while time.perf_counter() - began < args.seconds:
        batching.run(encoder, rounds[n % len(rounds)], s.pad_token_id, s.encoder_inputs, plan, stats, s.max_length)
        n += 1
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    result = {
        "model": s.served_name,
        "engine": str(encoder.engine),
        "workload": args.workload,
        "round_requests": args.round_requests,
        "rounds": n,
        "rows_per_run": stats.rows / stats.runs,
        "padded_width": stats.computed_tokens / stats.rows,
        "padding_efficiency": stats.padding_efficiency,
        "tokens_per_s": stats.real_tokens / wall,
        "cpu_ms_per_token": 1000 * cpu / stats.real_tokens,
        "machine": describe(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
