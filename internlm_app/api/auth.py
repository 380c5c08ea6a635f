"""Bearer-key check for every endpoint but the open ones (/health), when INTERNLM_API_KEYS is set."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from internlm_app.api.errors import error_response

OPEN_PATHS = frozenset({"/health"})


def key_matches(header: str | None, keys: list[bytes]) -> bool:
    """True when `header` is `Bearer <one of keys>`; every key is compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    return any([hmac.compare_digest(given, key) for key in keys])  # a list: no short cut that would leak which key


class BearerAuthMiddleware:
    """Answers 401 (JSON) unless the request carries one of the API keys."""

    def __init__(self, app: ASGIApp, keys: list[SecretStr], open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.keys = [k.get_secret_value().encode() for k in keys if k.get_secret_value()]
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if key_matches(headers.get("authorization"), self.keys):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send 'Authorization: Bearer <key>' (one of INTERNLM_API_KEYS)"
        response = error_response(scope["path"], 401, message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
