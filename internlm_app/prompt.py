"""The InternLM2 chat prompt (the official `build_inputs` format) as ids: typed text never becomes a control token."""

from __future__ import annotations

from typing import Protocol

from .chat_types import ROLES, InvalidRequestError, Message


class PromptEncoder(Protocol):
    """What the prompt builder needs from a tokenizer: the structural ids and a plain-text encoder."""

    bos_id: int | None
    im_start_id: int
    im_end_id: int

    def encode_plain(self, text: str) -> list[int]: ...


def validate_messages(messages: list[Message]) -> None:
    """Raise InvalidRequestError for an unknown role, non-text content or a system message that is not first."""
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequestError(f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise InvalidRequestError(f"message {index}: content must be a string, not {type(content).__name__}")
        if role == "system" and index != 0:
            raise InvalidRequestError(f"message {index}: a system message is only allowed as the first message")


def build_prompt_ids(tok: PromptEncoder, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """BOS, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn (no empty system) + `<|im_start|>assistant\\n`."""
    # Markers and BOS are control ids; the text between two of them ("role\ncontent", "\n") is one plain chunk, as in
    # the official code's sentencepiece calls, so ids match it, except that control-token text typed in a message
    # stays text.
    validate_messages(messages)
    parts: list[int | str] = [] if tok.bos_id is None else [tok.bos_id]
    for message in messages:
        if message["role"] == "system" and not message["content"]:
            continue
        parts += [tok.im_start_id, f"{message['role']}\n{message['content']}", tok.im_end_id, "\n"]
    if add_generation_prompt:
        parts += [tok.im_start_id, "assistant\n"]
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids.append(part)
        else:
            ids += tok.encode_plain(part)
    return ids
