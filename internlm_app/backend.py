"""Pick the chat backend from settings: the in-process engine, or a remote OpenAI-compatible server."""

from __future__ import annotations

from .chat_types import ChatBackend
from .convert import Progress
from .settings import Settings


def create_backend(settings: Settings, progress: Progress | None = None) -> ChatBackend:
    """The backend the settings ask for (INTERNLM_BACKEND)."""
    if settings.backend == "openai":
        from .remote import RemoteBackend

        remote = RemoteBackend(settings)
        remote.discover_model()
        return remote
    from .engine import ChatEngine

    return ChatEngine.load(settings, progress=progress)
