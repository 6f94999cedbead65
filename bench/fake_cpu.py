"""The embedded backend with encoders that sleep as onnxruntime's int8 ran on the AMX host's 16 cores: for trying how
rounds, runs and streams are scheduled on a machine without such a CPU.

The tokenizer, the round queue (``coalescing``) and the run planning (``batching``) are the real ones, on an exported
repository; each model's encoder is replaced by one that sleeps, on each of its streams, for what the AMX host took
for that run's padded shape, and returns constant vectors. Sleeping leaves this machine's cores free, so it can stand
for a CPU it is not. No HTTP and no JSON: closed-loop clients call the backend, so only the scheduling is compared.
Compare settings with each other in one run; against the AMX host's served figures, only as a check of the model.

Costs (ms a run, ms a padded token), ruri-large's shape, onnxruntime int8, ``bench.engine_shapes`` on the H100
machine's host (Intel Xeon, 16 vCPUs, amx_int8, 2026-11-27, docs/benchmarks.md): 16 threads 15.9 + 0.1666; 4 streams
of 4 threads, each 16.5 + 0.60. 2 streams of 8 threads were not fitted: 16.5 + 0.32, the same cost a thread.

    python -m bench.fake_cpu --repository REPO --streams 1,2,4 --seconds 10 [--corpus ../shared/data/jglue]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fos_runtime import batching, spec
from shim.backends.embedded import EmbeddedBackend

from . import corpus as corpora
from .loadgen import make_items

THREADS = 16
COSTS = {1: (15.9, 0.1666), 2: (16.5, 0.32), 4: (16.5, 0.60)}  # streams: (ms a run, ms a padded token) on each
CONCURRENCY = {"dify-embed": 16, "batch-embed": 2, "rerank": 2}  # bench.compare's levels for the CPU targets


class SleepingCpu:
    """Stands for one model's encoder: up to ``streams`` runs at once, each sleeping for its fitted cost."""

    engine = "fake-cpu"
    device = "cpu"
    reason = "bench.fake_cpu"

    def __init__(self, input_names: Sequence[str], width: int, streams: int):
        self.input_names = tuple(input_names)
        self.width = width
        self.streams = streams
        self.run_threads = THREADS // streams
        self.run_ms, self.token_ms = COSTS[streams]
        self.rounds_at_once = 2 if streams > 1 else 1  # as the Encoder's streams
        self._pool = concurrent.futures.ThreadPoolExecutor(streams) if streams > 1 else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        rows, width = feeds[spec.INPUT_IDS].shape
        time.sleep((self.run_ms + self.token_ms * rows * width) / 1000)
        return np.ones((rows, self.width), dtype=np.float32)

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
        if self._pool is None:
            return [self.run(f) for f in feeds]
        return list(self._pool.map(self.run, feeds))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


async def measure(backend: EmbeddedBackend, workload: str, corpus: corpora.Corpus, seconds: float) -> dict:
    """Closed-loop clients of ``workload`` for ``seconds``: tokens/s and how the rounds were cut."""
    task = "rerank" if workload == "rerank" else "embed"
    model = next(m for m in backend.models.values() if m.spec.task == task)
    s = model.spec
    items = make_items(workload, s.served_name, corpus, model.tokenizer.hf, s.max_length, 200)
    rounds_before, requests_before, runs_before = model.rounds.stats.rounds, model.rounds.stats.requests, model.stats.runs
    latencies: list[float] = []
    tokens = 0
    end = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal tokens
        n = k
        while time.perf_counter() < end:
            body = items[n % len(items)].body
            n += CONCURRENCY[workload]
            began = time.perf_counter()
            if workload == "rerank":
                out = await backend.rerank(s, s.with_prompt([body["query"]], None)[0], body["documents"])
            else:
                out = await backend.embed(s, s.with_prompt(body["input"], None))
            if time.perf_counter() < end:
                tokens += sum(out.tokens)
                latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(CONCURRENCY[workload])))
    elapsed = min(time.perf_counter(), end) - began
    rounds = model.rounds.stats.rounds - rounds_before
    latencies.sort()
    return {
        "workload": workload,
        "concurrency": CONCURRENCY[workload],
        "tokens_per_s": tokens / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "requests_per_round": (model.rounds.stats.requests - requests_before) / max(1, rounds),
        "runs_per_round": (model.stats.runs - runs_before) / max(1, rounds),
    }


async def run(
    repository: Path, streams: Sequence[int], workloads: Sequence[str], seconds: float, corpus: corpora.Corpus
) -> list[dict]:
    results = []
    for n in streams:
        # The real encoders with n streams, so that rounds are taken as they would be (Encoder.rounds_at_once); then each
        # gives way to a sleeping one.
        backend = EmbeddedBackend(repository, engine="onnxruntime", threads=n, streams=n)
        await backend.start()
        try:
            for model in backend.models.values():
                width = model.spec.dimension if model.spec.task == "embed" else 1
                model.encoder = SleepingCpu(model.encoder.input_names, width, n)  # type: ignore[assignment]
                model.plan = batching.plan_for("cpu", THREADS // n)
            for workload in workloads:
                results.append({"streams": n, **await measure(backend, workload, corpus, seconds)})
                print(json.dumps(results[-1]), flush=True)
        finally:
            await backend.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True, help="an exported repository (an embedding model and a reranker)")
    p.add_argument("--streams", default="1,2,4", help=f"comma-separated, of {sorted(COSTS)}")
    p.add_argument("--workloads", default="dify-embed,batch-embed,rerank")
    p.add_argument("--seconds", type=float, default=10.0, help="per workload and streams")
    p.add_argument("--corpus", type=Path, help="JGLUE folder (default ../shared/data/jglue, else generated text)")
    args = p.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    if not set(streams) <= set(COSTS):
        p.error(f"--streams: fitted costs for {sorted(COSTS)} only")
    workloads = args.workloads.split(",")
    if not set(workloads) <= set(CONCURRENCY):
        p.error(f"--workloads: of {', '.join(CONCURRENCY)}")
    asyncio.run(run(args.repository, streams, workloads, args.seconds, corpora.load(args.corpus)))


if __name__ == "__main__":
    main()
