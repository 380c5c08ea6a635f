"""Documents in the chat: files from the chat input are not sent at once. A panel shows each file's token cost and
whether it fits the context budget (when not, what part would go: the leading pages or lines, or the parts that match
the message best), with the message still editable; Send sends it, Cancel puts the text back in the chat input and
saves nothing. A sent file shows under its message with the part used, its tokens and its text."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

import streamlit as st

from internlm_app.chat.attachments import (
    JOIN_TOKENS,
    Attachment,
    AttachmentError,
    FittedAttachment,
    fit_attachments,
    read_attachment,
    room_for_attachments,
    token_counter,
)
from internlm_app.chat.context import model_messages, stored_attachment
from internlm_app.chat_types import ChatBackend, Message
from internlm_app.store.db import ConversationStore
from internlm_app.store.export_format import MAX_ATTACHMENTS, MAX_CONTENT_CHARS
from internlm_app.store.records import Conversation
from internlm_app.store.tree import Attachment as StoredAttachment
from internlm_app.web import state
from internlm_app.web.safe_markdown import code_span, plain

log = logging.getLogger(__name__)

STRATEGY_KEY = "attach_strategy"
_PLAN_KEY = "_attach_plan"  # (what the plan was made for, the plan)
STRATEGIES = ("leading", "best_matching")
WHOLE = 10**12  # a budget every file fits in: its whole cost


@dataclass
class HeldFile:
    """A file from the chat input, read (or why not), waiting for Send or Cancel."""

    name: str
    mime_type: str
    attachment: Attachment | None
    reason: str | None = None  # AttachmentError.reason
    whole: FittedAttachment | None = None  # the file whole, counted once


@dataclass
class Outgoing:
    """What Send sends: the message and its files as the store keeps them."""

    text: str
    attachments: list[StoredAttachment]


def split_input(value) -> tuple[str | None, list]:
    """The chat input's value (a ChatInputValue with accept_file) as its text (None when empty) and its files."""
    if value is None or isinstance(value, str):
        return value or None, []
    return value.text or None, list(value.files or [])


def hold(backend: ChatBackend, text: str, files: list) -> None:
    """Keep the typed text and the files for the confirmation panel; each file is read and counted here, once."""
    count = token_counter(backend)
    held = []
    for number, file in enumerate(files):
        if number >= MAX_ATTACHMENTS:  # the store's (and an export's) limit per message
            held.append(HeldFile(file.name, file.type, None, "too_many_files"))
            continue
        try:
            attachment = read_attachment(file.name, file.getvalue())
        except AttachmentError as exc:
            held.append(HeldFile(file.name, file.type, None, exc.reason))
            continue
        except Exception:  # a fault of ours reading it: this file is refused, the message and other files stay
            log.exception("could not read the attachment %r", file.name)
            held.append(HeldFile(file.name, file.type, None, "unreadable"))
            continue
        whole = fit_attachments([attachment], count, WHOLE)[0]
        held.append(HeldFile(attachment.name, file.type, attachment, whole=whole))
    token = uuid.uuid4().hex  # these files (a plan made for them is theirs: `plan`)
    st.session_state[state.ATTACH_PENDING_KEY] = {
        "text": text,
        "files": held,
        "cid": state.conversation_id(),
        "token": token,
    }
    state.set_text(state.ATTACH_TEXT_KEY, text)


def pending() -> bool:
    return bool(st.session_state.get(state.ATTACH_PENDING_KEY))


def sent() -> None:
    """The panel's message went out: close the panel."""
    st.session_state.pop(state.ATTACH_PENDING_KEY, None)
    state.forget_text(state.ATTACH_TEXT_KEY)


def _cancel() -> None:
    """Nothing is saved; the message goes back into the chat input, to edit and send."""
    held = st.session_state.pop(state.ATTACH_PENDING_KEY, None) or {}
    text = state.typed_text(state.ATTACH_TEXT_KEY) or held.get("text") or ""
    state.forget_text(state.ATTACH_TEXT_KEY)
    if text:
        st.session_state[state.PROMPT_KEY] = text


def context_now(store: ConversationStore, conv: Conversation | None, text: str) -> list[Message]:
    """The prompt the message would go out with: the sidebar's system prompt, the conversation, the message."""
    history = [m for m in (model_messages(store, conv.id) if conv else []) if m["role"] != "system"]
    system = st.session_state.get(state.SYSTEM_PROMPT_KEY, "")
    return [*([{"role": "system", "content": system}] if system else []), *history, {"role": "user", "content": text}]


def room(backend: ChatBackend, store: ConversationStore, conv: Conversation | None, text: str, settings) -> int:
    """Tokens the context budget leaves for files: the window (or the sidebar's max length) less the prompt and the
    reply's max new tokens."""
    params = state.sampling_params(settings)
    messages = context_now(store, conv, text)
    return room_for_attachments(backend, messages, params.max_new_tokens, st.session_state.get(state.MAX_LENGTH_KEY))


def plan(
    files: list[HeldFile], backend: ChatBackend, budget: int, text: str, strategy: str, token: str = ""
) -> list[FittedAttachment]:
    """What of each readable file would be sent: all of each when they fit, else what fits by `strategy`. `token`
    names the held files (the last plan is kept for them)."""
    readable = [f for f in files if f.attachment is not None]
    if sum(f.whole.tokens for f in readable) + JOIN_TOKENS * len(readable) <= budget:
        return [f.whole for f in readable]
    # Fitting many long files takes seconds; the panel is drawn again on every run (a slider, a live reply's redraw):
    # the last plan is kept for the same files, budget, question and strategy.
    key = (token, budget, text if strategy == "best_matching" else "", strategy)
    kept = st.session_state.get(_PLAN_KEY)
    if kept is not None and kept[0] == key:
        return kept[1]
    count = token_counter(backend)
    fitted = fit_attachments([f.attachment for f in readable], count, budget, question=text, strategy=strategy)
    st.session_state[_PLAN_KEY] = (key, fitted)
    return fitted


def confirm_panel(ctx, backend: ChatBackend, store: ConversationStore, conv: Conversation | None, busy: bool):
    """The files waiting to be sent, their cost and what fits, with Send and Cancel; returns an Outgoing on Send."""
    held = st.session_state.get(state.ATTACH_PENDING_KEY)
    if not held or held.get("cid") != (conv.id if conv is not None else state.conversation_id()):
        return None  # (files held for another conversation wait there, with their message)
    files: list[HeldFile] = held["files"]
    with st.container(border=True, key="attach_panel"):
        st.markdown(f"**{ctx.t('attach_title')}**")
        text = state.text_box(ctx.t("attach_message"), state.ATTACH_TEXT_KEY, height=80, max_chars=MAX_CONTENT_CHARS)
        for f in files:
            if f.attachment is None:
                st.error(ctx.t(f"attach_error_{f.reason}", name=plain(f.name)), icon=":material/block:")
        readable = [f for f in files if f.attachment is not None]
        budget = room(backend, store, conv, text, ctx.settings)
        total = sum(f.whole.tokens for f in readable)
        for f in readable:
            size = ctx.t("attach_pages", n=len(f.attachment.pages)) if f.attachment.kind == "pdf" else ""
            size = size or ctx.t("attach_lines", n=len(f.attachment.text.splitlines()))  # (a last newline ends one)
            st.markdown(ctx.t("attach_file_cost", name=code_span(f.name), size=size, n=f"{f.whole.tokens:,}"))
        fitted: list[FittedAttachment] = []
        if readable:
            fits = total + JOIN_TOKENS * len(readable) <= budget
            if fits:
                st.success(ctx.t("attach_fits", n=f"{total:,}", room=f"{budget:,}"), icon=":material/check:")
            else:
                st.warning(ctx.t("attach_over", n=f"{total:,}", room=f"{budget:,}"), icon=":material/warning:")
                st.radio(
                    ctx.t("attach_strategy"),
                    STRATEGIES,
                    key=STRATEGY_KEY,
                    format_func=lambda s: ctx.t(f"attach_strategy_{s}"),
                    horizontal=True,
                )
            strategy = st.session_state.get(STRATEGY_KEY, STRATEGIES[0])
            fitted = plan(files, backend, budget, text, strategy, held.get("token", ""))
            if not fits:
                for f in fitted:
                    if f.block and f.complete:  # (not "sends lines 1-3" for all of it)
                        line = ctx.t("attach_part_whole", name=code_span(f.name), n=f"{f.tokens:,}")
                    elif f.block:
                        parts = code_span(part_words(", ".join(f.parts), ctx.t))
                        line = ctx.t("attach_part", name=code_span(f.name), parts=parts, n=f"{f.tokens:,}")
                    else:
                        line = ctx.t("attach_nothing_fits", name=code_span(f.name))
                    st.caption(line)
        can_send = bool(text.strip() or any(f.block for f in fitted))
        send, cancel = st.columns(2)
        clicked = send.button(
            ctx.t("attach_send"), key="attach_send", type="primary", disabled=busy or not can_send, width="stretch"
        )
        cancel.button(ctx.t("attach_cancel"), key="attach_cancel", on_click=_cancel, width="stretch")
        if busy:
            st.caption(ctx.t("attach_wait"))
    if not clicked:
        return None
    mime = {f.name: f.mime_type for f in readable}
    return Outgoing(text, [stored_attachment(f, mime.get(f.name, "")) for f in fitted if f.block])


def note_of(attachment: StoredAttachment) -> str:
    """What of the file was sent, as its block's header says ("page 1, page 2 of 12 pages"); "" when whole text."""
    header = attachment.text.split("\n", 1)[0]
    prefix = f"File: {attachment.name} ("
    return header[len(prefix) : -1] if header.startswith(prefix) and header.endswith(")") else ""


def part_words(text: str, t) -> str:
    """A part description as the prompt's header writes it in English ("page 1, page 2 of 12 pages", "lines 1-40 of
    300; the rest did not fit", "page 3, its start") in the page's language."""
    text = re.sub(r" of (\d+) pages$", lambda m: t("part_of_pages", n=int(m[1])), text)
    text = re.sub(r"^(\d+) pages$", lambda m: t("part_pages", n=int(m[1])), text)
    text = re.sub(r" of (\d+); the rest did not fit$", lambda m: t("part_of_lines", n=int(m[1])), text)
    text = re.sub(r"\bpage (\d+)", lambda m: t("part_page", n=int(m[1])), text)
    text = re.sub(r"\blines (\d+)-(\d+)", lambda m: t("part_lines", first=m[1], last=m[2]), text)
    return text.replace(", its start", t("part_start")).replace(", ", t("part_sep"))


def show_attachments(attachments: list[StoredAttachment], t) -> None:
    """Each file of a message: its name, the part sent and its tokens; the text the model read inside."""
    for a in attachments:
        note = part_words(note_of(a), t) or t("attach_whole")
        label = t("attachment_label", name=plain(a.name), note=plain(note), n=f"{a.tokens:,}")
        with st.expander(label, icon=":material/attach_file:"):
            st.code(a.text, language=None, wrap_lines=True)
