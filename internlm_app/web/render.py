"""How a message looks: Markdown with LaTeX, the stats caption, the stopped/error marks."""

from __future__ import annotations

import re
from collections.abc import Callable

import streamlit as st

from internlm_app.store.records import StoredMessage
from internlm_app.web.attachments_view import show_attachments
from internlm_app.web.i18n import LABELS
from internlm_app.web.safe_markdown import plain, safe_markdown
from internlm_app.web.tools_view import show_steps

_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)", re.DOTALL)
_DISPLAY_MATH = re.compile(r"\\\[(.+?)\\\]", re.DOTALL)
_INLINE_MATH = re.compile(r"\\\((.+?)\\\)", re.DOTALL)
CURSOR = " ▌"

Translate = Callable[..., str]


def to_markdown(text: str) -> str:
    """InternLM writes math as \\(..\\) and \\[..\\]; Streamlit wants $..$ and $$ on their own lines (not in code)."""
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code
        parts[i] = _INLINE_MATH.sub(r"$\1$", _DISPLAY_MATH.sub(r"\n$$\n\1\n$$\n", parts[i]))
    return "".join(parts)


def message_markdown(text: str) -> str:
    """A message as the page renders it: LaTeX for Streamlit, and nothing that makes the browser reach out."""
    return safe_markdown(to_markdown(text))


def stats_caption(stats: dict | None, status: str, t: Translate) -> str:
    """One line under a reply: tokens, time to first token, prompt tokens from the KV cache, tokens/s, why it ended."""
    stats = stats or {}
    parts = []
    if status == "stopped":
        parts.append(t("stopped_mark"))
    if stats.get("completion_tokens") is not None:
        parts.append(t("stat_tokens", n=stats["completion_tokens"]))
    if stats.get("time_to_first_token") is not None:
        parts.append(t("stat_ttft", s=stats["time_to_first_token"]))
    if stats.get("cached_tokens"):  # the earlier turns' KV cache, reused rather than read again
        parts.append(t("stat_cached", n=stats["cached_tokens"]))
    if stats.get("tokens_per_second") is not None:
        parts.append(t("stat_speed", v=stats["tokens_per_second"]))
    if stats.get("finish_reason"):
        reason = stats["finish_reason"]
        parts.append(t("stat_finish", reason=t("finish_" + reason)))
    return " · ".join(parts)


def error_text(stats: dict, t: Translate) -> str:
    """Why a reply failed, as Markdown: a known kind (`error_code`) in the page's language with the English details
    after it, else the English message (imports set it too)."""
    details = plain(stats.get("error") or t("unknown_error"))
    code = stats.get("error_code")
    if code and f"error_{code}" in LABELS:
        return t("error_details", reason=t(f"error_{code}"), details=details)
    return details


def show_message(message: StoredMessage, t: Translate, *, live: bool = False) -> None:
    """Draw one stored message in a chat bubble (the caller adds buttons inside the same bubble)."""
    stats = message.stats or {}
    if stats.get("tool_steps"):  # the reply's tool calls, before its text (tools_view)
        show_steps(stats["tool_steps"], t)
    if message.content:
        st.markdown(message_markdown(message.content))
    show_attachments(message.attachments, t)
    if message.role != "assistant":
        return
    if message.status == "streaming":
        st.caption(t("generating") if live else t("interrupted"))
        return
    if message.status == "error":
        st.error(t("reply_error", error=error_text(stats, t)))
    elif message.status == "stopped" and not message.content:
        st.caption(t("stopped_before_first_token"))
    if stats.get("dropped_messages"):
        st.info(t("dropped_messages", n=stats["dropped_messages"]))
    st.caption(stats_caption(stats, message.status, t))
