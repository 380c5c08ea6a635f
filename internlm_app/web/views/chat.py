"""Chat page: one conversation, streaming replies, the sampling sidebar (app.py routes here by default)."""

import streamlit as st

from internlm_app.store.export_format import MAX_CONTENT_CHARS
from internlm_app.web import attachments_view, chat, presets, sidebar, tools_view
from internlm_app.web.loading import require_backend
from internlm_app.web.page import exit_unless_streamlit, start_page
from internlm_app.web.storage import open_store

exit_unless_streamlit("internlm_app/web/views/chat.py")
ctx = start_page("nav_chat")
backend = require_backend(ctx)  # while it loads: its progress; a failure stops the page with what to do
store = open_store(ctx)
conv = chat.open_conversation(ctx, store)
conv, live = chat.live_reply(ctx, store, conv)

with st.sidebar:
    sidebar.conversations(ctx, store, conv)
    sidebar.model_panel(ctx, backend)
    sidebar.sampling_controls(ctx, backend, extra=lambda: presets.picker(ctx, store))
    tools_view.sidebar(ctx, backend)

if conv is None:
    st.caption(ctx.t("chat_intro"))
running = chat.reply_running(conv)  # also one another tab is starting right now
pending = chat.pending_reply(conv)  # a regenerated or edited reply to start, once no other reply runs
starts_now = pending if pending is not None and not running else None
waiting = chat.queued(store, conv)
chat.rescue_queued_edit(ctx, conv, waiting)
# Typing never ends a reply: a message sent while one runs (here or in the background) waits in a queue, shown, and
# goes out when it ends, after those queued before it. Only a Stop button ends a reply.
busy = running or pending is not None
next_up = None if busy else chat.sendable(waiting)  # the queued message this run sends, unless the user acts
sending = next_up is not None or chat.typed_now()  # its reply streams in this run: no buttons in the history
action = chat.show_history(ctx, store, conv, live, starts_now, sending)
if conv is not None and running and live is None:  # another page is starting a reply of it, this moment
    chat.rerun_when_started_or_free(conv.id)
turn = st.container() if next_up is not None else None  # where it shows with its reply: above those still queued
chat.show_queued(ctx, store, conv, [message for message in waiting if message is not next_up])
set_aside = chat.show_set_aside(ctx, conv)  # an edit whose message went meanwhile, to send as a new message
prompt, files = attachments_view.split_input(
    st.chat_input(
        ctx.t("chat_queue_here" if busy else "chat_placeholder"),
        key="prompt",
        max_chars=MAX_CONTENT_CHARS,  # what the store exports and imports again
        accept_file="multiple",  # any type: one the app cannot read is refused in the files panel, translated
    )
)
if files:  # files are sent only after their token cost was shown: held in a panel with the text, to confirm
    attachments_view.hold(backend, prompt or "", files)
    prompt = None
outgoing = attachments_view.confirm_panel(ctx, backend, store, conv, busy)

if set_aside is not None and not prompt:
    chat.forget_set_aside()
    prompt = set_aside
if prompt and conv is not None and (running or waiting or pending is not None):
    chat.queue_message(store, conv, prompt)
elif prompt:
    chat.send(ctx, backend, store, conv, prompt)
elif outgoing is not None:
    chat.send(ctx, backend, store, conv, outgoing.text, outgoing.attachments)
elif action and conv is not None:
    chat.act(ctx, store, conv, action)
elif starts_now is not None:
    chat.stream(ctx, backend, store, starts_now)
elif next_up is not None:
    chat.send(ctx, backend, store, conv, next_up.content, queued=next_up, slot=turn)
