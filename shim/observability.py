"""Prometheus metrics, request ids and access logs.

Every app gets its own registry (no process-global state), served at ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = "x-request-id"
INFERENCE_ROUTES = frozenset({"/v1/embeddings", "/embeddings", "/v1/rerank", "/rerank", "/v2/rerank"})
ROUTES = INFERENCE_ROUTES | {"/v1/models", "/health", "/metrics"}
access_log = logging.getLogger("fos.access")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fos_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "fos_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.inputs = Counter("fos_inputs", "Inputs embedded or reranked", ["model"], registry=r)
        self.tokens = Counter("fos_tokens", "Tokens processed (after truncation)", ["model"], registry=r)
        self.truncated = Counter(
            "fos_truncated_inputs", "Inputs cut to the model's context (truncation on: the default)", ["model"], registry=r
        )
        self.in_flight = Gauge("fos_inputs_in_flight", "Inputs admitted and not yet answered", registry=r)
        self.rejected = Counter("fos_overload_rejections", "Requests refused with 429", registry=r)

    def watch_backend(self, backend) -> None:
        """The backend's batching figures, read at scrape time."""
        if hasattr(backend, "stats"):
            self.registry.register(_BackendCollector(backend))


class _BackendCollector:
    def __init__(self, backend) -> None:
        self.backend = backend

    def collect(self):
        model = ["model"]
        rounds = CounterMetricFamily("fos_rounds", "Rounds of coalesced requests run", labels=model)
        requests = CounterMetricFamily(
            "fos_round_requests",
            "Requests answered by those rounds (a request larger than a round counts once a piece)",
            labels=model,
        )
        rows = CounterMetricFamily("fos_round_rows", "Inputs carried by those rounds", labels=model)
        depth = GaugeMetricFamily("fos_queue_depth", "Requests waiting for a round", labels=model)
        runs = CounterMetricFamily("fos_encoder_runs", "Padded batches run by the in-process encoder", labels=model)
        eff = GaugeMetricFamily("fos_padding_efficiency", "Real tokens / computed tokens (in-process encoder)", labels=model)
        busy = CounterMetricFamily("fos_encoder_seconds", "Time the in-process encoder computed", labels=model)
        engine = GaugeMetricFamily(
            "fos_engine_info",
            "The engine running the in-process encoder: its compute precision, the exported file's precision, each "
            "run's threads and the runs computed at once",
            labels=["model", "engine", "compute_precision", "export_precision", "threads", "streams"],
        )
        exported = {s.served_name: s.precision for s in self.backend.specs()}
        for name, e in self.backend.engines().items():
            labels = [name, e.choice.engine, e.choice.compute, exported.get(name, ""), str(e.threads), str(e.streams)]
            engine.add_metric(labels, 1)
        for name, s in self.backend.stats().items():
            rounds.add_metric([name], s.rounds)
            requests.add_metric([name], s.requests)
            rows.add_metric([name], s.rows)
            depth.add_metric([name], s.queued)
            if s.encoder_runs is not None:
                runs.add_metric([name], s.encoder_runs)
            if s.padding_efficiency is not None:
                eff.add_metric([name], s.padding_efficiency)
            if s.encoder_seconds is not None:
                busy.add_metric([name], s.encoder_seconds)
        yield from (rounds, requests, rows, depth, runs, eff, busy, engine)


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-Id`` or a new one), echoes it in the
    response, counts and times the request and writes one structured access-log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(REQUEST_ID.encode(), b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID.encode(), rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            access_log.info(
                json.dumps(
                    {
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "ms": round(seconds * 1000, 2),
                    }
                )
            )
