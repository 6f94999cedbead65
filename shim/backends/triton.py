"""The Triton backend: gRPC (tritonclient.grpc.aio) to the ensembles that export wrote.

Text goes to the ensemble (tokenized inside Triton); token-id input goes straight to the encoder.
A large client batch is split into sub-requests of similar length, sent concurrently and put back
in input order.

Several Triton endpoints may be given (one per GPU node): requests go round-robin to the healthy
ones; an endpoint that fails is dropped, its request retried on another (inference is idempotent),
and a background probe takes it back once it answers ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from fos_runtime import spec as specs
from fos_runtime.batching import length_batches, plan_for
from fos_runtime.padding import pad
from fos_runtime.spec import ModelSpec
from fos_runtime.tokenization import Encoded

from ..errors import BackendFailed, BackendUnavailable
from ..repository import spec_of
from .base import Output

log = logging.getLogger("fos.triton")

TIMEOUT_S = 60.0  # deadline of every Triton call
PROBE_S = 1.0  # how often a dropped endpoint is asked whether it is ready again
_UNAVAILABLE = ("UNAVAILABLE", "DEADLINE", "NOT_FOUND", "CANCELLED")  # the endpoint, not the request, is at fault


def _sub_batches(s: ModelSpec, lengths: list[int]) -> list[list[int]]:
    """Sort by length and cut into sub-requests of the models' max_batch_size; no padding bound here,
    since Triton's encoder regroups the rows it receives by their real token lengths."""
    return length_batches(lengths, plan_for(s.device).max_rows, max_tokens=1 << 30, max_padding=1.0)


def _strings(name: str, values: Sequence[str]) -> grpcclient.InferInput:
    arr = np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    tensor.set_data_from_numpy(arr)
    return tensor


def _detect(rows: int, wanted: bool) -> list[grpcclient.InferInput]:
    """The ensemble's optional DETECT_TRUNCATION input, sent only when wanted."""
    if not wanted:
        return []
    tensor = grpcclient.InferInput(specs.DETECT_TRUNCATION, [rows, 1], "BOOL")
    tensor.set_data_from_numpy(np.ones((rows, 1), dtype=np.bool_))
    return [tensor]


def _doc_tokens(rows: int, cap: int | None) -> list[grpcclient.InferInput]:
    """The rerank ensemble's optional MAX_DOC_TOKENS input, sent only when a cap is asked for."""
    if cap is None:
        return []
    return [_ints(specs.MAX_DOC_TOKENS, np.full((rows, 1), cap, dtype=np.int64))]


def _ints(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(arr.shape), "INT64")
    tensor.set_data_from_numpy(arr)
    return tensor


# gRPC backs off up to minutes between reconnects to a server that went away; a restarted Triton
# should be back in rotation within a second or two of being ready.
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


class _Endpoint:
    def __init__(self, url: str):
        self.url = url
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.healthy = False
        self.down_since = time.monotonic()


class TritonBackend:
    def __init__(self, urls: str | Sequence[str], timeout_s: float = TIMEOUT_S, probe_s: float = PROBE_S):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one Triton endpoint is needed")
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.endpoints: list[_Endpoint] = []  # made in start(): grpc.aio binds to the running loop
        self._specs: dict[str, ModelSpec] = {}
        self._next = 0
        self._prober: asyncio.Task | None = None

    async def start(self) -> None:
        self.endpoints = [_Endpoint(u) for u in self.urls]
        await asyncio.gather(*(self._probe(e) for e in self.endpoints))
        self._prober = asyncio.create_task(self._probe_forever(), name="triton-probe")

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        await asyncio.gather(*(e.client.close() for e in self.endpoints), return_exceptions=True)

    async def _probe(self, e: _Endpoint) -> bool:
        """Is the endpoint serving every exported model? Learns the models on the way."""
        try:
            if not await e.client.is_server_ready(client_timeout=5.0):
                return self._mark(e, False)
            if not self._specs:
                self._specs = await self._discover(e)
            for s in self._specs.values():
                if not await e.client.is_model_ready(s.name, client_timeout=5.0):
                    return self._mark(e, False)
            return self._mark(e, bool(self._specs))
        except Exception as exc:
            log.debug("Triton at %s not ready: %s", e.url, exc)
            return self._mark(e, False)

    async def _discover(self, e: _Endpoint) -> dict[str, ModelSpec]:
        index = await e.client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
        found: dict[str, ModelSpec] = {}
        for entry in index.get("models", []):
            if entry.get("state") != "READY":
                continue
            response = await e.client.get_model_config(entry["name"], client_timeout=self.timeout_s)
            s = spec_of(response.config)
            if s is not None:
                found[s.served_name] = s
        log.info("Triton at %s serves %s", e.url, sorted(found) or "no exported models")
        return found

    def _mark(self, e: _Endpoint, healthy: bool) -> bool:
        if healthy != e.healthy:
            if healthy:
                log.info("Triton at %s is ready (down %.1fs)", e.url, time.monotonic() - e.down_since)
            else:
                log.warning("Triton at %s dropped", e.url)
                e.down_since = time.monotonic()
        e.healthy = healthy
        return healthy

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            await asyncio.gather(*(self._probe(e) for e in self.endpoints if not e.healthy))

    async def ready(self) -> bool:
        if not any(e.healthy for e in self.endpoints):
            await asyncio.gather(*(self._probe(e) for e in self.endpoints))
        return any(e.healthy for e in self.endpoints)

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def _order(self) -> list[_Endpoint]:
        """Healthy endpoints, rotated so successive requests start at different ones."""
        healthy = [e for e in self.endpoints if e.healthy]
        self._next += 1
        k = self._next % len(healthy) if healthy else 0
        return healthy[k:] + healthy[:k]

    async def _infer(self, model: str, inputs: list, outputs: list[str]) -> list[np.ndarray]:
        last = "no Triton endpoint is ready"
        for e in self._order():
            try:
                result = await e.client.infer(
                    model,
                    inputs,
                    outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                    client_timeout=self.timeout_s,
                )
                return [result.as_numpy(o) for o in outputs]
            except InferenceServerException as exc:
                status = (exc.status() or "").upper()
                if not any(code in status for code in _UNAVAILABLE):
                    raise BackendFailed(f"Triton failed: {exc.message()}") from exc
                self._mark(e, False)  # the probe takes it back when it is ready
                last = f"Triton at {e.url} is unavailable: {exc.message()}"
        raise BackendUnavailable(last)

    async def _fan_out(self, groups: list[list[int]], request, n: int) -> list[np.ndarray]:
        """Send one sub-request per group concurrently; put each output's rows back in input order."""
        parts = await asyncio.gather(*(request(g) for g in groups))
        merged = []
        for k, first in enumerate(parts[0]):
            out = np.empty((n, first.reshape(len(groups[0]), -1).shape[1]), dtype=first.dtype)
            for g, part in zip(groups, parts, strict=True):
                out[g] = part[k].reshape(len(g), -1)
            merged.append(out)
        return merged

    async def embed(
        self, s: ModelSpec, texts: Sequence[str] | None = None, encoded: Encoded | None = None, detect_truncation: bool = False
    ) -> Output:
        if encoded is not None:

            def by_ids(g: list[int]):
                feeds = pad(encoded, s.pad_token_id, s.encoder_inputs, order=g)
                return self._infer(specs.encoder_model(s.name), [_ints(n, a) for n, a in feeds.items()], [specs.EMBEDDING])

            (vectors,) = await self._fan_out(_sub_batches(s, encoded.lengths), by_ids, len(encoded.input_ids))
            return Output.of(vectors, encoded)
        texts = list(texts or [])
        # Characters stand in for tokens when grouping by length; Triton tokenizes.
        return _output(
            *await self._fan_out(
                _sub_batches(s, [len(t) for t in texts]),
                lambda g: self._infer(
                    s.name,
                    [_strings(specs.TEXT, [texts[i] for i in g]), *_detect(len(g), detect_truncation)],
                    [specs.EMBEDDING, *_COUNTS],
                ),
                len(texts),
            )
        )

    async def rerank(
        self,
        s: ModelSpec,
        query: str,
        documents: Sequence[str],
        detect_truncation: bool = False,
        max_doc_tokens: int | None = None,
    ) -> Output:
        docs = list(documents)
        scores, tokens, truncated = await self._fan_out(
            _sub_batches(s, [len(d) for d in docs]),
            lambda g: self._infer(
                s.name,
                [
                    _strings(specs.TEXT, [query] * len(g)),
                    _strings(specs.TEXT_PAIR, [docs[i] for i in g]),
                    *_detect(len(g), detect_truncation),
                    *_doc_tokens(len(g), max_doc_tokens),
                ],
                [specs.SCORE, *_COUNTS],
            ),
            len(docs),
        )
        return _output(scores.reshape(-1), tokens, truncated)


_COUNTS = (specs.NUM_TOKENS, specs.TRUNCATED)


def _output(values: np.ndarray, tokens: np.ndarray, truncated: np.ndarray) -> Output:
    return Output(values, tokens.reshape(-1).tolist(), truncated.reshape(-1).astype(bool).tolist())
