"""Which requests of the one port go to the API and which to the web app, and the web app's password gate."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from internlm_app.web.hosting import CookieCheck

LOGIN_PATH, LOGOUT_PATH = "/login", "/logout"
# Streamlit's own paths that stay closed: its metrics (session counts, cache memory) are nobody's business here; the
# app's metrics are the API's /metrics, behind the API keys.
CLOSED_WEB_PATHS = frozenset({"/_stcore/metrics"})
# Open without the password: the login form, and Streamlit's liveness probe (it answers "ok" and nothing else).
OPEN_WEB_PATHS = frozenset({LOGIN_PATH, LOGOUT_PATH, "/_stcore/health"})


def api_paths(api: FastAPI) -> frozenset[str]:
    """The API's fixed paths (/health, /metrics, /docs, ...), read from its schema and its own routes (the docs);
    `/` is routed by method."""
    paths = set(api.openapi()["paths"]) | {path for route in api.routes if (path := getattr(route, "path", None))}
    return frozenset(paths - {"/"})


def api_mounts(api: FastAPI) -> tuple[str, ...]:
    """Prefixes the API serves everything under: its mounts (the offline docs' assets), and /v1."""
    return ("/v1/", *(f"{route.path}/" for route in api.routes if isinstance(route, Mount)))


def is_api_request(method: str, path: str, paths: frozenset[str], prefixes: tuple[str, ...] = ("/v1/",)) -> bool:
    """`POST /` (the classic contract), everything under /v1 (and the API's mounts), and the API's own paths; the
    rest is the web app."""
    if path == "/":
        return method not in ("GET", "HEAD")  # GET / is the page; POST (and a CORS preflight) is the classic API
    return path == "/v1" or path.startswith(prefixes) or path in paths


class OnePortRouter:
    """Sends API requests to the FastAPI app (its own auth, limits, errors and lifespan-bound backend); the rest goes
    on to Streamlit. Runs first of all the middleware, so the web app's gate never sees an API request and API keys
    never open a web path."""

    def __init__(self, app: ASGIApp, api: FastAPI):
        self.app, self.api, self.paths, self.prefixes = app, api, api_paths(api), api_mounts(api)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api_request(scope["method"], scope["path"], self.paths, self.prefixes):
            await self.api(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def safe_next(target: str | None) -> str:
    """A path on this server to return to after logging in; anything else (another host, a scheme) becomes `/`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    path = target.split("?")[0].split("#")[0].rstrip("/")
    return "/" if path in (LOGIN_PATH, LOGOUT_PATH) else target  # /logout/ too: never log out right after logging in


class WebGate:
    """Everything of the web app (the page, its websocket, media, downloads, uploads, static files) needs the login
    cookie when a web password is set; Streamlit's metrics are closed always. Without the cookie a page visit is
    redirected to /login, the websocket is refused and anything else gets 401."""

    def __init__(self, app: ASGIApp, login: CookieCheck | None):
        self.app, self.login = app, login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in CLOSED_WEB_PATHS:
            await self._refuse(scope, receive, send, PlainTextResponse("Not Found", status_code=404))
            return
        if self.login is None or path in OPEN_WEB_PATHS:
            await self.app(scope, receive, send)
            return
        if self.login.verify(HTTPConnection(scope).cookies.get(self.login.cookie_name)):
            await self.app(scope, receive, send)
            return
        accepts_html = "text/html" in dict(scope.get("headers", [])).get(b"accept", b"").decode("latin-1")
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and accepts_html:
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            response = RedirectResponse(f"{LOGIN_PATH}?next={quote(safe_next(target), safe='')}", status_code=303)
        else:
            response = PlainTextResponse("log in first: the web password is required (/login)", status_code=401)
        await self._refuse(scope, receive, send, response)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake gets 403
        else:
            await response(scope, receive, send)
