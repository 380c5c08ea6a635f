"""Which backend the API serves, and the gate that answers 503 while a shared backend is still loading or failed."""

from __future__ import annotations

import logging
from typing import cast

import anyio
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from internlm_app.api.errors import RETRY_AFTER_SECONDS, error_response, is_openai_path
from internlm_app.backends.factory import BackendLoader, LoadStatus
from internlm_app.chat_types import ChatBackend

log = logging.getLogger(__name__)

SPARE_WORKER_THREADS = 8  # beyond one per queue place: requests refused with 503 and replies being closed
LOAD_FAILED_HINT = (
    "Fix the cause (the server log has the details; `python -m internlm_app doctor` checks GPU, memory, model files "
    "and disk), then press Retry on the web page or restart the server."
)


def bind_backend(app: FastAPI, backend: ChatBackend) -> None:
    """Serve `backend` from now on: the routes, the generation thread limit and the queue metrics."""
    settings = app.state.settings
    queue = backend.queue
    places = settings.queue_limit if queue is None or queue.max_waiting is None else queue.max_waiting
    app.state.generation_limiter = anyio.CapacityLimiter(places + 1 + SPARE_WORKER_THREADS)
    app.state.metrics.watch_queue(queue)
    app.state.backend = backend
    info = backend.info
    log.info("serving %s (%s backend, on %s)", info.name, info.extra.get("backend", "local"), info.device)


def bound_backend(app: FastAPI) -> ChatBackend | None:
    """The backend requests are served by; a shared loader's is bound here by the first request after it loaded."""
    backend = app.state.backend
    loader: BackendLoader | None = app.state.loader
    if backend is None and loader is not None and loader.backend is not None:
        bind_backend(app, loader.backend)
        backend = loader.backend
    return backend


def load_message(status: LoadStatus) -> str:
    """What a request that needs the model is told while there is none."""
    if status.state == "failed":
        return f"the model failed to load: {(status.error or 'unknown error').rstrip('.')}. {LOAD_FAILED_HINT}"
    step = f" ({status.step})" if status.step else ""
    return f"the model is loading{step}, {status.elapsed:.0f} s so far: try again shortly (GET /health shows progress)"


def needs_model(method: str, path: str) -> bool:
    """Chat requests and /v1 (its model list names the model); /health, /metrics, the docs and GET / do not."""
    return is_openai_path(path) or method == "POST"


class ModelGateMiddleware:
    """With a shared loader: 503 (with Retry-After while loading) for requests that need a model before it is there."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = cast(FastAPI, scope.get("app"))  # Starlette puts the app in every request's scope
        if scope["type"] != "http" or not needs_model(scope["method"], scope["path"]) or bound_backend(api):
            await self.app(scope, receive, send)
            return
        status = api.state.loader.status()
        headers = None if status.state == "failed" else {"Retry-After": str(RETRY_AFTER_SECONDS)}
        code = "model_load_failed" if status.state == "failed" else "model_loading"
        response = error_response(scope["path"], 503, load_message(status), code=code, headers=headers)
        await response(scope, receive, send)
