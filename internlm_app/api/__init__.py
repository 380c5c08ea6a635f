"""The HTTP API: the classic tutorial route, OpenAI-compatible /v1, /health and /metrics over one chat backend."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import anyio
from anyio import to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from .. import gpu
from ..chat_types import ChatBackend
from ..settings import Settings
from .auth import BearerAuthMiddleware
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, RequestLogMiddleware
from .routes_classic import router as classic_router
from .routes_completions import router as completions_router
from .routes_openai import router as openai_router
from .routes_system import router as system_router
from .server import running_server, serve

__all__ = ["create_app", "running_server", "serve"]

log = logging.getLogger(__name__)

SPARE_WORKER_THREADS = 8  # beyond one per queue place: requests refused with 503 and replies being closed


def create_app(settings: Settings | None = None, backend: ChatBackend | None = None) -> FastAPI:
    """The API app; the backend (settings.backend) is loaded in the lifespan unless a ready one is passed in."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if backend is None:
            from ..backend import create_backend

            loaded = await to_thread.run_sync(create_backend, settings)
        else:
            loaded = backend
        queue = getattr(loaded, "queue", None)
        places = settings.queue_limit if queue is None or queue.max_waiting is None else queue.max_waiting
        app.state.backend = loaded
        app.state.generation_limiter = anyio.CapacityLimiter(places + 1 + SPARE_WORKER_THREADS)
        metrics.watch_queue(queue)
        info = loaded.info
        log.info("serving %s (%s backend, on %s)", info.name, info.extra.get("backend", "local"), info.device)
        try:
            yield
        finally:
            app.state.backend = None
            if backend is None:
                del loaded
                gpu.clear_cache()

    # /docs and /redoc with Swagger UI's and ReDoc's assets served from the fastapi-offline package, not a CDN: a GPU
    # box without internet still shows them.
    app = FastAPIOffline(
        title="InternLM2 Chat API",
        description="Classic `POST /` (InternLM FastAPI tutorial) and OpenAI-compatible `/v1/chat/completions`.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.started_at = settings, metrics, time.time()
    install_error_handlers(app)
    app.include_router(classic_router)
    app.include_router(openai_router)
    app.include_router(completions_router)
    app.include_router(system_router)
    # add_middleware wraps: the last added runs first (log -> CORS -> auth -> body limit -> routes).
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(BearerAuthMiddleware, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(RequestLogMiddleware, metrics=metrics, log_prompts=settings.log_prompts)
    return app
