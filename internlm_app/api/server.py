"""Run the API with uvicorn: `serve` for the CLI, `running_server` for a background thread (tests, embedding)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from internlm_app.errors import UserFacingError
from internlm_app.settings import Settings

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512  # connections and requests in flight at once (request bodies also stall out after 30 s)


class PortInUseError(UserFacingError):
    """The address cannot be listened on; raised before the model loads, not after."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before anything is loaded. Raises PortInUseError with what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port} ({exc.strerror}): {_bind_advice(exc)}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _bind_advice(exc: OSError) -> str:
    """What to do about a failed bind, by its cause (errno, or getaddrinfo's error for a name)."""
    if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):  # (EINVAL: fe80::1)
        return (
            "this machine has no such address; use 0.0.0.0 (every interface), 127.0.0.1 (this machine only) or "
            "one of its own addresses with --host / INTERNLM_HOST"
        )
    if exc.errno == errno.EACCES:
        return "ports below 1024 need root; choose another port with --port / INTERNLM_PORT (6006 is the default)"
    return (
        "another program, perhaps an earlier run, uses it; stop it, or choose another port with --port / INTERNLM_PORT"
    )


def serve(settings: Settings | None = None) -> None:
    """Serve the API on settings.host:settings.port until interrupted (`python -m internlm_app api`)."""
    from internlm_app.api.app import create_app

    settings = settings or Settings()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.api_keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the API listens on %s without API keys: set INTERNLM_API_KEYS to require one", settings.host)
    sock = bind_socket(settings.host, settings.port)  # a port in use fails now, not after the model has loaded
    try:
        # Loaded here rather than in the app's lifespan: a model that cannot load (a wrong path, no GPU, a full
        # disk) is the CLI's one error line (UserFacingError), not uvicorn's traceback and "startup failed".
        from internlm_app.backends.factory import create_backend
        from internlm_app.load_progress import TerminalProgress

        backend = create_backend(settings, progress=TerminalProgress(log))  # the download, conversion and load
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        create_app(settings, backend=backend),
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=5,  # an idle kept-alive connection closes after 5 s
        limit_concurrency=MAX_CONNECTIONS,  # beyond it uvicorn answers 503 at once: slow clients cannot pile up
    )
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` from a background thread (port 0: a free one); yields the base URL, stops the server on exit."""
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="internlm-api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the API server did not start on {host}:{port} (see the log)")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
