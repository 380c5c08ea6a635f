"""What the model sees of a stored conversation: each user turn with its attached files, each reply with the tool
calls it made (InternLM2's call and `environment` turns), so a reload, a regenerate or a follow-up gives the model
the same context the first send did.

Where it is stored:
- An attachment's `text` is the block the model was given (`attachments.FittedAttachment.block`: the `File:` header
  and the fenced text of what fitted), its `tokens` that block's count; the message's `content` is what was typed.
- A reply's tool calls are in its stats (`ToolReplyStats.tool_steps`): per call its id, name, arguments (JSON text),
  the text the model wrote before it and the result. The reply's `content` is all the text it wrote, the steps'
  texts first, so one message stays one reply (regenerate, versions and feedback work on it as on any reply).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from internlm_app.chat.attachments import FittedAttachment, with_attachments
from internlm_app.chat_types import Message, ReplyStats
from internlm_app.store.db import ConversationStore
from internlm_app.store.records import StoredMessage
from internlm_app.store.tree import Attachment


@dataclass
class ToolReplyStats(ReplyStats):
    """A reply's stats (summed over its steps) with the tool calls it made, saved with the reply."""

    tool_steps: list[dict] = field(default_factory=list)


def stored_attachment(fitted: FittedAttachment, mime_type: str) -> Attachment:
    """The store's record of a file as it was sent: its block (what the model read) and that block's tokens."""
    return Attachment(fitted.name, mime_type or "text/plain", fitted.block, fitted.tokens)


def user_turn(message: StoredMessage) -> Message:
    """A user message with its files' blocks before the text, as `attachments.with_attachments` built it."""
    blocks = [FittedAttachment(a.name, a.text, a.tokens, True, "whole") for a in message.attachments]
    return {"role": "user", "content": with_attachments(message.content, blocks)}


def finished_steps(stats: dict | None) -> list[dict]:
    """The tool calls of a reply that ran (a call stopped before its tool ran is left out, as the runner does)."""
    return [step for step in (stats or {}).get("tool_steps") or [] if "result" in step]


def reply_turns(message: StoredMessage) -> list[Message]:
    """A reply as InternLM2 turns: per tool call the assistant's call and the `environment` result, then the answer."""
    steps = finished_steps(message.stats)
    if not steps:
        return [{"role": "assistant", "content": message.content}]
    turns: list[Message] = []
    for step in steps:
        call = {"id": step.get("id", ""), "name": step["name"], "arguments": step.get("arguments", "")}
        turns.append({"role": "assistant", "content": step.get("text", ""), "tool_calls": [call]})
        turns.append({"role": "environment", "name": "plugin", "content": step["result"]})
    before = "".join(step.get("text", "") for step in steps)
    answer = message.content[len(before) :] if message.content.startswith(before) else message.content
    return [*turns, {"role": "assistant", "content": answer}]


def model_messages(store: ConversationStore, cid: str) -> list[Message]:
    """`store.messages_for_model` with the files of user turns and the tool calls of replies put back in."""
    conv = store.get_conversation(cid)
    if conv is None:
        raise KeyError(f"no conversation {cid!r}")
    messages: list[Message] = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
    for m in conv.messages:
        if m.role == "assistant" and (m.status == "error" or not (m.content.strip() or finished_steps(m.stats))):
            continue
        if m.role == "user":
            messages.append(user_turn(m))
        elif m.role == "assistant":
            messages += reply_turns(m)
        else:
            messages.append({"role": m.role, "content": m.content})
    return messages
