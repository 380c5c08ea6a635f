"""Under a finished reply: thumbs up or down (saved with the reply) and a copy of its whole text.

Giving feedback is an interaction like any other: while a reply streams it reruns the page, which hands that reply
to the background (`reply.WebReply.run`), so feedback never ends a reply. Only Stop does.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.store.records import StoredMessage
from internlm_app.web import storage

FEEDBACK_STATUSES = ("complete", "stopped")  # a finished reply; an error or an interrupted one gets none


def feedback_key(mid: int) -> str:
    return f"feedback_{mid}"


def _save(store: ConversationStore, mid: int) -> None:
    """on_change of the thumbs: 1 up, 0 down, None when the choice is taken back."""
    try:
        store.set_feedback(mid, st.session_state.get(feedback_key(mid)))
    except StoreFault as fault:  # the page shows why; the thumbs show what is saved
        storage.remember(fault)


def thumbs(store: ConversationStore, message: StoredMessage) -> None:
    """st.feedback("thumbs") showing the saved feedback of a finished reply."""
    if message.status not in FEEDBACK_STATUSES or not message.content:
        return
    key = feedback_key(message.id)
    # The saved value, every run: it is what a callback just saved, or what another tab set meanwhile.
    st.session_state[key] = message.feedback
    st.feedback("thumbs", key=key, on_change=_save, args=(store, message.id))


def copy_button(t: Callable[..., str], message: StoredMessage) -> None:
    """The whole reply as Streamlit's own code block (its copy button at the top right) in a popover: no script of
    our own reaches the clipboard. Code blocks inside the reply have the same button already."""
    if not message.content:
        return
    popover = st.popover(
        t("copy"), icon=":material/content_copy:", help=t("copy_help"), type="tertiary", key=f"copy_{message.id}"
    )
    with popover:
        st.code(message.content, language=None, wrap_lines=True)
