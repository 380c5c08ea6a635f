"""The HTTP API: the classic tutorial route, OpenAI-compatible /v1, /health and /metrics over one chat backend."""
# The backend is bound to app.state in one of three ways: passed in ready (tests, embedding, and API-only mode, whose
# `serve` loads it first: the port serves once the model is loaded, and a load that fails is the CLI's one error
# line), loaded in the lifespan (create_app(settings) alone), or taken from a shared BackendLoader when it is ready
# (the one-port server: the port opens at once, /health reports the load and requests get 503 until then).

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from internlm_app.api.auth import BearerAuthMiddleware
from internlm_app.api.errors import install_error_handlers
from internlm_app.api.metrics import Metrics
from internlm_app.api.middleware import (
    BodyLimitMiddleware,
    JSONCORSMiddleware,
    RequestLogMiddleware,
    SelfCallGuardMiddleware,
)
from internlm_app.api.model_gate import ModelGateMiddleware, bind_backend
from internlm_app.api.routes_classic import router as classic_router
from internlm_app.api.routes_completions import router as completions_router
from internlm_app.api.routes_openai import router as openai_router
from internlm_app.api.routes_system import router as system_router
from internlm_app.backends.factory import BackendLoader
from internlm_app.chat_types import ChatBackend
from internlm_app.runtime import gpu
from internlm_app.settings import Settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, backend: ChatBackend | None = None, loader: BackendLoader | None = None
) -> FastAPI:
    """The API app: over `backend` when given, else over `loader`'s backend once it has loaded (while it loads,
    requests that need the model get 503 with Retry-After), else over one loaded in the lifespan from settings."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = None
        if backend is not None:
            bind_backend(app, backend)
        elif loader is not None:
            loader.start()  # no wait: a page and /health show the progress, requests get 503 until it is done
        else:
            from internlm_app.backends.factory import create_backend

            loaded = await to_thread.run_sync(create_backend, settings)
            bind_backend(app, loaded)
        try:
            yield
        finally:
            app.state.backend = None
            if loaded is not None:
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
    app.state.backend, app.state.loader = None, loader
    install_error_handlers(app)
    app.include_router(classic_router)
    app.include_router(openai_router)
    app.include_router(completions_router)
    app.include_router(system_router)
    # add_middleware wraps: the last added runs first
    # (log -> self-call guard -> CORS -> auth -> body limit -> model gate -> routes).
    if loader is not None:
        app.add_middleware(ModelGateMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(BearerAuthMiddleware, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(
            JSONCORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    if settings.backend == "openai":  # only a server that forwards replies can call itself
        app.add_middleware(SelfCallGuardMiddleware)
    app.add_middleware(RequestLogMiddleware, metrics=metrics, log_prompts=settings.log_prompts)
    return app
