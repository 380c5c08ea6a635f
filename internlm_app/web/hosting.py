"""What the one-port server hands to the pages: its settings, its backend loader and its login check.

Streamlit runs the page scripts in the server's process but gives them no handle on the ASGI app (no `app.state`), so
the one-port server (`python -m internlm_app serve`) publishes these objects here for as long as it runs. In web-only
mode (`streamlit run app.py`) nothing is published: the pages read the environment and load their own backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from internlm_app.backends.factory import BackendLoader
from internlm_app.settings import Settings


class CookieCheck(Protocol):
    """The one-port server's web login: whether a request's cookies carry a valid login."""

    cookie_name: str

    def verify(self, token: object) -> bool: ...


@dataclass(frozen=True)
class Hosting:
    """The one-port server's shared objects: one settings object and one loader (one model) for every face."""

    settings: Settings
    loader: BackendLoader
    login: CookieCheck | None  # set when INTERNLM_WEB_PASSWORD is: the page was reached through /login


_current: list[Hosting] = []


@contextmanager
def hosting(value: Hosting) -> Iterator[Hosting]:
    """Publish `value` to the pages until the block ends (the server's lifespan)."""
    _current.append(value)
    try:
        yield value
    finally:
        _current.remove(value)


def current() -> Hosting | None:
    """The running one-port server's objects, or None in web-only mode."""
    return _current[-1] if _current else None
