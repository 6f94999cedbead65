"""``fos bench``: an async HTTP load generator for loopback servers.

Workloads:
- ``dify-embed``: one input per request, as Dify sends (JGLUE JSTS sentences);
- ``batch-embed``: 32 inputs of mixed length per request (sentences and JSQuAD paragraphs, 3:1);
- ``rerank``: one JSQuAD question against its own paragraph and 9 others.
Each concurrency level runs until its time or request bound; tokens are counted with the model's
own tokenizer (truncated as the server truncates), so servers that report no usage compare fairly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import multiprocessing
import random
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import corpus as corpora
from . import cpu_usage

WORKLOADS = ("dify-embed", "batch-embed", "rerank")
BATCH = 32
PASSAGES = 10


@dataclasses.dataclass
class Item:
    path: str
    body: dict
    inputs: int
    tokens: int


@dataclasses.dataclass
class Level:
    label: str
    workload: str
    concurrency: int
    requests: int
    errors: dict[str, int]
    seconds: float
    inputs: int
    tokens: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # The busiest load process's share of a core while it measured: near 1.0, the load generator itself may be
    # what limits the figure (add --processes).
    load_process_cores: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(requests_per_s=self.requests_per_s, inputs_per_s=self.inputs_per_s, tokens_per_s=self.tokens_per_s)
        return d


def _loopback_only(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"fos bench sends load to loopback addresses only, not {host!r}")


def make_items(
    workload: str, model: str | None, corpus: corpora.Corpus, tokenizer, max_length: int, count: int, seed: int = 0
) -> list[Item]:
    rng = random.Random(seed)

    def tokens(texts, pairs=None) -> int:
        enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length)
        return sum(len(ids) for ids in enc["input_ids"])

    items = []
    for _ in range(count):
        if workload == "dify-embed":
            texts = [rng.choice(corpus.short)]
            items.append(Item("/v1/embeddings", {"model": model, "input": texts}, 1, tokens(texts)))
        elif workload == "batch-embed":
            texts = [rng.choice(corpus.long) if rng.random() < 0.25 else rng.choice(corpus.short) for _ in range(BATCH)]
            items.append(Item("/v1/embeddings", {"model": model, "input": texts}, BATCH, tokens(texts)))
        elif workload == "rerank":
            question, own = rng.choice(corpus.questions)
            others = rng.sample([i for i in range(len(corpus.long)) if i != own], PASSAGES - 1)
            docs = [corpus.long[i] for i in [own, *others]]
            rng.shuffle(docs)
            body = {"model": model, "query": question, "documents": docs, "top_n": 3}
            items.append(Item("/v1/rerank", body, PASSAGES, tokens([question] * PASSAGES, docs)))
        else:
            raise ValueError(f"unknown workload {workload!r}")
    return items


@dataclasses.dataclass
class Sample:
    """What one load process saw."""

    latencies: list[float]
    errors: Counter[str]
    inputs: int
    tokens: int
    seconds: float
    cpu_seconds: float = 0.0  # its event loop thread's CPU time while it measured


async def _drive(url: str, items: list[Item], concurrency: int, start_at: float, duration: float, max_requests: int) -> Sample:
    """``concurrency`` clients, each sending its next request as soon as the last is answered, from ``start_at``
    (wall clock, so that several processes start together) for ``duration`` seconds."""
    import aiohttp

    bodies = [(item, json.dumps(item.body, ensure_ascii=False).encode()) for item in items]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    done_inputs = done_tokens = 0
    next_item = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        # The event loop's own thread: all the load generator's work, and nothing of a server sharing its process
        # (as the tests' in-process servers do).
        start, cpu_start = time.perf_counter(), time.thread_time()
        deadline = start + duration

        async def client() -> None:
            nonlocal next_item, done_inputs, done_tokens
            while time.perf_counter() < deadline and len(latencies) + sum(errors.values()) < max_requests:
                item, body = bodies[next_item % len(bodies)]
                next_item += 1
                t0 = time.perf_counter()
                status: int | str
                try:
                    async with http.post(item.path, data=body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    done_inputs += item.inputs
                    done_tokens += item.tokens
                else:
                    errors[str(status)] += 1
                    if not latencies and sum(errors.values()) >= 20:
                        return  # a server that refuses everything: stop, the report shows why

        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        cpu_seconds = time.thread_time() - cpu_start
    return Sample(latencies, errors, done_inputs, done_tokens, seconds, cpu_seconds)


def _drive_in_process(args: tuple) -> Sample:
    return asyncio.run(_drive(*args))


async def _warm_up(url: str, items: list[Item]) -> None:
    """Two requests, answered before the level starts: the server loads what it loads lazily. A slow server (the
    naive one takes seconds a batch-embed request) would otherwise have its warm-up counted in the level's CPU use."""
    import aiohttp

    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=600)) as http:
        for item in items[:2]:
            body = json.dumps(item.body, ensure_ascii=False).encode()
            async with http.post(item.path, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()


def run_level(
    url: str,
    label: str,
    workload: str,
    items: list[Item],
    concurrency: int,
    duration: float,
    max_requests: int,
    processes: int = 1,
    on_start: Callable[[], None] | None = None,
) -> Level:
    """One concurrency level, its clients spread over ``processes`` processes: one Python process cannot send
    more than a thousand or so requests a second, which a server on a GPU answers. ``on_start`` is called after the
    warm-up, as the level begins: where readings of the servers (CPU time, Triton's counters) start from."""
    asyncio.run(_warm_up(url, items))
    if on_start is not None:
        on_start()
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    start_at = time.time() + (1.0 if processes > 1 else 0.0)
    jobs = [
        (url, items[k::processes] or items, c, start_at, duration, max(1, max_requests // processes))
        for k, c in enumerate(shares)
    ]
    if processes == 1:
        samples = [_drive_in_process(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            samples = pool.map(_drive_in_process, jobs)
    latencies = [x for s in samples for x in s.latencies]
    errors: Counter[str] = Counter()
    for s in samples:
        errors.update(s.errors)
    lat = np.array(latencies or [float("nan")]) * 1000
    return Level(
        label,
        workload,
        concurrency,
        len(latencies),
        dict(errors),
        max(s.seconds for s in samples),
        sum(s.inputs for s in samples),
        sum(s.tokens for s in samples),
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 95)),
        float(np.percentile(lat, 99)),
        max(s.cpu_seconds / s.seconds for s in samples),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8081", help="server base URL (loopback only)")
    p.add_argument("--label", required=True, help="name of the server under test, for the report")
    p.add_argument("--model", help="model name to send (embeddings and rerank share it unless --rerank-model)")
    p.add_argument("--rerank-model")
    p.add_argument("--workload", default="dify-embed", help=f"comma-separated: {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    p.add_argument("--max-requests", type=int, default=10_000, help="requests per level at most")
    p.add_argument("--tokenizer", required=True, type=Path, help="the model's tokenizer files, to count tokens")
    p.add_argument(
        "--max-length", type=int, help="tokens an input counts at most (default: the tokenizer's, 512 for ruri v1, 8192 for v3)"
    )
    p.add_argument("--corpus", type=Path, help="JGLUE folder (default ../shared/data/jglue; generated text if absent)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for <label>.json")
    p.add_argument("--processes", type=int, default=1, help="load-generating processes (for thousands of requests a second)")
    p.add_argument(
        "--triton-metrics",
        metavar="URL",
        help="Triton's metrics endpoint (e.g. http://127.0.0.1:8002/metrics): report rows per execution of each model",
    )


# Triton's cumulative counters per model: rows, executions, requests, and the microseconds its requests spent
# queued and computing (each request of a batch counts the batch's compute time).
_TRITON_COUNTERS = {
    "nv_inference_count": "rows",
    "nv_inference_exec_count": "executions",
    "nv_inference_request_success": "requests",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_infer_duration_us": "compute_us",
}


def prometheus_samples(text: str) -> Iterator[tuple[str, str, float]]:
    """Each sample of a Prometheus text page (Triton's, the shim's): metric name, ``model`` label ('' if none), value."""
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            model = line.split('model="', 1)[1].split('"', 1)[0] if 'model="' in line else ""
            yield name, model, float(line.rsplit(" ", 1)[1])


def triton_counts(url: str) -> dict[str, dict[str, float]]:
    """Per Triton model, its counters so far (``_TRITON_COUNTERS``). Over an interval, rows per execution is what
    dynamic batching achieved, and queue and compute time per request show which stage of the ensemble waits."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_triton_counts(r.read().decode())


def parse_triton_counts(text: str) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, float]] = {}
    for name, model, value in prometheus_samples(text):
        if name in _TRITON_COUNTERS:
            per_model = counts.setdefault(model, dict.fromkeys(_TRITON_COUNTERS.values(), 0.0))
            per_model[_TRITON_COUNTERS[name]] += value
    return counts


def triton_level(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict]:
    """What each model did between two readings: rows per execution, and per request the milliseconds queued and
    computing."""
    out = {}
    for model, now in after.items():
        d = {k: v - before.get(model, {}).get(k, 0.0) for k, v in now.items()}
        if d["executions"] > 0:
            out[model] = {
                "rows": d["rows"],
                "executions": d["executions"],
                "rows_per_execution": d["rows"] / d["executions"],
                "queue_ms_per_request": d["queue_us"] / 1000 / max(d["requests"], 1),
                "compute_ms_per_request": d["compute_us"] / 1000 / max(d["requests"], 1),
            }
    return out


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    _loopback_only(args.url)
    corpus = corpora.load(args.corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    # A tokenizer saved without a limit says 1e30: count as ruri v1 then.
    max_length = args.max_length or (tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512)
    levels = [int(c) for c in str(args.concurrency).split(",")]
    results = []
    for workload in args.workload.split(","):
        model = args.rerank_model if workload == "rerank" and args.rerank_model else args.model
        items = make_items(workload, model, corpus, tokenizer, max_length, count=400)
        for c in levels:
            readings: dict[str, Any] = {}

            def read(into: dict[str, Any] = readings) -> None:
                into["triton"] = triton_counts(args.triton_metrics) if args.triton_metrics else {}
                into["procs"] = cpu_usage.snapshot()

            level = run_level(args.url, args.label, workload, items, c, args.duration, args.max_requests, args.processes, read)
            result = level.as_dict()
            # Over the measured seconds: the servers' work happens then (the load processes' start-up is theirs).
            result["cpu_cores"] = cpu_usage.usage(readings["procs"], cpu_usage.snapshot(), level.seconds)
            if args.triton_metrics:
                result["triton"] = triton_level(readings["triton"], triton_counts(args.triton_metrics))
            results.append(result)
            print(
                f"{args.label:>24} {workload:>12} c={c:<3} {level.requests_per_s:8.2f} req/s {level.inputs_per_s:8.1f} inputs/s "
                f"{level.tokens_per_s:9.1f} tokens/s  p50 {level.p50_ms:8.1f} p95 {level.p95_ms:8.1f} p99 {level.p99_ms:8.1f} ms"
                f"  errors {level.errors or 0}",
                flush=True,
            )
            for model, figures in result.get("triton", {}).items():
                print(
                    f"{'':>24} Triton {model}: {figures['rows_per_execution']:.2f} rows per execution; a request queued "
                    f"{figures['queue_ms_per_request']:.1f} ms, computed {figures['compute_ms_per_request']:.1f} ms",
                    flush=True,
                )
            if result["cpu_cores"]:
                print(
                    f"{'':>24} CPU cores: {cpu_usage.describe(result['cpu_cores'])}; busiest load process "
                    f"{level.load_process_cores:.2f}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{args.label}.json"
    existing = json.loads(out.read_text()) if out.exists() else {"label": args.label, "levels": []}
    existing["corpus"] = corpus.source
    keep = {(r["workload"], r["concurrency"]) for r in results}
    existing["levels"] = [r for r in existing["levels"] if (r["workload"], r["concurrency"]) not in keep] + results
    out.write_text(json.dumps(existing, ensure_ascii=False, indent=2))
    print(f"wrote {out}")
    return 0
