"""One process, one port, one model: the Streamlit web app and the HTTP API served together (`python -m internlm_app
serve`), built on Streamlit's ASGI entry point `st.App`.

- `/` (GET) and the pages: the web app, behind INTERNLM_WEB_PASSWORD (a cookie set at /login) when it is set;
- `POST /`, `/v1/*`, `/health`, `/metrics`, `/docs`: the API, behind INTERNLM_API_KEYS when they are set;
- one BackendLoader, started in the lifespan, serves both: the page shows its progress, the API answers 503 until
  it is done, and `/health` reports it.
"""

from __future__ import annotations

import logging
import tomllib
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import streamlit as st
import uvicorn
from starlette.middleware import Middleware
from starlette.responses import RedirectResponse
from starlette.routing import Route

from internlm_app.api.app import create_app
from internlm_app.api.server import MAX_CONNECTIONS, bind_socket
from internlm_app.backends.factory import BackendLoader
from internlm_app.server.routing import LOGIN_PATH, OnePortRouter, WebGate
from internlm_app.server.web_login import STATE_FILE, WebLogin
from internlm_app.settings import Settings
from internlm_app.web.hosting import Hosting, hosting
from internlm_app.web.resources import live_replies

__all__ = ["APP_SCRIPT", "create_server", "serve"]

log = logging.getLogger(__name__)

SHUTDOWN_REPLY_SECONDS = 5.0  # how long a shutdown waits for the web replies it stopped to save their text

# The entry script; its pages are in web/views/ beside it. Never a folder named "pages" there: Streamlit would run a
# page of it directly on the first visit to its URL after a start (its old multipage mode), without the navigation
# (the sidebar then lists "app, chat, history, status", untranslated).
APP_SCRIPT = Path(__file__).resolve().parents[1] / "web" / "app.py"
STREAMLIT_CONFIG = APP_SCRIPT.with_name("streamlit.toml")


def create_server(settings: Settings | None = None, loader: BackendLoader | None = None) -> st.App:
    """The one-port ASGI app; the model starts loading in its lifespan (through `loader`, one per process)."""
    settings = settings or Settings()
    loader = loader or BackendLoader(settings)
    api = create_app(settings, loader=loader)
    login = None
    if settings.web_password is not None:
        login = WebLogin(settings.web_password, state_file=Path(settings.db_path).with_name(STATE_FILE))

    @asynccontextmanager
    async def lifespan(_app: st.App):
        with hosting(Hosting(settings, loader, login)):  # the pages take the settings and the loader from here
            async with api.router.lifespan_context(api):  # starts the load; the API binds the backend when ready
                try:
                    yield
                finally:
                    # Shutting down: the web replies still generating stop now and save their text as stopped
                    # (their threads would otherwise die with the process, losing up to 2 s of text each).
                    left = await anyio.to_thread.run_sync(live_replies().stop_all, SHUTDOWN_REPLY_SECONDS)
                    if left:
                        log.warning("%d web replies did not end in %.0f s at shutdown", left, SHUTDOWN_REPLY_SECONDS)

    async def no_login(_request) -> RedirectResponse:
        return RedirectResponse("/", status_code=303)

    routes = login.routes() if login is not None else [Route(LOGIN_PATH, no_login)]
    middleware = [Middleware(OnePortRouter, api=api), Middleware(WebGate, login=login)]
    return st.App(APP_SCRIPT, lifespan=lifespan, routes=routes, middleware=middleware)


def apply_streamlit_config(path: Path = STREAMLIT_CONFIG) -> list[str]:
    """The app's Streamlit options (web/streamlit.toml; the checkout's .streamlit/config.toml links to it) wherever
    `serve` starts, also from an installed package: an option a config file or flag of the user set is kept. Returns
    the options set here."""
    from streamlit import config

    applied = []
    for section, options in tomllib.loads(path.read_text()).items():
        for name, value in options.items():
            key = f"{section}.{name}"
            if config.get_where_defined(key) == config.ConfigOption.DEFAULT_DEFINITION:
                config.set_option(key, value, where_defined=str(path))
                applied.append(key)
    return applied


def serve(settings: Settings | None = None, loader: BackendLoader | None = None) -> None:
    """Serve the web app and the API on settings.host:settings.port until interrupted; `loader` loads the one
    backend (by default `BackendLoader(settings)`: the model the settings name, through `create_backend`)."""
    from streamlit import config

    settings = settings or Settings()
    apply_streamlit_config()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    public = settings.host not in ("127.0.0.1", "localhost", "::1")
    if public and settings.web_password is None:
        log.warning("the web app listens on %s without a password: set INTERNLM_WEB_PASSWORD", settings.host)
    if public and not settings.api_keys:
        log.warning("the API listens on %s without API keys: set INTERNLM_API_KEYS to require one", settings.host)
    sock = bind_socket(settings.host, settings.port)  # a port in use fails now, before anything loads
    app = create_server(settings, loader)
    log.info("serving the web app and the API on http://%s:%d (one model, loading now)", settings.host, settings.port)
    server_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=5,
        limit_concurrency=MAX_CONNECTIONS,  # a browser tab holds one websocket of these
        ws="websockets-sansio",  # what `streamlit run` uses for st.App on uvicorn >= 0.44
        ws_max_size=int(config.get_option("server.maxMessageSize")) * 1024 * 1024,
        ws_per_message_deflate=bool(config.get_option("server.enableWebsocketCompression")),
    )
    uvicorn.Server(server_config).run(sockets=[sock])
