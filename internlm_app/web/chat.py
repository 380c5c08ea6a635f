"""The chat page's flow: the conversation in the URL, its history, send, regenerate, edit-and-resend, streaming."""

from __future__ import annotations

from typing import NoReturn

import streamlit as st

from ..chat_types import ChatBackend
from ..sampling import SamplingParams
from ..store import Conversation, ConversationStore, StoreFault
from . import state, storage
from .page import PageContext
from .render import CURSOR, message_markdown, show_message
from .reply import WATCH_SECONDS, ReplyNotSaved, run_reply
from .resources import live_replies
from .safe_markdown import plain

_PENDING_KEY = "_pending_reply"  # a conversation whose reply should stream in this run (after regenerate/edit)
_EDITING_KEY = "_editing"
EDIT_KEY = "edit_text"
PROMPT_KEY = "prompt"  # the chat input's key (app.py)
SHOWN_ID_CHARS = 64  # of a conversation id from the URL quoted in the "not found" warning


@storage.stops_on_fault
def open_conversation(ctx: PageContext, store: ConversationStore) -> Conversation | None:
    """The conversation named in the URL; its system prompt and sampling values go into the sidebar once."""
    cid = state.conversation_id()
    if cid is None:
        return None
    conv = store.get_conversation(cid)
    if conv is None:
        shown = cid if len(cid) <= SHOWN_ID_CHARS else cid[: SHOWN_ID_CHARS - 1] + "…"
        st.warning(ctx.t("conversation_not_found", cid=plain(shown)))  # the URL is anyone's: plain text only
        state.set_conversation_id(None)
        return None
    state.apply_conversation_settings(conv)
    return conv


def live_reply(conv: Conversation | None) -> int | None:
    """The message of `conv` being generated right now (in this tab or another), if any."""
    return None if conv is None else live_replies().reply_of(conv.id)


@st.fragment(run_every=WATCH_SECONDS)
def rerun_when_finished(cid: str) -> None:
    """Check every second while a reply of `cid` is generated; redraw the page once it has ended (or was stopped)."""
    if live_replies().reply_of(cid) is None:
        st.rerun(scope="app")


def _start_edit(text: str) -> None:
    st.session_state[_EDITING_KEY] = True
    st.session_state[EDIT_KEY] = text


def _stop_edit() -> None:
    st.session_state[_EDITING_KEY] = False


def show_history(ctx: PageContext, conv: Conversation | None, live: int | None) -> str | None:
    """Draw the conversation; returns "regenerate" or "edit" when the user asked for one in this run."""
    messages = conv.messages if conv else []
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    editing = st.session_state.get(_EDITING_KEY, False) and live is None and last_user is not None
    action = None
    for i, message in enumerate(messages):
        with st.chat_message(message.role):
            if editing and i == last_user:
                st.text_area(ctx.t("edit_label"), key=EDIT_KEY)
                send, cancel, _ = st.columns([1, 1, 3])
                if send.button(ctx.t("edit_send"), key="edit_send", type="primary"):
                    action = "edit"
                cancel.button(ctx.t("edit_cancel"), key="edit_cancel", on_click=_stop_edit)
                continue
            show_message(message, ctx.t, live=message.id == live)
            if live is not None or editing:
                continue
            if i == last_user:
                st.button(
                    ctx.t("edit"),
                    key="edit_last",
                    icon=":material/edit:",
                    on_click=_start_edit,
                    args=(message.content,),
                )
            if i == len(messages) - 1 and st.button(ctx.t("regenerate"), key="regenerate", icon=":material/refresh:"):
                action = "regenerate"
    if live is not None and conv is not None:
        rerun_when_finished(conv.id)
    return action


def send(
    ctx: PageContext, backend: ChatBackend, store: ConversationStore, conv: Conversation | None, prompt: str
) -> NoReturn:
    """Save the user's message (before anything is generated), show it, and stream the reply."""
    _stop_edit()
    params = state.sampling_params(ctx.settings)
    with storage.writing(keep={PROMPT_KEY: prompt}):  # a full disk or read-only file: the text goes back in the box
        cid = _prepare_conversation(store, conv, params)
        store.add_message(cid, "user", prompt)
    with st.chat_message("user"):
        st.markdown(message_markdown(prompt))
    stream(ctx, backend, store, cid, params, stop_button=False)


def act(ctx: PageContext, store: ConversationStore, conv: Conversation, action: str) -> NoReturn:
    """Regenerate the last reply, or replace the last user message by the edited text; the reply streams next run."""
    if action == "edit":
        text = st.session_state.get(EDIT_KEY, "").strip()
        if not text:
            st.toast(ctx.t("edit_empty"))
            st.stop()
        last_user = next(m for m in reversed(conv.messages) if m.role == "user")  # show_history drew its editor
        with storage.writing(keep={EDIT_KEY: text}):
            store.replace_from(conv.id, last_user.id, "user", text)
        _stop_edit()
    elif conv.messages[-1].role == "assistant":
        with storage.writing():
            store.delete_messages_from(conv.id, conv.messages[-1].id)
    st.session_state[_PENDING_KEY] = conv.id
    st.rerun()


def take_pending(conv: Conversation | None) -> bool:
    """True once after act(): this run should stream the reply to `conv`."""
    return conv is not None and st.session_state.pop(_PENDING_KEY, None) == conv.id


def stream(
    ctx: PageContext,
    backend: ChatBackend,
    store: ConversationStore,
    cid: str,
    params: SamplingParams | None = None,
    *,
    stop_button: bool = True,
) -> NoReturn:
    """Stream the reply into an assistant bubble, then redraw the page from the store."""
    params = params or state.sampling_params(ctx.settings)
    system_prompt = st.session_state.get(state.SYSTEM_PROMPT_KEY, "")
    with storage.writing():
        store.update_settings(cid, system_prompt, state.conversation_settings(params))
    max_length = st.session_state.get(state.MAX_LENGTH_KEY)
    with st.chat_message("assistant"):
        if stop_button:  # a chat_input submission has its own stop button
            st.button(ctx.t("stop"), key="stop_reply", icon=":material/stop_circle:")
        box = st.empty()
        box.markdown(CURSOR)
        try:
            run_reply(
                backend,
                store,
                cid,
                params,
                show=lambda text: box.markdown(message_markdown(text) + CURSOR),
                on_queue=lambda place: box.info(ctx.t("queue_place", place=place)),
                live=live_replies(),
                on_start=lambda: rerun_when_finished(cid),  # a stop ends the script; this then redraws it stopped
                poll=state.stop_point,
                max_length=max_length,
            )
        except StoreFault as fault:  # the reply could not be saved: it stays on screen (this run) with the reason
            if isinstance(fault, ReplyNotSaved):
                box.markdown(message_markdown(fault.text))
            storage.show_fault(ctx, fault)
            st.stop()
    st.rerun()


def _prepare_conversation(store: ConversationStore, conv: Conversation | None, params: SamplingParams) -> str:
    if conv is not None:
        return conv.id
    system_prompt = st.session_state.get(state.SYSTEM_PROMPT_KEY, "")
    cid = store.create_conversation(system_prompt, state.conversation_settings(params))
    state.set_conversation_id(cid)
    return cid
