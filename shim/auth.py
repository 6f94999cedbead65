"""Optional API keys. Off by default: then any, an empty or no ``Authorization`` header passes
(Dify sends ``Authorization:`` with nothing when no key is set)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized, error_response

ENV_KEYS = "FOS_API_KEYS"  # comma-separated
OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key


def load_keys(keys: Iterable[str] = (), key_file: Path | None = None, environ: dict | None = None) -> list[str]:
    found = [k.strip() for k in keys if k.strip()]
    env = (environ if environ is not None else os.environ).get(ENV_KEYS, "")
    found += [k.strip() for k in env.split(",") if k.strip()]
    if key_file is not None:
        found += [line.strip() for line in Path(key_file).read_text().splitlines() if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(found))


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Compare against every key, in constant time for each, so timing tells nothing.
        return any([hmac.compare_digest(token, k) for k in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        if self._allowed(header):
            await self.app(scope, receive, send)
            return
        response = error_response(Unauthorized("Incorrect or missing API key: send Authorization: Bearer <key>"))
        await response(scope, receive, send)
