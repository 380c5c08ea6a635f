"""Session-state helpers: widget defaults, the sampling parameters they hold, the conversation in the URL."""

from __future__ import annotations

from typing import Any

import streamlit as st
from pydantic import ValidationError

from internlm_app.chat_types import ChatBackend
from internlm_app.sampling import SamplingParams
from internlm_app.settings import MAX_LENGTH_BOUNDS, Settings
from internlm_app.store.records import Conversation

SAMPLING_KEYS = tuple(SamplingParams.model_fields)
MAX_LENGTH_KEY = "max_length"
SYSTEM_PROMPT_KEY = "system_prompt"
RENAME_KEY = "rename_title"
URL_PARAM = "c"
PROMPT_KEY = "prompt"  # the chat input
EDIT_KEY, EDITING_KEY = "edit_text", "_editing"  # a sent message's edit box, and (conversation, message) it edits
QUEUED_EDIT_KEY = "queued_edit_text"  # a queued message's edit box
# (conversation, queued message id, its text when the edit began, the conversation's last message id then)
QUEUED_EDITING_KEY = "_queued_editing"
ATTACH_TEXT_KEY, ATTACH_PENDING_KEY = "attach_text", "_attach_pending"  # the files panel: its message, its files
SET_ASIDE_KEY = "set_aside_text"  # an edit's text whose message is gone, to send as a new message (chat.show_set_aside)
# What the user has typed on the chat page, with what shows it: kept across a login lost meanwhile (web/drafts.py).
TEXT_BOX_KEYS = (EDIT_KEY, QUEUED_EDIT_KEY, ATTACH_TEXT_KEY, SET_ASIDE_KEY)  # drawn with `text_box`
TYPED_KEYS = (
    PROMPT_KEY,
    EDIT_KEY,
    EDITING_KEY,
    QUEUED_EDIT_KEY,
    QUEUED_EDITING_KEY,
    ATTACH_TEXT_KEY,
    ATTACH_PENDING_KEY,
    SET_ASIDE_KEY,
)
_KEPT = "_kept_"  # + a text box's key: its text, kept across the runs that do not draw it (`text_box`)
_OPENED_KEY = "_opened_conversation"  # whose settings the sidebar holds
_CURRENT_KEY = "_current_conversation"  # the session's open conversation (Streamlit's page switch drops the URL's)


def context_limit(backend: ChatBackend) -> int:
    """The largest context budget the backend can use (its window when known)."""
    return min(backend.context_window, MAX_LENGTH_BOUNDS[1])


def init_widget_defaults(settings: Settings, backend: ChatBackend) -> None:
    """Give the sidebar widgets their defaults from the settings, once per session."""
    defaults = settings.default_sampling().model_dump()
    for key in SAMPLING_KEYS:
        st.session_state.setdefault(key, defaults[key])
    st.session_state.setdefault(MAX_LENGTH_KEY, min(settings.max_length, context_limit(backend)))
    st.session_state.setdefault(SYSTEM_PROMPT_KEY, settings.system_prompt)


def sampling_params(settings: Settings) -> SamplingParams:
    """The parameters the sidebar holds (the settings' defaults where a value is missing or invalid)."""
    values = {key: st.session_state[key] for key in SAMPLING_KEYS if key in st.session_state}
    try:
        return SamplingParams(**values)
    except ValidationError:
        return settings.default_sampling()


def conversation_settings(params: SamplingParams) -> dict:
    """What a conversation remembers of the sidebar (restored when it is opened again)."""
    return {**params.model_dump(), MAX_LENGTH_KEY: st.session_state.get(MAX_LENGTH_KEY)}


def apply_conversation_settings(conv: Conversation) -> None:
    """When this session opens a conversation, put its system prompt and sampling values into the sidebar."""
    st.session_state[_CURRENT_KEY] = conv.id
    if st.session_state.get(_OPENED_KEY) == conv.id:
        return
    st.session_state[_OPENED_KEY] = conv.id
    st.session_state[SYSTEM_PROMPT_KEY] = conv.system_prompt
    st.session_state[RENAME_KEY] = conv.title
    saved = {key: conv.settings[key] for key in SAMPLING_KEYS if key in conv.settings}
    try:
        values = SamplingParams(**saved).model_dump(include=set(saved))
    except ValidationError:
        return
    for key, value in values.items():
        st.session_state[key] = value


def stop_point() -> None:
    """A point where Streamlit may end the script: reading session state checks for a pending stop or rerun."""
    st.session_state.get(_OPENED_KEY)


def conversation_id() -> str | None:
    """The conversation id in the URL (?c=<id>); without one, the conversation this session has open, put back in
    the URL: Streamlit's page navigation drops the URL's parameters, and coming back to the chat from another page
    must not start a new conversation (New chat forgets the open one: set_conversation_id(None))."""
    cid = st.query_params.get(URL_PARAM)
    if not cid and (opened := st.session_state.get(_CURRENT_KEY)):
        st.query_params[URL_PARAM] = opened
        return opened
    return cid or None


def open_new_conversation(cid: str) -> None:
    """A conversation just made: in the URL, and the session's open one (a page switch while its first reply
    streams comes back to it)."""
    st.query_params[URL_PARAM] = cid
    st.session_state[_CURRENT_KEY] = cid


def set_conversation_id(cid: str | None) -> None:
    """Put the conversation in the URL (None starts a new one); a refresh or another tab opens the same one."""
    if cid is None:
        st.query_params.pop(URL_PARAM, None)
        st.session_state.pop(_OPENED_KEY, None)
        st.session_state.pop(_CURRENT_KEY, None)
    else:
        st.query_params[URL_PARAM] = cid


def text_box(label: str, key: str, **kwargs: Any) -> str:
    """`st.text_area` under `key` whose text outlives the runs that do not draw it. Streamlit drops a widget's state
    at the end of any run it is not drawn in (another page, another conversation, the login gate): the text is also
    kept under a plain key and given back when the box is drawn again. `forget_text(key)` ends it."""
    if key not in st.session_state and (kept := st.session_state.get(_KEPT + key)) is not None:
        st.session_state[key] = kept
    value = st.text_area(label, key=key, **kwargs)
    st.session_state[_KEPT + key] = value
    return value


def set_text(key: str, text: str) -> None:
    """Put `text` in text box `key` (drawn later in this run, or in a later one)."""
    st.session_state[key] = st.session_state[_KEPT + key] = text


def typed_text(key: str) -> str | None:
    """What text box `key` holds: its widget's value in this run, else the text kept since it was last drawn."""
    value = st.session_state.get(key)
    return value if isinstance(value, str) else st.session_state.get(_KEPT + key)


def forget_text(key: str) -> None:
    st.session_state.pop(key, None)
    st.session_state.pop(_KEPT + key, None)
