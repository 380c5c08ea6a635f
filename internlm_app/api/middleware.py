"""ASGI middleware: the request-body limit (413), CORS with JSON refusals, the self-call guard (508), and one log
line plus metrics per request."""

from __future__ import annotations

import logging
import time

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from internlm_app.api.errors import error_response
from internlm_app.api.metrics import Metrics
from internlm_app.backends.remote import PROCESS_ID, SELF_LOOP_MESSAGE, VIA_HEADER

log = logging.getLogger("internlm_app.api")

MAX_BODY_BYTES = 1 << 20


BODY_READ_SECONDS = 30.0  # the longest wait for the next part of a request body


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413 (by Content-Length or while the body arrives), a body that
    stalls for `read_seconds` with 408, and one that ends before its Content-Length (the client went away) with 400;
    never a 500 with a traceback. Once the body is complete, messages pass through untouched (disconnect checks)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, read_seconds: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.read_seconds = BODY_READ_SECONDS if read_seconds is None else read_seconds

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(scope["path"], 413, self._too_large())(scope, receive, send)
            return
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                with anyio.fail_after(self.read_seconds):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body stalled for {self.read_seconds:g} s") from None
            if message["type"] == "http.disconnect":
                raise HTTPException(400, "the request body ended before its Content-Length") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._too_large())  # FastAPI re-raises it while reading the body
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


class SelfCallGuardMiddleware:
    """Refuses with 508 (Loop Detected) a request sent by this process's own remote backend: its
    INTERNLM_OPENAI_BASE_URL points back at this server, and each reply would call the server again until every
    connection is taken. Installed on a server whose backend is remote; a loop through another process is not seen."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._header = VIA_HEADER.lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (self._header, PROCESS_ID.encode()) in scope.get("headers", []):
            await error_response(scope["path"], 508, SELF_LOOP_MESSAGE, code="self_call")(scope, receive, send)
            return
        await self.app(scope, receive, send)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, except that a refused preflight is the API's JSON error naming what was refused and the
    setting that allows it (Starlette answers "Disallowed CORS origin" in plain text)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if (
            headers is not None
            and scope["method"] == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        ):
            answer = self.preflight_response(request_headers=headers)
            if answer.status_code == 400:
                refused = bytes(answer.body).decode().removeprefix("Disallowed CORS ")
                message = (
                    f"CORS preflight refused: {refused} not allowed (origin {headers['origin']!r}; "
                    "INTERNLM_CORS_ORIGINS lists the allowed origins, and GET and POST are the allowed methods)"
                )
                kept = {k: v for k, v in answer.headers.items() if k not in ("content-length", "content-type")}
                await error_response(scope["path"], 400, message, headers=kept)(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away before the answer


class RequestLogMiddleware:
    """Logs one line per request (endpoint, status, tokens, latency) and counts it in the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_prompts: bool = False):
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        state = scope.setdefault("state", {})

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            if state.get("client_gone"):
                status = CLIENT_CLOSED_REQUEST  # whatever was sent after it went, nobody read it
            self.metrics.observe_request(scope["path"], status, seconds)
            log.info("%s", self._line(scope, status, seconds, state))

    def _line(self, scope: Scope, status: int, seconds: float, state: dict) -> str:
        line = f"{scope['method']} {scope['path']} {status} {seconds * 1000:.0f}ms"
        stats = state.get("reply_stats")
        if stats is not None:
            line += (
                f" prompt_tokens={stats.prompt_tokens} completion_tokens={stats.completion_tokens}"
                f" ttft={stats.time_to_first_token or 0:.3f}s tok/s={stats.tokens_per_second or 0:.1f}"
                f" queue={stats.queue_seconds:.3f}s finish={state.get('finish_reason', stats.finish_reason)}"
            )
        if state.get("end_user"):  # OpenAI's `user` field: who the request is for, to trace abuse
            line += f" user={state['end_user']!r}"
        if self.log_prompts and state.get("prompt") is not None:
            line += f" prompt={state['prompt']!r}"
        return line
