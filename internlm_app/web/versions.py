"""Reply versions and branches on the chat page: the ‹ 2/3 › switcher under a message, and fork.

A regenerated reply and an edited user message are new versions of that message (the store keeps the tree); the
path on screen, and the context the model reads, runs through the selected version of each message.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.store.records import Conversation
from internlm_app.store.tree import Versions
from internlm_app.web import state, storage
from internlm_app.web.resources import live_replies


def versions_on_path(conv: Conversation | None) -> dict[int, Versions]:
    """The versions of every message on the shown path (computed from the tree: no query per message)."""
    if conv is None:
        return {}
    siblings: dict[int | None, list[int]] = {}
    for m in conv.tree:
        siblings.setdefault(m.parent_id, []).append(m.id)
    found = {}
    for m in conv.messages:
        ids = tuple(sorted(siblings.get(m.parent_id, [m.id])))
        found[m.id] = Versions(ids, ids.index(m.id))
    return found


def _select(store: ConversationStore, cid: str, mid: int, busy_text: str) -> None:
    """on_click of ‹ and ›: show version `mid` (and the most recent branch below it)."""
    if live_replies().reply_of(cid) is not None:  # a reply of this conversation streams: its path stays
        st.toast(busy_text)
        return
    try:
        store.select(mid)
    except StoreFault as fault:
        storage.remember(fault)


def switcher(
    t: Callable[..., str], store: ConversationStore, cid: str, versions: Versions | None, locked: bool
) -> None:
    """‹ 2/3 › under a message that has more than one version; `locked` while a reply streams or a message is
    edited (then the path must not change)."""
    if versions is None or len(versions.ids) < 2:
        return
    ids, index = versions.ids, versions.index
    mid, busy = ids[index], t("versions_busy")
    st.button(
        "‹",
        key=f"version_prev_{mid}",
        help=t("version_prev"),
        type="tertiary",
        disabled=locked or index == 0,
        on_click=_select,
        args=(store, cid, ids[max(index - 1, 0)], busy),
    )
    st.caption(f"{index + 1} / {len(ids)}", width="content")
    st.button(
        "›",
        key=f"version_next_{mid}",
        help=t("version_next"),
        type="tertiary",
        disabled=locked or index == len(ids) - 1,
        on_click=_select,
        args=(store, cid, ids[min(index + 1, len(ids) - 1)], busy),
    )


def _fork(store: ConversationStore, cid: str, mid: int, done: str) -> None:
    """on_click of Fork: the path down to `mid` becomes a new conversation, opened in this tab."""
    try:
        new = store.fork(cid, mid)
    except StoreFault as fault:
        storage.remember(fault)
        return
    except KeyError:  # deleted meanwhile (another tab)
        return
    state.set_conversation_id(new)
    st.toast(done)


def fork_button(t: Callable[..., str], store: ConversationStore, cid: str, mid: int) -> None:
    """Copy the conversation up to this message into a new one and open it."""
    st.button(
        t("fork"),
        key=f"fork_{mid}",
        icon=":material/call_split:",
        help=t("fork_help"),
        type="tertiary",
        on_click=_fork,
        args=(store, cid, mid, t("forked")),
    )
