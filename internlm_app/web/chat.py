"""The chat page's flow: the conversation in the URL, its history, send, regenerate and edit (as new versions),
streaming."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from internlm_app.chat_types import ChatBackend
from internlm_app.sampling import SamplingParams
from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.store.export_format import MAX_CONTENT_CHARS
from internlm_app.store.queued import QueuedMessage
from internlm_app.store.records import Conversation
from internlm_app.store.tree import Attachment
from internlm_app.web import attachments_view, feedback, state, storage, tools_view
from internlm_app.web import versions as versions_ui
from internlm_app.web.context import PageContext
from internlm_app.web.render import CURSOR, message_markdown, show_message
from internlm_app.web.reply import WATCH_SECONDS, LiveReplies, ReplyInProgress, ReplyNotSaved, ReplyView, WebReply
from internlm_app.web.resources import live_replies
from internlm_app.web.safe_markdown import plain
from internlm_app.web.versions import versions_on_path

log = logging.getLogger(__name__)

LIVE_VIEW_SECONDS = 0.5  # how often a reply generated outside this run is redrawn
_QUEUED_FAILED_KEY = "_queued_send_failed"  # the queued message whose send this session saw fail (not retried alone)
_PENDING_KEY = "_pending_reply"  # a conversation whose reply should stream in this run (after regenerate/edit)
_SHOWN_KEY = "_messages_shown"  # how many messages the last run drew
_SHOWN_LEAF_KEY, _SHOWN_BEFORE_KEY = "_shown_leaf", "_shown_leaf_before"  # (conversation, last message) drawn
_CHANGED_KEY = "_changed_before_send"  # a message to put back in the box: the path changed in another tab
_SET_ASIDE_WHY_KEY = "_set_aside_why"  # why an edit's text was set aside (its message is gone)
_QUEUED_NOTICE_KEY = "_queued_notice"  # what the last Remove or Save of a queued message found, shown once
SHOWN_ID_CHARS = 64  # of a conversation id from the URL quoted in the "not found" warning


@storage.stops_on_fault
def open_conversation(ctx: PageContext, store: ConversationStore) -> Conversation | None:
    """The conversation named in the URL; its system prompt and sampling values go into the sidebar once."""
    in_url = bool(st.query_params.get(state.URL_PARAM))
    cid = state.conversation_id()
    if cid is None:
        return None
    conv = store.get_conversation(cid)
    if conv is None:
        if in_url:  # (the session's open conversation, deleted meanwhile: a new one starts without a word)
            shown = cid if len(cid) <= SHOWN_ID_CHARS else cid[: SHOWN_ID_CHARS - 1] + "…"
            st.warning(ctx.t("conversation_not_found", cid=plain(shown)))  # the URL is anyone's: plain text only
        rescue_edits_of_deleted(ctx, cid)
        state.set_conversation_id(None)
        return None
    state.apply_conversation_settings(conv)
    return conv


def typed_now() -> bool:
    """A message was sent from the chat box in this run (its value is known before the box is drawn)."""
    value = st.session_state.get(state.PROMPT_KEY)  # (a submitted value; a str is text put back in the box)
    return bool(getattr(value, "text", None)) and not getattr(value, "files", None)  # (files: the panel, not sent)


def reply_running(conv: Conversation | None) -> bool:
    """A reply of `conv` is running, or starting (claimed by a page, in this tab or another)."""
    return conv is not None and live_replies().busy(conv.id)


@storage.stops_on_fault
def live_reply(
    ctx: PageContext, store: ConversationStore, conv: Conversation | None
) -> tuple[Conversation | None, int | None]:
    """`conv` and the message of it being generated right now (in this tab or another), if any. When `conv` was
    read just before one of its replies saved its end (a Stop, or the end, racing this run), it is read once again:
    it would show that reply as still streaming yet not live, i.e. interrupted, and never redraw it. (Read again,
    not run again: a message submitted in this run stays.)"""
    if conv is None:
        return None, None
    live = live_replies()
    mid = live.reply_of(conv.id)
    if any(m.status == "streaming" and m.id != mid and live.ended(conv.id, m.id) for m in conv.messages):
        conv = store.get_conversation(conv.id)  # the store has its end now (None: deleted meanwhile)
    return conv, mid


@st.fragment(run_every=WATCH_SECONDS)
def rerun_when_finished(cid: str) -> None:
    """Check every second while a reply of `cid` is generated; redraw the page once it has ended (or was stopped)."""
    if live_replies().reply_of(cid) is None:
        st.rerun(scope="app")


@st.fragment(run_every=LIVE_VIEW_SECONDS)
def rerun_when_started_or_free(cid: str) -> None:
    """While another page has claimed `cid` and its reply has yet to start (a moment): redraw once it has started
    (to show it) or the claim was given up (to send what waits)."""
    live = live_replies()
    if live.reply_of(cid) is not None or not live.busy(cid):
        st.rerun(scope="app")


@st.fragment(run_every=LIVE_VIEW_SECONDS)
def live_reply_view(ctx: PageContext, cid: str, stored: str) -> None:
    """A reply generated outside this run (another tab, or this page before an interaction): its text so far, a stop
    button, and a redraw of the page once it has ended."""
    live = live_replies()
    text = live.text_of(cid)
    if text is None:  # it ended: show it as saved
        st.rerun(scope="app")
    if steps := live.steps_of(cid):  # its tool calls, a running one too
        tools_view.show_steps(steps, ctx.t, running=True)
    if (place := live.place_of(cid)) is not None:  # still waiting for the GPU, in its place
        st.info(ctx.t("queue_place", place=place))
    else:
        st.markdown(message_markdown(text or stored) + CURSOR)
        st.caption(ctx.t("live_generating"))
    st.button(ctx.t("stop"), key="stop_live", icon=":material/stop_circle:", on_click=live.stop, args=(cid,))


def _start_edit(cid: str, mid: int, text: str) -> None:
    st.session_state[state.EDITING_KEY] = (cid, mid)
    state.set_text(state.EDIT_KEY, text)


def _stop_edit() -> None:
    st.session_state[state.EDITING_KEY] = None
    state.forget_text(state.EDIT_KEY)


def _set_aside(ctx: PageContext, text: str | None, why: str, cid: str | None) -> None:
    """An edit whose message is gone (another tab moved the path, deleted the conversation, sent or removed the
    queued message): its text is set aside under the conversation (`show_set_aside`), with the reason, to send as a
    new message or discard. Never into the chat box, whose text in the browser would be replaced. Nothing typed is
    dropped."""
    if not text or not text.strip():
        return
    kept = state.typed_text(state.SET_ASIDE_KEY)
    state.set_text(state.SET_ASIDE_KEY, f"{kept}\n\n{text}" if kept else text)
    st.session_state[_SET_ASIDE_WHY_KEY] = (why, cid)


def show_set_aside(ctx: PageContext, conv: Conversation | None) -> str | None:
    """The text `_set_aside` kept, with why, in a box with "Send as a new message" and "Discard", in the conversation
    it belongs to (a new chat, for a deleted one's); the text on Send."""
    why, cid = st.session_state.get(_SET_ASIDE_WHY_KEY) or ("edit_message_left_path", None)
    if not state.typed_text(state.SET_ASIDE_KEY) or cid != (conv.id if conv is not None else None):
        return None
    with st.container(border=True, key="set_aside"):
        st.warning(ctx.t(why))
        text = state.text_box(ctx.t("set_aside_label"), state.SET_ASIDE_KEY, max_chars=MAX_CONTENT_CHARS)
        with st.container(horizontal=True, gap="small"):
            send = st.button(ctx.t("set_aside_send"), key="set_aside_send", type="primary")
            st.button(ctx.t("set_aside_discard"), key="set_aside_discard", on_click=forget_set_aside)
    return text if send and text.strip() else None


def forget_set_aside() -> None:
    state.forget_text(state.SET_ASIDE_KEY)
    st.session_state.pop(_SET_ASIDE_WHY_KEY, None)


def rescue_edits_of_deleted(ctx: PageContext, cid: str) -> None:
    """Conversation `cid` was deleted (in another tab) while this session edited one of its messages, sent or
    queued: the edited text is set aside."""
    editing, queued = st.session_state.get(state.EDITING_KEY), st.session_state.get(state.QUEUED_EDITING_KEY)
    texts = []
    if editing is not None and editing[0] == cid:
        texts.append(state.typed_text(state.EDIT_KEY))
        _stop_edit()
    if queued is not None and queued[0] == cid:
        texts.append(state.typed_text(state.QUEUED_EDIT_KEY))
        _stop_queued_edit()
    _set_aside(ctx, "\n\n".join(t for t in texts if t), "edit_conversation_deleted", None)  # (to a new chat)


@dataclass(frozen=True)
class Action:
    """What the user asked for in this run: "regenerate" or "edit" message `mid`."""

    kind: str
    mid: int


@dataclass(frozen=True)
class Pending:
    """A reply to stream after regenerate or edit (`version_of`: the reply it regenerates), kept in the session until
    its reply has started; `token` tells a started one from a new request (`LiveReplies.taken`)."""

    cid: str
    version_of: int | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def show_history(
    ctx: PageContext,
    store: ConversationStore,
    conv: Conversation | None,
    live: int | None,
    pending: Pending | None = None,
    sending: bool = False,
) -> Action | None:
    """Draw the conversation with each message's actions; returns the regenerate or edit asked for in this run.

    With `pending` (a reply starts streaming in this run) there are no edit or regenerate buttons, and the reply it
    regenerates is left out (its new version streams below); `sending` (a message goes out in this run: typed, or
    the next queued one) has no buttons either, since its reply streams in this run.
    """
    messages = conv.messages if conv else []
    if pending is not None and pending.version_of is not None:
        messages = messages[: next((i for i, m in enumerate(messages) if m.id == pending.version_of), len(messages))]
    last_user = max((m.id for m in messages if m.role == "user"), default=None)
    busy = pending is not None or live is not None or sending
    # An edit under way stays on screen while a reply runs (another tab's): its text is kept, its Send waits. One of
    # another conversation waits for it (its text kept: `state.text_box`).
    edit = st.session_state.get(state.EDITING_KEY)
    editing = edit[1] if edit is not None and conv is not None and edit[0] == conv.id else None
    if editing is not None and editing not in {m.id for m in conv.messages if m.role == "user"}:
        # Another tab moved the path (an edit, a version switch): the message is no longer on it.
        text = state.typed_text(state.EDIT_KEY)
        _stop_edit()
        _set_aside(ctx, text, "edit_message_left_path", conv.id)
        editing = None
    if pending is not None:
        editing = None
    versions = versions_on_path(conv)
    action = None
    last = messages[-1].id if messages else None
    if conv is not None:  # the path the user saw before acting (`_changed_since_shown`), and the one drawn now
        st.session_state[_SHOWN_BEFORE_KEY] = st.session_state.get(_SHOWN_LEAF_KEY)
        st.session_state[_SHOWN_LEAF_KEY] = (conv.id, last)
    if (unsent := st.session_state.pop(_CHANGED_KEY, None)) is not None:
        st.session_state[state.PROMPT_KEY] = unsent  # (the chat input is drawn after the history)
        st.warning(ctx.t("changed_before_send"))
    for i, message in enumerate(messages):
        with st.chat_message(message.role):
            if message.id == editing:
                state.text_box(ctx.t("edit_label"), state.EDIT_KEY, max_chars=MAX_CONTENT_CHARS)
                send, cancel, _ = st.columns([1, 1, 3])
                if send.button(ctx.t("edit_send"), key="edit_send", type="primary", disabled=busy) and not busy:
                    action = Action("edit", message.id)
                cancel.button(ctx.t("edit_cancel"), key="edit_cancel", on_click=_stop_edit)
                if busy:
                    st.caption(ctx.t("edit_waits"))
                continue
            if message.id == live and conv is not None:
                live_reply_view(ctx, conv.id, message.content)
                continue
            show_message(message, ctx.t)
            if conv is None:
                continue
            # Edit and regenerate change the path: while a reply streams or a message is edited their places hold
            # empty slots (Streamlit keeps the last run's elements on screen until a run replaces them, and a
            # streaming run ends late, so stale buttons would stay clickable meanwhile).
            locked = busy or editing is not None
            with st.container(horizontal=True, gap="small", vertical_alignment="center"):
                versions_ui.switcher(ctx.t, store, conv.id, versions.get(message.id), locked)
                if message.role == "assistant":
                    feedback.thumbs(store, message)
                    feedback.copy_button(ctx.t, message)
                    versions_ui.fork_button(ctx.t, store, conv.id, message.id)
                if locked:
                    st.empty()
                    st.empty()
                    continue
                if message.role == "user":
                    st.button(
                        ctx.t("edit"),
                        key="edit_last" if message.id == last_user else f"edit_{message.id}",
                        icon=":material/edit:",
                        type="tertiary",
                        on_click=_start_edit,
                        args=(conv.id, message.id, message.content),
                    )
                if i == len(messages) - 1 and st.button(
                    ctx.t("regenerate"), key="regenerate", icon=":material/refresh:", type="tertiary"
                ):
                    if _changed_since_shown(conv):  # another tab changed it since it was drawn: nothing unseen
                        st.warning(ctx.t("changed_elsewhere"))
                    else:
                        action = Action("regenerate", message.id)
    _cover_stale_bubbles(len(messages), pending is not None)
    return action


def _changed_since_shown(conv: Conversation) -> bool:
    """Whether the path the user saw when acting (drawn by the last run) ends elsewhere than the stored path now."""
    before = st.session_state.get(_SHOWN_BEFORE_KEY)
    last = conv.messages[-1].id if conv.messages else None
    return before is not None and before[0] == conv.id and before[1] != last


def _cover_stale_bubbles(shown: int, pending: bool) -> None:
    """Before a reply streams in this run, put empty slots where the last run drew more messages (an edit of an early
    message cuts the path short): their old bubbles, with live buttons, would stay on screen until the run ends."""
    before = st.session_state.get(_SHOWN_KEY, 0)
    st.session_state[_SHOWN_KEY] = shown
    if pending:
        for _ in range(before - shown):
            st.empty()


def send(
    ctx: PageContext,
    backend: ChatBackend,
    store: ConversationStore,
    conv: Conversation | None,
    prompt: str,
    attachments: list[Attachment] | None = None,
    queued: QueuedMessage | None = None,
    slot: DeltaGenerator | None = None,
) -> NoReturn:
    """Save the user's message (before anything is generated), show it, and stream the reply (in `slot`, when given:
    a place drawn earlier in the page, above the messages still queued). `queued`: the message is that queued one,
    moved out of the queue in the write that saves it (sent by another page first: this run only redraws). When a
    reply of the conversation is starting or running already (another tab, at this moment), a typed message is
    queued instead: one reply per conversation at a time."""
    _stop_edit()
    if conv is not None and queued is None and not attachments and _changed_since_shown(conv):
        # Another tab changed the path (an edit, a message) after this page drew it: the message would go below a
        # path the user never saw. It goes back in the box, the page shows the path as it is now.
        st.session_state[_CHANGED_KEY] = prompt  # the next run puts it back, before the box is drawn
        st.rerun()
    setup = _ReplySetup.read(ctx, backend)
    live = live_replies()
    ticket = live.claim(conv.id) if conv is not None else None
    if conv is not None and ticket is None:
        if queued is None and not attachments:  # (files wait in their panel, whose Send is off while a reply runs)
            queue_message(store, conv, prompt)
        st.rerun()
    cid = conv.id if conv is not None else None
    try:  # from the claim on, every way out gives it back unless the reply started
        if queued is not None:
            st.session_state[_QUEUED_FAILED_KEY] = queued.id  # until it is saved
        # A full disk or read-only file: a typed text goes back in the box; a queued one stays queued.
        with storage.writing(keep={state.PROMPT_KEY: prompt} if queued is None else None):
            if cid is None:
                cid = _prepare_conversation(store, conv, setup.params)
                ticket = live.claim(cid)  # a new conversation: nobody else has it
            store.update_settings(cid, setup.system_prompt, state.conversation_settings(setup.params))
            if queued is None:
                store.add_message(cid, "user", prompt, attachments=attachments or ())
            elif store.send_queued_message(queued.id) is None:  # sent by another page first: only redraw
                st.rerun()
        reply = setup.start(store, cid, None, live)
    except BaseException:
        if cid is not None and ticket is not None:
            live.release(cid, ticket)  # no effect once the reply started
        raise
    st.session_state.pop(_QUEUED_FAILED_KEY, None)
    attachments_view.sent()  # the files' confirmation panel is done with
    with slot if slot is not None else contextlib.nullcontext():
        with st.chat_message("user"):
            st.markdown(message_markdown(prompt))
            attachments_view.show_attachments(attachments or [], ctx.t)
        _follow(ctx, cid, reply, setup.steps)


def act(ctx: PageContext, store: ConversationStore, conv: Conversation, action: Action) -> NoReturn:
    """Regenerate a reply (a new version of it), or send an edited user message as a new version of it (a branch);
    the reply streams next run. The old versions stay, reachable with ‹ ›."""
    version_of = None
    if action.kind == "edit":
        text = st.session_state.get(state.EDIT_KEY, "").strip()
        if not text:
            st.toast(ctx.t("edit_empty"))
            st.stop()
        edited = next(m for m in conv.messages if m.id == action.mid)
        with storage.writing(keep={state.EDIT_KEY: text}):  # the edited text goes with the files the message had
            store.add_version(action.mid, text, attachments=edited.attachments)
        _stop_edit()
    elif next(m for m in conv.messages if m.id == action.mid).role == "assistant":
        version_of = action.mid  # the new version is made when it starts streaming (WebReply.run)
    st.session_state[_PENDING_KEY] = Pending(conv.id, version_of)
    st.rerun()


def queue_message(store: ConversationStore, conv: Conversation, prompt: str) -> NoReturn:
    """Keep a message typed while a reply of `conv` runs (in the store: a reload or a closed tab keeps it); it is
    shown as queued and sent when the reply ends."""
    st.session_state.pop(_QUEUED_FAILED_KEY, None)  # a user's action: a queued message that failed is tried again
    with storage.writing(keep={state.PROMPT_KEY: prompt}):  # a failing file: the text goes back in the box
        store.queue_message(conv.id, prompt)
    st.rerun()


def sendable(waiting: list[QueuedMessage]) -> QueuedMessage | None:
    """The queued message to send now: the oldest, unless its send failed in this session (the file's fault is
    shown; the next message typed, or a reload, tries again), so a failing file is not retried in a loop, or it is
    being edited here (it goes out once saved; the ones after it keep their order behind it)."""
    if not waiting or st.session_state.get(_QUEUED_FAILED_KEY) == waiting[0].id:
        return None
    editing = st.session_state.get(state.QUEUED_EDITING_KEY)
    return None if editing is not None and editing[1] == waiting[0].id else waiting[0]


def queued(store: ConversationStore, conv: Conversation | None) -> list[QueuedMessage]:
    """The messages waiting for this conversation's reply to end (typed here, in another tab, or before a reload)."""
    if conv is None:
        return []
    try:
        return store.queued_messages(conv.id)
    except StoreFault:  # the page shows the file's fault where it reads the conversation; nothing is removed here
        log.exception("could not read the queued messages of %s", conv.id)
        return []


def show_queued(
    ctx: PageContext, store: ConversationStore, conv: Conversation | None, waiting: list[QueuedMessage]
) -> None:
    """The messages waiting for `conv`'s reply to end, under the conversation, each with Edit (in its place, keeping
    its place in the queue) and Remove."""
    if conv is None or not waiting:
        return
    cid, last = conv.id, (conv.messages[-1].id if conv.messages else None)
    if (notice := st.session_state.pop(_QUEUED_NOTICE_KEY, None)) is not None:
        st.toast(ctx.t(notice))
    editing = st.session_state.get(state.QUEUED_EDITING_KEY)
    for message in waiting:
        with st.chat_message("user"):
            if editing is not None and editing[1] == message.id:
                state.text_box(ctx.t("edit_label"), state.QUEUED_EDIT_KEY, max_chars=MAX_CONTENT_CHARS)
                save, cancel, _ = st.columns([1, 1, 3])
                save.button(
                    ctx.t("queued_save"), key="queued_save", type="primary", on_click=_save_queued, args=(store,)
                )
                cancel.button(ctx.t("edit_cancel"), key="queued_cancel", on_click=_stop_queued_edit)
                st.caption(ctx.t("queued_edit_waits"))
                continue
            st.markdown(message_markdown(message.content))
            with st.container(horizontal=True, gap="small", vertical_alignment="center"):
                st.caption(ctx.t("queued_message"))
                st.button(
                    ctx.t("edit"),
                    key=f"queued_edit_{message.id}",
                    icon=":material/edit:",
                    type="tertiary",
                    on_click=_start_queued_edit,
                    args=(cid, message, last),
                )
                st.button(
                    ctx.t("queued_remove"),
                    key=f"queued_remove_{message.id}",
                    icon=":material/close:",
                    type="tertiary",
                    on_click=_remove_queued,
                    args=(store, message.id),
                )


def _start_queued_edit(cid: str, message: QueuedMessage, last: int | None) -> None:
    st.session_state[state.QUEUED_EDITING_KEY] = (cid, message.id, message.content, last)
    state.set_text(state.QUEUED_EDIT_KEY, message.content)


def _stop_queued_edit() -> None:
    st.session_state[state.QUEUED_EDITING_KEY] = None
    state.forget_text(state.QUEUED_EDIT_KEY)


def _save_queued(store: ConversationStore) -> None:
    """on_click of a queued message's Save: its new text, in its place in the queue. When it was sent meanwhile, the
    edit stays open and `rescue_queued_edit` moves the text to the sent message in the run that follows."""
    editing = st.session_state.get(state.QUEUED_EDITING_KEY)
    text = st.session_state.get(state.QUEUED_EDIT_KEY, "").strip()
    if editing is None:
        return
    if not text:
        st.session_state[_QUEUED_NOTICE_KEY] = "edit_empty"
        return
    try:
        saved = store.edit_queued_message(editing[1], text)
    except StoreFault as fault:  # the edit stays open with its text; the page shows why
        storage.remember(fault)
        return
    if saved:
        _stop_queued_edit()


def _remove_queued(store: ConversationStore, qid: int) -> None:
    """on_click of a queued message's Remove: out of the queue, never sent."""
    try:
        removed = store.remove_queued_message(qid)
    except StoreFault as fault:
        storage.remember(fault)
        return
    st.session_state[_QUEUED_NOTICE_KEY] = "queued_removed" if removed else "queued_gone"


def rescue_queued_edit(ctx: PageContext, conv: Conversation | None, waiting: list[QueuedMessage]) -> None:
    """The queued message edited in this session left the queue (sent by another page, or removed elsewhere): the
    edited text is not dropped but opened as an edit of the sent message (a new version of it, to send), or, when
    that message is not on the conversation's path, put back in the chat box. Call before the history is drawn
    (it fills the edit box there and the chat box below)."""
    editing = st.session_state.get(state.QUEUED_EDITING_KEY)
    if editing is None or conv is None or editing[0] != conv.id or editing[1] in {m.id for m in waiting}:
        return
    _, _, original, last = editing
    text = state.typed_text(state.QUEUED_EDIT_KEY) or original
    _stop_queued_edit()
    # Sent: a user message with its text, made after the edit began (a removed one has none: an earlier message
    # with the same text is not it).
    sent = next(
        (
            m
            for m in reversed(conv.messages)
            if m.role == "user" and m.content == original and (last is None or m.id > last)
        ),
        None,
    )
    if sent is not None:
        _start_edit(conv.id, sent.id, text)
        st.warning(ctx.t("queued_sent_while_edited"))
    else:
        _set_aside(ctx, text, "queued_gone_while_edited", conv.id)


def pending_reply(conv: Conversation | None) -> Pending | None:
    """The regenerate or edit of `conv` whose reply has yet to start (after act()). It stays in the session until
    `stream` has started it, so a run that ends before (any interaction) or a reply of the conversation running
    meanwhile (another tab) delays it rather than drop it; one for another conversation, or already started, is
    dropped."""
    pending = st.session_state.get(_PENDING_KEY)
    if not isinstance(pending, Pending):
        return None
    if conv is None or pending.cid != conv.id or live_replies().taken(pending.token):
        st.session_state.pop(_PENDING_KEY, None)
        return None
    return pending


@dataclass
class _ReplySetup:
    """What the page's widgets say about the next reply, read before it starts (reading the session is a point where
    Streamlit may end the run; nothing after `start` should be one before the reply runs)."""

    backend: ChatBackend
    params: SamplingParams
    system_prompt: str
    max_length: int | None
    steps: list[dict]  # the tool calls of the reply, when tools are on
    source: Callable[..., Iterator[str]] | None

    @classmethod
    def read(cls, ctx: PageContext, backend: ChatBackend) -> _ReplySetup:
        steps: list[dict] = []
        return cls(
            backend,
            state.sampling_params(ctx.settings),
            st.session_state.get(state.SYSTEM_PROMPT_KEY, ""),
            st.session_state.get(state.MAX_LENGTH_KEY),
            steps,
            tools_view.reply_stream(ctx, backend, steps),
        )

    def start(self, store: ConversationStore, cid: str, version_of: int | None, live: LiveReplies) -> ReplyInProgress:
        """Start the reply (the conversation claimed in `live`); StoreFault when it cannot even be created."""
        reply = WebReply(
            self.backend,
            store,
            cid,
            self.params,
            max_length=self.max_length,
            version_of=version_of,
            stream=self.source,
        )
        return reply.start(live)


def stream(ctx: PageContext, backend: ChatBackend, store: ConversationStore, pending: Pending) -> NoReturn:
    """Stream the `pending` regenerated reply (a new version of it) or reply to an edited message into an assistant
    bubble, then redraw the page from the store. The page calls it when no reply of the conversation runs; if one
    has just started meanwhile (another tab), the request stays pending and the page redraws showing that one."""
    setup = _ReplySetup.read(ctx, backend)
    live, cid = live_replies(), pending.cid
    ticket = live.claim(cid, pending.token)
    if ticket is None:
        st.rerun()
    try:
        with storage.writing():
            store.update_settings(cid, setup.system_prompt, state.conversation_settings(setup.params))
        reply = setup.start(store, cid, pending.version_of, live)
    except BaseException:
        live.release(cid, ticket, pending.token)  # the request may be tried again (no effect once the reply started)
        raise
    st.session_state.pop(_PENDING_KEY, None)  # started: even if this run ends here, `taken` keeps it from a rerun
    _follow(ctx, cid, reply, setup.steps)


def _follow(ctx: PageContext, cid: str, reply: ReplyInProgress, steps: list[dict]) -> NoReturn:
    """Draw the started reply in an assistant bubble until it ends, then redraw the page from the store. The page's
    run may end at any point here (any interaction): the reply goes on."""
    # Streamlit keeps the last run's elements on screen until this run replaces them, and a streaming run ends late:
    # this empty slot takes the place of the bubble the reply replaces (a regenerated one, with its buttons), so no
    # stale button stays clickable while the new reply streams in the next slot.
    st.empty()
    with st.chat_message("assistant"):
        # The click ends this run like any other interaction; its callback, run before the next run, stops the reply
        # there within one token.
        st.button(
            ctx.t("stop"), key="stop_reply", icon=":material/stop_circle:", on_click=live_replies().stop, args=(cid,)
        )
        live_steps = tools_view.LiveSteps(steps, ctx.t)
        box = st.empty()
        box.markdown(CURSOR)

        def show(text: str) -> None:
            live_steps.refresh()
            box.markdown(message_markdown(text) + CURSOR)

        def poll() -> None:
            state.stop_point()
            live_steps.refresh()  # a tool call shows while its tool runs: no text comes meanwhile

        view = ReplyView(
            show=show,
            on_queue=lambda place: box.info(ctx.t("queue_place", place=place)),
            on_start=lambda: rerun_when_finished(cid),  # a stop ends the script; this then redraws it stopped
            poll=poll,
        )
        try:
            reply.follow(view)
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
    state.open_new_conversation(cid)
    return cid
