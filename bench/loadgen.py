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
import random
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np

from . import corpus as corpora

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


async def run_level(
    url: str, label: str, workload: str, items: list[Item], concurrency: int, duration: float, max_requests: int, warmup: int = 2
) -> Level:
    import httpx

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    done_inputs = done_tokens = 0
    next_item = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        for item in items[:warmup]:  # load models, fill caches; not measured
            await http.post(item.path, json=item.body)
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal next_item, done_inputs, done_tokens
            while time.perf_counter() < deadline and len(latencies) + sum(errors.values()) < max_requests:
                item = items[next_item % len(items)]
                next_item += 1
                t0 = time.perf_counter()
                status: int | str
                try:
                    r = await http.post(item.path, json=item.body)
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    done_inputs += item.inputs
                    done_tokens += item.tokens
                else:
                    errors[str(status)] += 1
                    if not latencies and sum(errors.values()) >= 20:
                        return  # a server that refuses everything: stop, the report shows why

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    lat = np.array(latencies or [float("nan")]) * 1000
    return Level(
        label,
        workload,
        concurrency,
        len(latencies),
        dict(errors),
        seconds,
        done_inputs,
        done_tokens,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 95)),
        float(np.percentile(lat, 99)),
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
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--corpus", type=Path, help="JGLUE folder (default ../shared/data/jglue; generated text if absent)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for <label>.json")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    _loopback_only(args.url)
    corpus = corpora.load(args.corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    levels = [int(c) for c in str(args.concurrency).split(",")]
    results = []
    for workload in args.workload.split(","):
        model = args.rerank_model if workload == "rerank" and args.rerank_model else args.model
        items = make_items(workload, model, corpus, tokenizer, args.max_length, count=400)
        for c in levels:
            level = asyncio.run(run_level(args.url, args.label, workload, items, c, args.duration, args.max_requests))
            results.append(level.as_dict())
            print(
                f"{args.label:>24} {workload:>12} c={c:<3} {level.requests_per_s:8.2f} req/s {level.inputs_per_s:8.1f} inputs/s "
                f"{level.tokens_per_s:9.1f} tokens/s  p50 {level.p50_ms:8.1f} p95 {level.p95_ms:8.1f} p99 {level.p99_ms:8.1f} ms"
                f"  errors {level.errors or 0}",
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
