"""The chat page's flow: the conversation in the URL, its history, send, regenerate, edit-and-resend, streaming."""

from __future__ import annotations

from typing import NoReturn

import streamlit as st

from ..chat_types import ChatBackend
from ..sampling import SamplingParams
from ..store import Conversation, ConversationStore, StoreFault
from ..store_tree import Attachment
from . import attachments_view, state, storage, tools_view
from .page import PageContext
from .render import CURSOR, message_markdown, show_message
from .reply import WATCH_SECONDS, ReplyNotSaved, run_reply
from .resources import live_replies
from .safe_markdown import plain

LIVE_VIEW_SECONDS = 0.5  # how often a reply generated outside this run is redrawn
_QUEUED_KEY = "_queued_messages"  # per conversation: messages typed while its reply ran, sent when it ends
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


@st.fragment(run_every=LIVE_VIEW_SECONDS)
def live_reply_view(ctx: PageContext, cid: str, stored: str) -> None:
    """A reply generated outside this run (another tab, or this page before an interaction): its text so far, a stop
    button, and a redraw of the page once it has ended."""
    live = live_replies()
    text = live.text_of(cid)
    if text is None:  # it ended: show it as saved
        st.rerun(scope="app")
    st.markdown(message_markdown(text or stored) + CURSOR)
    st.caption(ctx.t("live_generating"))
    st.button(ctx.t("stop"), key="stop_live", icon=":material/stop_circle:", on_click=live.stop, args=(cid,))


def _start_edit(text: str) -> None:
    st.session_state[_EDITING_KEY] = True
    st.session_state[EDIT_KEY] = text


def _stop_edit() -> None:
    st.session_state[_EDITING_KEY] = False


def show_history(ctx: PageContext, conv: Conversation | None, live: int | None, busy: bool = False) -> str | None:
    """Draw the conversation; returns "regenerate" or "edit" when the user asked for one in this run.

    `busy`: a reply starts streaming in this run (after regenerate or edit), so no edit or regenerate buttons.
    """
    messages = conv.messages if conv else []
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    busy = busy or live is not None
    editing = st.session_state.get(_EDITING_KEY, False) and not busy and last_user is not None
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
            if message.id == live and conv is not None:
                live_reply_view(ctx, conv.id, message.content)
                continue
            show_message(message, ctx.t)
            if busy or editing:
                # Empty slots where the buttons were: Streamlit keeps the last run's elements on screen until a run
                # replaces them, and a streaming run ends late, so stale buttons would stay clickable meanwhile.
                st.empty()
                st.empty()
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
    return action


def send(
    ctx: PageContext,
    backend: ChatBackend,
    store: ConversationStore,
    conv: Conversation | None,
    prompt: str,
    attachments: list[Attachment] | None = None,
) -> NoReturn:
    """Save the user's message (before anything is generated), show it, and stream the reply."""
    _stop_edit()
    params = state.sampling_params(ctx.settings)
    with storage.writing(keep={PROMPT_KEY: prompt}):  # a full disk or read-only file: the text goes back in the box
        cid = _prepare_conversation(store, conv, params)
        store.add_message(cid, "user", prompt, attachments=attachments or ())
    attachments_view.sent()  # the files' confirmation panel is done with
    with st.chat_message("user"):
        st.markdown(message_markdown(prompt))
        attachments_view.show_attachments(attachments or [], ctx.t)
    stream(ctx, backend, store, cid, params)


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


def queue_message(conv: Conversation, prompt: str) -> NoReturn:
    """Keep a message typed while a reply of `conv` runs; it is shown as queued and sent when the reply ends."""
    st.session_state.setdefault(_QUEUED_KEY, {}).setdefault(conv.id, []).append(prompt)
    st.rerun()


def show_queued(ctx: PageContext, conv: Conversation | None) -> None:
    """The messages waiting for this conversation's reply to end, under the conversation."""
    for text in st.session_state.get(_QUEUED_KEY, {}).get(conv.id if conv else "", []):
        with st.chat_message("user"):
            st.markdown(message_markdown(text))
            st.caption(ctx.t("queued_message"))


def take_queued(conv: Conversation | None) -> str | None:
    """The oldest message queued for `conv`, removed from the queue (it is being sent)."""
    waiting = st.session_state.get(_QUEUED_KEY, {}).get(conv.id if conv else "", [])
    return waiting.pop(0) if waiting else None


def take_pending(conv: Conversation | None) -> bool:
    """True once after act(): this run should stream the reply to `conv`."""
    return conv is not None and st.session_state.pop(_PENDING_KEY, None) == conv.id


def stream(
    ctx: PageContext,
    backend: ChatBackend,
    store: ConversationStore,
    cid: str,
    params: SamplingParams | None = None,
) -> NoReturn:
    """Stream the reply into an assistant bubble, then redraw the page from the store."""
    params = params or state.sampling_params(ctx.settings)
    system_prompt = st.session_state.get(state.SYSTEM_PROMPT_KEY, "")
    with storage.writing():
        store.update_settings(cid, system_prompt, state.conversation_settings(params))
    max_length = st.session_state.get(state.MAX_LENGTH_KEY)
    # Streamlit keeps the last run's elements on screen until this run replaces them, and a streaming run ends late:
    # this empty slot takes the place of the bubble the reply replaces (a regenerated one, with its buttons), so no
    # stale button stays clickable while the new reply streams in the next slot.
    st.empty()
    with st.chat_message("assistant"):
        # The click ends this run, which sends the reply to the background like any other interaction; its callback,
        # run before the next run, stops it there within one token.
        st.button(
            ctx.t("stop"), key="stop_reply", icon=":material/stop_circle:", on_click=live_replies().stop, args=(cid,)
        )
        steps: list[dict] = []  # the tool calls of this reply, when tools are on
        live_steps = tools_view.LiveSteps(steps, ctx.t)
        box = st.empty()
        box.markdown(CURSOR)

        def show(text: str) -> None:
            live_steps.refresh()
            box.markdown(message_markdown(text) + CURSOR)

        try:
            run_reply(
                backend,
                store,
                cid,
                params,
                show=show,
                on_queue=lambda place: box.info(ctx.t("queue_place", place=place)),
                live=live_replies(),
                on_start=lambda: rerun_when_finished(cid),  # a stop ends the script; this then redraws it stopped
                poll=state.stop_point,
                max_length=max_length,
                stream=tools_view.reply_stream(ctx, backend, steps),
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
