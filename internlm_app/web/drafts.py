"""What a page had typed when it found its login gone (logged out in another tab, the login expired, the password
changed): kept in this process for a while under a random id that the way back to the login names (`?draft=<id>`),
and put back into its boxes when that page opens again logged in. The one-port server's login is a cookie checked on
every run, and logging in again loads a new page (a new session), so the session itself cannot carry it.

The text never leaves the server's memory: only the id is in the URL, and only a logged-in page takes it back.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import streamlit as st

from internlm_app.web import state
from internlm_app.web.process_wide import process_wide

DRAFT_PARAM = "draft"
KEEP_SECONDS = 3600.0  # a draft not taken back within an hour is dropped
MAX_DRAFTS = 32  # the oldest goes first beyond this (a draft may hold the files of the attachments panel)
_LOGGED_IN_KEY = "_was_logged_in"  # this session has been past the gate: only its typing is kept
_KEPT_KEY = "_draft_kept"  # the id of the draft this session's refused runs keep


class Drafts:
    """Drafts by id: {session key: value}, each taken back once. Bounded in count and age; thread-safe."""

    def __init__(
        self, keep_seconds: float = KEEP_SECONDS, limit: int = MAX_DRAFTS, clock: Callable[[], float] = time.monotonic
    ):
        self.keep_seconds, self.limit, self._clock = keep_seconds, limit, clock
        self._drafts: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, values: dict[str, Any], draft_id: str | None = None) -> str:
        """Keep `values`, added to draft `draft_id` when it is still kept (a page refused again keeps one draft);
        the id to take them back with (a new one is unguessable: 128 random bits)."""
        with self._lock:
            self._drop_old()
            if draft_id is not None and draft_id in self._drafts:
                values = {**self._drafts.pop(draft_id)[1], **values}
            else:
                draft_id = secrets.token_urlsafe(16)
            self._drafts[draft_id] = (self._clock(), dict(values))
            while len(self._drafts) > self.limit:
                self._drafts.popitem(last=False)
        return draft_id

    def take(self, draft_id: str) -> dict[str, Any] | None:
        """The values kept under `draft_id`, removed; None when unknown, taken already or too old."""
        with self._lock:
            self._drop_old()
            kept = self._drafts.pop(draft_id, None)
        return kept[1] if kept is not None else None

    def _drop_old(self) -> None:
        cutoff = self._clock() - self.keep_seconds
        while self._drafts and next(iter(self._drafts.values()))[0] < cutoff:
            self._drafts.popitem(last=False)


@process_wide
def drafts() -> Drafts:
    return Drafts()


def logged_in() -> None:
    """Mark this session as past the password gate (its later typing may be kept by `keep_typed`)."""
    st.session_state[_LOGGED_IN_KEY] = True


def keep_typed() -> str | None:
    """On a run the gate refuses: keep what this session typed (`state.TYPED_KEYS`) and return its id, or None when
    there is nothing to keep or the session was never logged in (a stranger's page keeps nothing)."""
    if not st.session_state.get(_LOGGED_IN_KEY):
        return None
    typed = {}
    for key in state.TYPED_KEYS:  # (a text box not drawn lately has its text kept apart: `state.text_box`)
        value = state.typed_text(key) if key in state.TEXT_BOX_KEYS else st.session_state.get(key)
        if value := _plain(value):
            typed[key] = value
    kept = st.session_state.get(_KEPT_KEY)
    if typed:  # (a box not drawn in a refused run is emptied at its end: a later refused run adds to the same draft)
        kept = st.session_state[_KEPT_KEY] = drafts().keep(typed, kept)
    return kept


def _plain(value: Any) -> Any:
    """A box's value as it can be put back: the chat input's text (a message sent with files gives its text; the files
    are attached again), anything else as it is."""
    text = getattr(value, "text", None)
    return text if isinstance(text, str) else value


def restore_typed() -> bool:
    """On a logged-in run: put back what `keep_typed` kept, if the URL names a draft (the name leaves the URL).
    True when something was put back. Call before any of those boxes is drawn."""
    draft_id = st.query_params.get(DRAFT_PARAM)
    if draft_id is None:
        return False
    del st.query_params[DRAFT_PARAM]
    typed = drafts().take(draft_id)
    if not typed:
        return False
    for key, value in typed.items():
        if key in state.TEXT_BOX_KEYS:
            state.set_text(key, value)
        else:
            st.session_state[key] = value
    return True
