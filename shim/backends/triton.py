"""The Triton backend: gRPC (tritonclient.grpc.aio) to the ensembles that export wrote.

Text goes to the ensemble (tokenized inside Triton); token-id input goes straight to the encoder.
Concurrent requests for a model are coalesced into rounds (``coalescing``): a round's inputs are sorted
by length and cut into calls of at most the models' ``max_batch_size`` rows, sent concurrently and put
back in each request's input order. Dify sends one input per request; this is what lets Triton's
encoder run them as batches whatever its backend (the ONNX Runtime backend batches only requests of
equal shape, and one call of many rows is one shape).

Several Triton endpoints may be given (one per GPU node): calls go round-robin to the healthy ones; an
endpoint that is unreachable is dropped, its call retried on another (inference is idempotent), and a
background probe takes it back once it answers ready again. A call that only took too long answers
504 and leaves its endpoint in rotation: slowness is load, not death.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from fos_runtime import spec as specs
from fos_runtime.batching import plan_for
from fos_runtime.padding import ROW_BUCKETS, bucket_length, pad
from fos_runtime.spec import ModelSpec
from fos_runtime.tokenization import Encoded

from ..errors import APIError, BackendFailed, BackendTimeout, BackendUnavailable
from ..repository import spec_of
from . import coalescing
from .base import BatchingStats, Engine, Output
from .coalescing import Coalescer

log = logging.getLogger("fos.triton")

TIMEOUT_S = 60.0  # deadline of one call of up to max_batch_size rows; a round of k calls gets k times it
PROBE_S = 1.0  # how often every endpoint is asked whether it is ready (a dropped one is taken back)
PROBE_TIMEOUT_S = 5.0
_UNREACHABLE = ("UNAVAILABLE", "CANCELLED")  # the endpoint, not the request, is at fault
_NOT_FOUND = "NOT_FOUND"  # the endpoint is there but does not serve this model (unloaded, or never had it)
_DEADLINE = "DEADLINE_EXCEEDED"
# The Python backend's answer for a model whose stub process died (the OOM killer picks the one holding a model): Triton
# (since 24.06) does not start it again, and keeps saying the model is ready.
_DEAD_STUB = ("Stub process", "is not healthy")


@dataclasses.dataclass
class _Rows:
    """One request's inputs as the ensemble takes them: texts, or (query, document) pairs."""

    texts: list[str]
    pairs: list[str] | None
    detect_truncation: bool
    max_doc_tokens: int | None = None  # rerank: each document cut to this many tokens first (Cohere's max_tokens_per_doc)

    def subset(self, indices: Sequence[int]) -> _Rows:
        pairs = [self.pairs[i] for i in indices] if self.pairs is not None else None
        return _Rows([self.texts[i] for i in indices], pairs, self.detect_truncation, self.max_doc_tokens)

    @property
    def lengths(self) -> list[int]:
        # Characters stand in for tokens when grouping by length; Triton tokenizes.
        if self.pairs is None:
            return [len(t) for t in self.texts]
        return [len(t) + len(p) for t, p in zip(self.texts, self.pairs, strict=True)]


_SPECIAL_TOKENS = 4  # what a tokenizer adds to a text or a pair: [CLS] a [SEP] b [SEP], <s> a </s></s> b </s>


def _calls(s: ModelSpec, lengths: list[int]) -> list[list[int]]:
    """Sort by length and cut into calls of the models' max_batch_size; no padding bound here: the
    tokenizer pads each call to its longest row, and the Python encoder regroups rows by real length.
    With shape buckets (a GPU) and an encoder that runs each call as it comes (ONNX Runtime backend),
    each call holds a bucket's number of rows, so that it meets few shapes (fos_runtime/padding.py).
    A ragged encoder shapes its own runs: there a round is as few calls as max_batch_size allows, each
    one Triton request less through the ensemble, the tokenizer and the encoder."""
    plan = plan_for(s.device)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if s.ragged:
        return [order[k : k + plan.max_rows] for k in range(0, len(order), plan.max_rows)]
    # A call is padded to its longest row: at most max_tokens of that, so that one long document among many short
    # ones does not make a call of 256 rows x 8,192 tokens (ruri v3's context) for a GPU's memory. Lengths are
    # characters here, more than the tokens of Japanese text; the tokenizer model adds the special tokens and rounds
    # the width up to its bucket. (A tokenizer that falls back to bytes can make a rare character several tokens.)
    limit = plan.bucket_limit(s.max_length)

    def padded(n: int) -> int:
        width = min(n + _SPECIAL_TOKENS, s.max_length)
        return bucket_length(width, limit) if limit is not None else width

    calls: list[list[int]] = []
    call: list[int] = []
    for i in order:  # ascending: the row added is the call's widest
        if call and (len(call) == plan.max_rows or (len(call) + 1) * padded(lengths[i]) > plan.max_tokens):
            calls.append(call)
            call = []
        call.append(i)
    if call:
        calls.append(call)
    if not plan.shape_buckets:
        return calls
    cut: list[list[int]] = []
    for call in calls:
        while call:
            size = max(b for b in ROW_BUCKETS if b <= len(call))
            cut.append(call[-size:])  # the longest rows first: sorted ascending, so from the end
            call = call[:-size]
    return cut


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to answer with when sibling calls failed together: the most telling one."""
    errors = list(group.exceptions)
    for kind in (BackendFailed, BackendTimeout, APIError):
        for exc in errors:
            if isinstance(exc, kind):
                return exc
    return errors[0]


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
        self.index: set[str] = set()  # the Triton models it said were ready at its last probe
        self.ready: set[str] = set()  # those it is asked for: the index, less any that answered NOT_FOUND since
        self.found: dict[str, ModelSpec] = {}  # its exported models, by served name, learnt from those
        self.told: set[str] = set()  # why it was not ready, each logged once until it is ready again
        self.unreadable: set[str] = set()  # its models whose spec could not be read, each logged once
        self.dead: set[str] = set()  # exported models (Triton names) one of whose Python stubs died there
        # One probe at a time: ready() probes too, and an older probe's answer must not land after a newer one's.
        self.probing = asyncio.Lock()


class TritonBackend:
    def __init__(
        self,
        urls: str | Sequence[str],
        timeout_s: float = TIMEOUT_S,
        probe_s: float = PROBE_S,
        rounds_in_flight: int | None = None,
    ):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one Triton endpoint is needed")
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.rounds_in_flight = rounds_in_flight  # per model and endpoint; None: the model's batching plan
        self.endpoints: list[_Endpoint] = []  # made in start(): grpc.aio binds to the running loop
        self._specs: dict[str, ModelSpec] = {}
        self._rounds: dict[str, Coalescer[_Rows, Output]] = {}
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
        for rounds in self._rounds.values():
            await rounds.close()
        await asyncio.gather(*(e.client.close() for e in self.endpoints), return_exceptions=True)

    async def _probe(self, e: _Endpoint) -> bool:
        async with e.probing:
            return await self._probe_now(e)

    async def _probe_now(self, e: _Endpoint) -> bool:
        """Is the endpoint up and serving exported models, and which? Learns them again whenever the endpoint comes
        back (a restarted Triton may serve other models, or the same ones exported again) or its ready models change
        (models loaded or unloaded while it runs). Endpoints may serve different models: each is asked only for its
        own. A readiness check is cheap even for a busy Triton: one that does not answer it in time is hung or gone."""
        timeout = min(PROBE_TIMEOUT_S, self.timeout_s)
        try:
            if not await e.client.is_server_ready(client_timeout=timeout):
                return self._mark(e, False)
            index = await e.client.get_model_repository_index(as_json=True, client_timeout=timeout)
            ready = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
            # A NOT_FOUND since the last probe makes it learn again too: the index may look the same while a model it
            # lists (an ensemble whose step was unloaded) cannot be served.
            if not e.healthy or ready != e.index or e.ready != e.index:
                e.found = await self._discover(e, ready)
                e.index, e.ready = ready, set(ready)
                self._learn()
            if not e.found:
                _once(
                    e.told, "none", f"Triton at {e.url} serves no model exported by fos export (ready: {sorted(ready) or 'none'})"
                )
            if e.dead:
                await self._ask_dead(e, timeout)
            return self._mark(e, bool(e.found))
        except Exception as exc:
            # Once per kind of failure (a starting Triton refuses every probe alike), not once per probe.
            kind = exc.status() if isinstance(exc, InferenceServerException) else type(exc).__name__
            _once(e.told, kind, f"Triton at {e.url} not ready: {exc}")
            return self._mark(e, False)

    async def _ask_dead(self, e: _Endpoint, timeout: float) -> None:
        """Each model whose stub died at ``e`` is asked one short text: it is served there again once it answers
        (tritonserver restarted between two probes, or its models loaded again)."""
        for s in [s for s in e.found.values() if s.name in e.dead]:
            texts = [specs.TEXT, specs.TEXT_PAIR] if s.task == "rerank" else [specs.TEXT]
            try:
                await e.client.infer(s.name, [_strings(name, ["a"]) for name in texts], client_timeout=timeout)
            except InferenceServerException:
                continue
            e.dead.discard(s.name)
            log.warning("Triton at %s serves %s again", e.url, s.served_name)

    async def _discover(self, e: _Endpoint, ready: set[str]) -> dict[str, ModelSpec]:
        found: dict[str, ModelSpec] = {}
        for name in sorted(ready):
            response = await e.client.get_model_config(name, client_timeout=self.timeout_s)
            try:
                s = spec_of(response.config)
            except (ValueError, KeyError, TypeError) as exc:  # one unreadable model must not hide the others
                _once(
                    e.unreadable,
                    f"{name}: {exc!r}",
                    f"Triton at {e.url}: {name}'s fos_spec cannot be read ({exc!r}); export it again",
                )
                continue
            if s is not None:
                found[s.served_name] = s
        return found

    def _learn(self) -> None:
        """The models served: those of every endpoint that answered, down or not (a model whose endpoints are down is
        unavailable, a 503, not unknown); where two endpoints hold different exports under one name, the first
        endpoint's, and only the endpoints holding that one are asked for it (``_order``)."""
        found: dict[str, ModelSpec] = {}
        for e in reversed(self.endpoints):
            found |= e.found
        if found != self._specs:
            log.info("Triton serves %s", sorted(found) or "no exported models")
        self._specs = found

    def _mark(self, e: _Endpoint, healthy: bool) -> bool:
        if healthy:
            e.told.clear()
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
            await asyncio.gather(*(self._probe(e) for e in self.endpoints))

    async def ready(self) -> bool:
        if not any(e.healthy for e in self.endpoints):
            await asyncio.gather(*(self._probe(e) for e in self.endpoints))
        return any(e.healthy for e in self.endpoints)

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def stats(self) -> dict[str, BatchingStats]:
        return {name: BatchingStats.of(r.stats, r.queued) for name, r in self._rounds.items()}

    def engines(self) -> dict[str, Engine]:
        return {}  # Triton's encoders say which engine they run in Triton's log

    def _order(self, s: ModelSpec, model: str) -> list[_Endpoint]:
        """Healthy endpoints that serve ``model`` (a Triton model of ``s``) as ``s``, rotated so successive calls start
        at different ones. Another export under the same name (a rolling re-export) would answer with another model."""
        healthy = [
            e
            for e in self.endpoints
            if e.healthy and model in e.ready and s.name not in e.dead and e.found.get(s.served_name, s) == s
        ]
        self._next += 1
        k = self._next % len(healthy) if healthy else 0
        return healthy[k:] + healthy[:k]

    async def _infer(self, s: ModelSpec, model: str, inputs: list, outputs: Sequence[str], timeout_s: float) -> list[np.ndarray]:
        last = f"no ready Triton endpoint serves {s.served_name} (its Triton model {model})"
        if dead := [e.url for e in self.endpoints if s.name in e.dead]:
            last = f"a Python stub of {s.served_name} died in Triton at {', '.join(dead)}: restart tritonserver"
        for e in self._order(s, model):
            try:
                result = await e.client.infer(
                    model,
                    inputs,
                    outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                    client_timeout=timeout_s,
                )
                return [result.as_numpy(o) for o in outputs]
            except InferenceServerException as exc:
                status = (exc.status() or "").upper()
                if _DEADLINE in status:
                    raise BackendTimeout(
                        f"Triton at {e.url} did not answer within {timeout_s:.0f}s; it is busy, or the request is too "
                        "large for its deadline (fos serve --triton-timeout)"
                    ) from exc
                if _NOT_FOUND in status:
                    e.ready.discard(model)  # this endpoint only: the probe learns its models again
                elif any(code in status for code in _UNREACHABLE):
                    self._mark(e, False)  # the probe takes it back when it is ready
                elif all(part in exc.message() for part in _DEAD_STUB):
                    # Every request for this model would fail there until tritonserver is restarted: the others'
                    # endpoints serve it meanwhile, and the probe asks this one again (_ask_dead).
                    if s.name not in e.dead:
                        e.dead.add(s.name)
                        log.error(
                            "Triton at %s: %s; Triton does not start a dead stub again, so %s fails there until "
                            "tritonserver is restarted (fos triton exits for its restart policy to do that)",
                            e.url,
                            exc.message(),
                            s.served_name,
                        )
                else:
                    raise BackendFailed(f"Triton failed: {exc.message()}") from exc
                last = f"Triton at {e.url} cannot serve {s.served_name}: {exc.message()}"
        raise BackendUnavailable(last)

    async def _fan_out(
        self, groups: list[list[int]], call: Callable[[list[int]], Coroutine[Any, Any, list[np.ndarray]]]
    ) -> list[np.ndarray]:
        """One call per group, concurrently; each output's rows put back in input order. A failed call
        cancels its siblings: their answers could not be used."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(call(g)) for g in groups]
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        parts = [t.result() for t in tasks]
        outputs = len(parts[0]) if parts else 0
        return [
            coalescing.in_order(groups, [part[k].reshape(len(g), -1) for g, part in zip(groups, parts, strict=True)])
            for k in range(outputs)
        ]

    def _deadline(self, calls: int) -> float:
        # The calls of a round queue behind each other in Triton: the last one waits for all of them.
        return self.timeout_s * max(calls, 1)

    async def _ensemble(self, s: ModelSpec, rows: _Rows) -> Output:
        """All of ``rows`` through the ensemble, in calls of at most max_batch_size rows."""
        groups = _calls(s, rows.lengths)
        deadline = self._deadline(len(groups))
        outputs = [specs.output_tensor(s.task), *_COUNTS]

        def call(g: list[int]) -> Coroutine[Any, Any, list[np.ndarray]]:
            inputs = [_strings(specs.TEXT, [rows.texts[i] for i in g])]
            if rows.pairs is not None:
                inputs.append(_strings(specs.TEXT_PAIR, [rows.pairs[i] for i in g]))
            options = [*_detect(len(g), rows.detect_truncation), *_doc_tokens(len(g), rows.max_doc_tokens)]
            return self._infer(s, s.name, [*inputs, *options], outputs, deadline)

        values, tokens, truncated = await self._fan_out(groups, call)
        return _output(values if s.task == "embed" else values.reshape(-1), tokens, truncated)

    async def _run_round(self, s: ModelSpec, jobs: Sequence[_Rows]) -> list[Output | BaseException]:
        caps = {j.max_doc_tokens for j in jobs}
        if len(caps) > 1:  # one cap per call: the tokenizer model takes one per request
            by_cap = [[k for k, j in enumerate(jobs) if j.max_doc_tokens == cap] for cap in caps]
            # Each cap's requests succeed or fail apart from the others', and every call ends with the round.
            parts = await asyncio.gather(
                *(self._run_round(s, [jobs[k] for k in group]) for group in by_cap), return_exceptions=True
            )
            answers: list[Output | BaseException] = [ValueError("unanswered")] * len(jobs)
            for group, part in zip(by_cap, parts, strict=True):
                for n, k in enumerate(group):
                    answers[k] = part if isinstance(part, BaseException) else part[n]
            return answers
        if len(jobs) == 1:
            return [await self._ensemble(s, jobs[0])]
        merged = _Rows(
            texts=[t for j in jobs for t in j.texts],
            pairs=[p for j in jobs for p in j.pairs or ()] if s.task == "rerank" else None,
            detect_truncation=any(j.detect_truncation for j in jobs),
            max_doc_tokens=jobs[0].max_doc_tokens,
        )
        try:
            out = await self._ensemble(s, merged)
        except BackendFailed:
            # Triton refused something in the round: ask again request by request, so that only the request
            # at fault fails. (Unreachable or late Tritons fail every request alike; no second try.)
            return list(await asyncio.gather(*(self._ensemble(s, j) for j in jobs), return_exceptions=True))
        results: list[Output | BaseException] = []
        start = 0
        for j in jobs:
            end = start + len(j.texts)
            results.append(Output(out.values[start:end], out.tokens[start:end], out.truncated[start:end]))
            start = end
        return results

    def _rounds_for(self, s: ModelSpec) -> Coalescer[_Rows, Output]:
        rounds = self._rounds.get(s.served_name)
        if rounds is None:
            plan = plan_for(s.device)

            async def run(jobs: Sequence[_Rows], wanted: Callable[[], bool]) -> list[Output | BaseException]:
                # The model as Triton serves it now (exported again and Triton restarted, it may differ). A round's
                # calls run at once in Triton: nothing to stop between them.
                return await self._run_round(self._specs.get(s.served_name, s), jobs)

            rounds = Coalescer(
                run,
                max_rows=1 << 30,
                max_cost=plan.round_tokens,
                concurrency=(self.rounds_in_flight or plan.rounds_in_flight) * len(self.urls),
                name=s.served_name,
            )
            rounds.start()
            self._rounds[s.served_name] = rounds
        return rounds

    async def _submit(self, s: ModelSpec, rows: _Rows) -> Output:
        return await self._rounds_for(s).submit_request(rows, rows.lengths, rows.subset, _joined)

    async def embed(
        self, s: ModelSpec, texts: Sequence[str] | None = None, encoded: Encoded | None = None, detect_truncation: bool = False
    ) -> Output:
        if encoded is not None:
            ids = encoded
            # To a length bucket where the plan has them (a GPU), as the tokenizer model pads text: the encoder's
            # warm-up ran those widths, and ONNX Runtime's CUDA provider spends ~47 ms on each width it has not seen.
            limit = plan_for(s.device).bucket_limit(s.max_length)

            def by_ids(g: list[int]) -> Coroutine[Any, Any, list[np.ndarray]]:
                feeds = pad(ids, s.pad_token_id, s.encoder_inputs, order=g, length_limit=limit)
                inputs = [_ints(n, a) for n, a in feeds.items()]
                return self._infer(s, specs.encoder_model(s.name), inputs, [specs.EMBEDDING], self._deadline(len(groups)))

            groups = _calls(s, ids.lengths)
            (vectors,) = await self._fan_out(groups, by_ids)
            return Output.of(vectors, ids)
        return await self._submit(s, _Rows(list(texts or []), None, detect_truncation))

    async def rerank(
        self,
        s: ModelSpec,
        query: str,
        documents: Sequence[str],
        detect_truncation: bool = False,
        max_doc_tokens: int | None = None,
    ) -> Output:
        docs = list(documents)
        return await self._submit(s, _Rows([query] * len(docs), docs, detect_truncation, max_doc_tokens))


_COUNTS = (specs.NUM_TOKENS, specs.TRUNCATED)


def _once(told: set[str], key: str, message: str) -> None:
    """A warning once for each ``key`` in ``told`` (an endpoint's, cleared as it suits): probes repeat every second."""
    if key not in told:
        told.add(key)
        log.warning("%s", message)


def _joined(groups: list[list[int]], outs: list[Output]) -> Output:
    return Output(
        coalescing.in_order(groups, [o.values for o in outs]),
        coalescing.in_order(groups, [np.asarray(o.tokens) for o in outs]).tolist(),
        coalescing.in_order(groups, [np.asarray(o.truncated) for o in outs]).tolist(),
    )


def _output(values: np.ndarray, tokens: np.ndarray, truncated: np.ndarray) -> Output:
    return Output(values, tokens.reshape(-1).tolist(), truncated.reshape(-1).astype(bool).tolist())
