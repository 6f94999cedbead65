"""The FastAPI application: thin routes over the service."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import __version__, errors
from .auth import APIKeyMiddleware
from .backends.base import Backend
from .protocol import EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelList, RerankRequest, RerankResponse
from .service import Limits, Service

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def create_app(backend: Backend, limits: Limits | None = None, api_keys: list[str] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        app.state.service = Service(backend, limits)
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(title="fake-openai-server", version=__version__, lifespan=lifespan)
    errors.install(app)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=api_keys)

    def service(request: Request) -> Service:
        return request.app.state.service

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
    @app.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS, include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request):
        return JSONResponse(await service(request).embeddings(body))

    @app.post("/v1/rerank", response_model=RerankResponse, responses=_ERRORS)
    @app.post("/rerank", response_model=RerankResponse, responses=_ERRORS, include_in_schema=False)
    async def rerank(body: RerankRequest, request: Request):
        return JSONResponse(await service(request).rerank(body))

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request):
        return JSONResponse(service(request).models())

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if await backend.ready():
            return {"status": "ok"}
        return errors.envelope(503, "not ready: models are loading or the inference server is down", "server_error", None, "not_ready")

    return app
