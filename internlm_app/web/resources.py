"""Objects shared by every session of the process (`process_wide`: never dropped); each one is thread-safe."""

from __future__ import annotations

from pathlib import Path

from internlm_app.backends.factory import BackendFactory, BackendLoader, create_backend, fingerprint
from internlm_app.settings import Settings
from internlm_app.store.db import ConversationStore
from internlm_app.web.process_wide import process_wide
from internlm_app.web.reply import LiveReplies

_backend_factory: BackendFactory = create_backend


def use_backend_factory(create: BackendFactory) -> None:
    """Web-only mode (`streamlit run app.py`) loads its backends with `create` instead of `create_backend`, for a
    launcher that starts Streamlit in its own process and calls this before the first page runs (the browser tests
    hold the load and pace the real model: tests/browser_server.py). The one-port server takes a loader instead:
    `server.serve(settings, loader)`."""
    global _backend_factory
    _backend_factory = create


@process_wide
def _loader(key: str, _settings: Settings) -> BackendLoader:
    return BackendLoader(_settings, create=_backend_factory)


def backend_loader(settings: Settings) -> BackendLoader:
    """The one loader (and so the one model) per distinct load configuration, shared by all sessions."""
    return _loader(fingerprint(settings), settings)


@process_wide
def _store(path: str) -> ConversationStore:
    return ConversationStore(path)


def conversation_store(settings: Settings) -> ConversationStore:
    """The SQLite store at settings.db_path (one connection per thread inside)."""
    return _store(str(Path(settings.db_path).expanduser()))


@process_wide
def live_replies() -> LiveReplies:
    """The process-wide set of replies being generated."""
    return LiveReplies()
