"""The chat page's sidebar groups: conversations, model and GPU, sampling parameters, system prompt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import streamlit as st

from internlm_app.chat_types import ChatBackend, DeviceMemory
from internlm_app.runtime import gpu
from internlm_app.sampling import BOUNDS, INT_PARAMS
from internlm_app.settings import MAX_LENGTH_BOUNDS
from internlm_app.store.db import ConversationStore
from internlm_app.store.export_format import MAX_PROMPT_CHARS
from internlm_app.store.records import Conversation
from internlm_app.web import state, storage
from internlm_app.web.context import PageContext
from internlm_app.web.page import queue_caption
from internlm_app.web.safe_markdown import plain

RECENT_CONVERSATIONS = 8
_CONFIRM_DELETE_KEY = "_confirm_delete_chat"


@storage.stops_on_fault
def conversations(ctx: PageContext, store: ConversationStore, conv: Conversation | None) -> None:
    """New conversation, the recent ones (switch), and rename/delete (with confirmation) of the open one."""
    if st.button(
        ctx.t("new_chat"), key="new_chat", icon=":material/add:", help=ctx.t("new_chat_help"), width="stretch"
    ):
        state.set_conversation_id(None)
        st.rerun()
    for item in store.list_conversations(limit=RECENT_CONVERSATIONS):
        current = conv is not None and item.id == conv.id
        label = plain(" ".join(item.title.split())) or ctx.t("untitled")  # anyone's text: never Markdown
        kind: Literal["primary", "tertiary"] = "primary" if current else "tertiary"
        if st.button(label, key=f"open_{item.id}", type=kind, width="stretch") and not current:
            state.set_conversation_id(item.id)
            st.rerun()
    if conv is None:
        return
    with st.expander(ctx.t("manage_chat")):
        title = st.text_input(ctx.t("rename_label"), key=state.RENAME_KEY)
        if st.button(ctx.t("rename"), key="rename"):
            with storage.writing(keep={state.RENAME_KEY: title}):
                store.rename(conv.id, title)
            st.rerun()
        if st.session_state.get(_CONFIRM_DELETE_KEY) != conv.id:  # asked for this conversation, not another one
            st.button(ctx.t("delete"), key="delete_chat", on_click=_ask_delete, args=(conv.id,))
            return
        st.warning(ctx.t("delete_confirm_text"))
        yes, no = st.columns(2)
        if yes.button(ctx.t("delete_yes"), key="delete_confirm", type="primary"):
            with storage.writing():
                store.delete(conv.id)
            _ask_delete(None)
            state.set_conversation_id(None)
            st.rerun()
        no.button(ctx.t("cancel"), key="delete_cancel", on_click=_ask_delete, args=(None,))


def _ask_delete(cid: str | None) -> None:
    st.session_state[_CONFIRM_DELETE_KEY] = cid


def model_panel(ctx: PageContext, backend: ChatBackend) -> None:
    """The model in use, GPU memory (or "CPU"), the engine queue, and a clear-cache button with before/after."""
    info = backend.info
    if not backend.local:  # what the server says it serves, and where
        st.caption(ctx.t("model_remote", name=info.name, url=info.extra.get("base_url", "")))
    else:
        st.caption(ctx.t("model_line", name=info.name, dtype=info.dtype, device=info.device))
    devices = gpu.memory_report()
    for d in devices:
        st.caption(ctx.t("gpu_line", name=d.name, **_memory(d)))
    if not devices:
        st.caption(ctx.t("gpu_none"))
    queue = backend.queue
    if queue is not None:
        st.caption(queue_caption(ctx, queue))
    if st.button(ctx.t("clear_gpu"), key="clear_gpu", icon=":material/cleaning_services:"):
        before, after = backend.release_memory()  # the engine also drops KV kept for reuse
        if not before:
            st.info(ctx.t("clear_gpu_cpu"))
        for b, a in zip(before, after, strict=True):
            st.success(
                ctx.t("clear_gpu_done", name=b.name, before=_memory(b)["reserved"], after=_memory(a)["reserved"])
            )


def _memory(d: DeviceMemory) -> dict[str, str]:
    return {k: gpu.format_bytes(getattr(d, k)) for k in ("allocated", "reserved", "total")}


def sampling_controls(ctx: PageContext, backend: ChatBackend, extra: Callable[[], None] | None = None) -> None:
    """Sliders for every sampling bound, the context budget, and the system prompt (used from the next message on);
    `extra` draws more under the system prompt (the presets)."""
    state.init_widget_defaults(ctx.settings, backend)
    with st.expander(ctx.t("sampling"), icon=":material/tune:"):
        for name, bound in BOUNDS.items():
            cast = int if name in INT_PARAMS else float
            st.slider(
                ctx.t(f"param_{name}"),
                min_value=cast(bound.low),
                max_value=cast(bound.high),
                step=cast(bound.step),
                key=name,
                help=ctx.t(f"help_{name}"),
                on_change="ignore",
                persist_state="session",
            )
        limit = state.context_limit(backend)
        st.slider(
            ctx.t("param_max_length"),
            min_value=MAX_LENGTH_BOUNDS[0],
            max_value=max(limit, MAX_LENGTH_BOUNDS[0] + 1),
            key=state.MAX_LENGTH_KEY,
            help=ctx.t("help_max_length"),
            on_change="ignore",
            persist_state="session",
        )
    with st.expander(ctx.t("system_prompt"), icon=":material/edit_note:"):
        st.text_area(
            ctx.t("system_prompt"),
            key=state.SYSTEM_PROMPT_KEY,
            height=160,
            max_chars=MAX_PROMPT_CHARS,  # what an export may hold: the conversation stays importable
            label_visibility="collapsed",
            on_change="ignore",
            persist_state="session",
        )
        st.button(ctx.t("system_prompt_reset"), key="reset_system_prompt", on_click=_reset_prompt, args=(ctx,))
        if extra is not None:
            extra()


def _reset_prompt(ctx: PageContext) -> None:
    st.session_state[state.SYSTEM_PROMPT_KEY] = ctx.settings.system_prompt
