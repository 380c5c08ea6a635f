"""InternLM2 Chat web app, chat page: `streamlit run app.py` (plain `python app.py` only prints that command)."""

import streamlit as st

from internlm_app.web import chat, sidebar
from internlm_app.web.page import exit_unless_streamlit, start_page

exit_unless_streamlit("app.py")
ctx = start_page("nav_chat")
backend = ctx.backend()
store = ctx.store()
conv = chat.open_conversation(ctx, store)
live = chat.live_reply(conv)

with st.sidebar:
    sidebar.conversations(ctx, store, conv)
    sidebar.model_panel(ctx, backend)
    sidebar.sampling_controls(ctx, backend)

if conv is None:
    st.caption(ctx.t("chat_intro"))
action = chat.show_history(ctx, conv, live)
placeholder = ctx.t("chat_busy_here" if live is not None else "chat_placeholder")
prompt = st.chat_input(placeholder, key="prompt", submit_mode="stop", disabled=live is not None)

if prompt:
    chat.send(ctx, backend, store, conv, prompt)
elif action and conv is not None:
    chat.act(ctx, store, conv, action)
elif chat.take_pending(conv):
    chat.stream(ctx, backend, store, conv.id)
