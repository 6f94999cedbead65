"""Errors, typed once, each with its HTTP status, rendered in OpenAI's envelope by one function."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .protocol import ErrorBody, ErrorResponse

log = logging.getLogger("fos.errors")


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] | None = dict(self.default_headers) or None
        if code is not None:
            self.code = code


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(APIError):
    # What OpenAI answers for an unknown model.
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ClientDisconnected(APIError):
    status = 499  # nginx's "client closed request"; logged and counted, never read
    type = "invalid_request_error"
    code = "client_disconnected"


class Overloaded(APIError):
    # The openai client retries a 429 after Retry-After seconds.
    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    default_headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BackendUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "backend_unavailable"


class NotReady(APIError):
    status = 503
    type = "server_error"
    code = "not_ready"


class ShuttingDown(APIError):
    # A request still running when the server's graceful shutdown timeout ends.
    status = 503
    type = "server_error"
    code = "shutting_down"


class BackendFailed(APIError):
    status = 502
    type = "server_error"
    code = "backend_error"


class BackendTimeout(APIError):
    status = 504
    type = "server_error"
    code = "backend_timeout"


class Internal(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


class NonFiniteOutput(APIError):
    """The model computed NaN or infinity for an input. It would again: the openai client, which retries 5xx, is told
    not to (its ``x-should-retry`` header)."""

    status = 500
    type = "server_error"
    code = "non_finite_output"
    default_headers: ClassVar[dict[str, str]] = {"x-should-retry": "false"}


class RoutingError(APIError):
    """Starlette's own answers (404 unknown path, 405 wrong method, which keeps its Allow header)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = "invalid_request_error" if status < 500 else "server_error"
        self.headers = headers


def error_response(exc: APIError) -> JSONResponse:
    """The one rendering of every error: OpenAI's envelope, the error's status and headers."""
    body = ErrorResponse(error=ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code))
    return JSONResponse(status_code=exc.status, content=body.model_dump(), headers=exc.headers)


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` before they are read whole, announced or chunked."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> JSONResponse:
        return error_response(PayloadTooLarge(f"the request body is larger than {self.max_bytes} bytes"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return
        received = 0
        started = refused = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    # Answer now; the app then sees a client that went away and its answer is dropped.
                    refused = True
                    await self._refusal()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise


class LastResortMiddleware:
    """Every request that has not begun its answer ends with one in the envelope, and ends there:

    - uvicorn cancels the requests still running when ``--graceful-timeout`` ends; without this, each logs a traceback
      and its client gets uvicorn's ``500 text/plain``. Each gets a 503 instead, and one log line.
    - a bug's exception: Starlette's last-resort handler answers and then raises again, and uvicorn closes the
      connection without a ``Connection: close``, so a pooled client's next request on it fails, a request that did
      nothing wrong. It gets a 500 here, and the connection stays."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        rid = scope.get("state", {}).get("request_id", "-")
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # Nothing else cancels a request's task: a client that goes away cancels only its work
            # (app.until_disconnected). Swallowed, the task ends here, as uvicorn meant it to.
            log.warning("%s %s (request %s) cut off by the graceful shutdown timeout: 503", scope["method"], scope["path"], rid)
            if not started:
                await error_response(ShuttingDown("the server is shutting down; retry the request"))(scope, receive, send)
        except Exception:
            if started:  # half an answer is out: only closing the connection can end it
                raise
            log.exception("unhandled error (request %s)", rid)
            await error_response(Internal("internal error"))(scope, receive, send)


def _fields(loc: tuple) -> list[str]:
    return [str(p) for p in loc if p != "body"]


def _validation_param(loc: tuple) -> str | None:
    """The top-level field at fault: 'documents', not 'documents.0.RerankDocument.text'."""
    fields = _fields(loc)
    return fields[0] if fields else None


# Where pydantic would name one member of a union, say what the field accepts.
_FIELD_MESSAGES = {
    "input": "input must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "documents": "documents must be a list of strings or of objects with a 'text' string",
}
_PATH_FIELD_MESSAGES = {("/v2/rerank", "documents"): "documents must be a list of strings (Cohere's v2 rerank)"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # FastAPI's default is a 422 with its own body; OpenAI clients expect 400 and the envelope.
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(InvalidRequest("the request body is not valid JSON", code="invalid_json"))
        loc = tuple(first.get("loc", ()))
        if loc == ("body",) and "json" not in request.headers.get("content-type", ""):
            return error_response(
                InvalidRequest("send the body as JSON, with Content-Type: application/json", code="invalid_json")
            )
        if loc == ("body",) and first.get("type") == "missing":
            return error_response(InvalidRequest("the request body is empty: send a JSON object", code="invalid_json"))
        param = _validation_param(loc)
        # An empty list fails every member of the union: the list members' failure says what is wrong.
        empty = any(
            e.get("type") == "too_short" and len(f := _fields(tuple(e.get("loc", ())))) <= 2 and f[:1] == [param] for e in errors
        )
        message = (f"{param} must not be an empty list" if param and empty else None) or (
            _PATH_FIELD_MESSAGES.get((request.url.path, param or ""))
            or _FIELD_MESSAGES.get(param or "")
            or (f"{param}: {first.get('msg')}" if param else str(first.get("msg")))
        )
        return error_response(InvalidRequest(message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's 400 for a body the client never finished
            return error_response(ClientDisconnected("the client closed the connection during the upload"))
        # FastAPI's 400 for a body json.loads refused: no UTF-8 (a ValueError), too deep (RecursionError).
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            return error_response(
                InvalidRequest(
                    f"the request body is not valid JSON in UTF-8 ({type(exc.__cause__).__name__})", code="invalid_json"
                )
            )
        return error_response(RoutingError(exc.status_code, str(exc.detail), getattr(exc, "headers", None)))

    # Only what escapes the outermost middleware (RequestContextMiddleware) comes here, to Starlette's
    # ServerErrorMiddleware: a route's errors end in LastResortMiddleware. Its answer too is in the envelope.
    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(Internal("internal error"))
