"""The FastAPI application: thin routes over the service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__, errors
from .auth import APIKeyMiddleware
from .backends.base import Backend
from .observability import INFERENCE_ROUTES, Metrics, RequestContextMiddleware
from .protocol import (
    JSON,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    RerankV2Request,
    RerankV2Response,
)
from .service import Admission, Limits, Service

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 502, 503, 504)}


async def until_disconnected(request: Request, work: Coroutine):
    """Run ``work``, cancelling it if the client goes away: its queued inputs are then dropped and
    its Triton calls cancelled instead of computed for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the request itself is cut off (graceful shutdown): so is its work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise errors.ClientDisconnected("the client closed the connection")  # nobody reads this
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect, whenever it comes.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class AdmissionGate:
    """While the server is full, refuses inference requests before their bodies are read: parsing megabytes
    of JSON only to answer 429 would keep the event loop from everything else, health probes included."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in INFERENCE_ROUTES:
            try:
                self.admission.check(1)
            except errors.Overloaded as exc:
                await errors.error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(backend: Backend, limits: Limits | None = None, api_keys: list[str] | None = None) -> FastAPI:
    limits = limits or Limits()
    metrics = Metrics()
    metrics.watch_backend(backend)
    admission = Admission(limits.max_inputs_in_flight, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:  # a start that fails part-way (the second model's file bad) closes what it had started
            await backend.start()
            app.state.service = Service(backend, limits, metrics, admission)
            yield
        finally:
            await backend.close()

    app = FastAPI(title="fake-openai-server", version=__version__, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(errors.BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(AdmissionGate, admission=admission)
    if api_keys:  # outside the gate: a request without a key is a 401 however full the server is, never a 429
        app.add_middleware(APIKeyMiddleware, keys=api_keys)
    app.add_middleware(errors.LastResortMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every answer, 401s too

    def service(request: Request) -> Service:
        return request.app.state.service

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
    @app.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS, include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request):
        return JSON(await until_disconnected(request, service(request).embeddings(body)))

    @app.post("/v1/rerank", response_model=RerankResponse, responses=_ERRORS)
    @app.post("/rerank", response_model=RerankResponse, responses=_ERRORS, include_in_schema=False)
    async def rerank(body: RerankRequest, request: Request):
        ranking = await until_disconnected(request, service(request).rerank(body))
        return JSON(RerankResponse.of(ranking, body.return_documents))

    @app.post("/v2/rerank", response_model=RerankV2Response, responses=_ERRORS)
    async def rerank_v2(body: RerankV2Request, request: Request):
        return JSON(RerankV2Response.of(await until_disconnected(request, service(request).rerank(body))))

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request):
        return JSON(service(request).models())

    # The openai client's models.retrieve; ids hold a '/' (cl-nagoya/ruri-large).
    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model(model: str, request: Request):
        return JSON(await service(request).model(model))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if await backend.ready():
            return {"status": "ok"}
        return errors.error_response(errors.NotReady("not ready: models are loading or the inference server is down"))

    # HEAD too, on what monitors probe (curl -I, uptime checks): a 405 there reads as the service down. Not in the
    # schema, where it would be a second operation of the same id.
    for path, endpoint in (("/health", health), ("/v1/models", models)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    _document_errors_not_422(app)
    return app


def _document_errors_not_422(app: FastAPI) -> None:
    """Validation failures answer 400 in OpenAI's envelope: don't advertise FastAPI's 422."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
