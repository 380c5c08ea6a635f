"""The records the conversation store returns (a conversation, its messages, a list entry) and the small checks and
conversions of their fields."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from internlm_app.chat_types import ReplyStats
from internlm_app.store.tree import FEEDBACK_VALUES, Attachment

STATUSES = ("complete", "streaming", "stopped", "error")
TITLE_MAX = 60  # characters of the first user message used as the automatic title
TITLE_LIMIT = 200  # longest title a user may set


@dataclass
class StoredMessage:
    """One saved message of a conversation."""

    id: int
    conversation_id: str
    role: str
    content: str
    created_at: float
    status: str = "complete"
    stats: dict | None = None
    parent_id: int | None = None
    feedback: int | None = None  # 1 thumbs up, 0 thumbs down, None none (st.feedback("thumbs"))
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class Conversation:
    """A conversation with its settings and the path of messages from the root to the selected leaf.

    `tree` holds every message (every version and branch), parents before children; `leaf_id` is the selected leaf."""

    id: str
    title: str
    system_prompt: str
    settings: dict
    created_at: float
    updated_at: float
    messages: list[StoredMessage] = field(default_factory=list)
    tree: list[StoredMessage] = field(default_factory=list)
    leaf_id: int | None = None


@dataclass
class ConversationSummary:
    """What the conversation list shows."""

    id: str
    title: str
    created_at: float
    updated_at: float
    message_count: int  # messages on the selected path


def new_id() -> str:
    """A short random url-safe conversation id."""
    return secrets.token_urlsafe(8)


def title_from(text: str) -> str:
    """An automatic title: the text on one line, truncated to TITLE_MAX characters."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_MAX else line[: TITLE_MAX - 1].rstrip() + "…"


def escape_like(text: str) -> str:
    """`text` as a LIKE pattern matching it literally anywhere (escape character backslash)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    """ValueError unless `value` is one of `allowed` (`what` names the field in the message)."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def check_feedback(value: int | None) -> None:
    """ValueError unless `value` is 1 (thumbs up), 0 (thumbs down) or None."""
    if value is not None and (type(value) is not int or value not in FEEDBACK_VALUES):
        raise ValueError(f"feedback must be 1 (thumbs up), 0 (thumbs down) or None, not {value!r:.40}")


def stats_json(stats: ReplyStats | dict | None) -> str | None:
    """Reply stats as the JSON text the messages table stores (None: no stats)."""
    if stats is None:
        return None
    return json.dumps(stats.to_dict() if isinstance(stats, ReplyStats) else dict(stats), ensure_ascii=False)
