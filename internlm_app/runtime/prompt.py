"""The InternLM2 chat prompt (the official `build_inputs` format, with its tool turns) as ids: typed text never
becomes a control token.

Format: InternLM's chat/chat_format.md. Every turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a system or
environment turn may carry a name (`<|im_start|>system name=<|plugin|>\\n...`: the offered tools, or a tool's result);
an assistant's tool call follows its text as
`<|action_start|><|plugin|>\\n{"name": ..., "parameters": ...}<|action_end|>`.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from internlm_app.chat_types import ROLES, InvalidRequestError, Message, not_unicode

TURN_NAMES = ("plugin", "interpreter")  # the `name=` a system or environment turn may carry
_SPEAKER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class PromptEncoder(Protocol):
    """What the prompt builder needs from a tokenizer: the structural ids and a plain-text encoder."""

    bos_id: int | None
    im_start_id: int
    im_end_id: int
    tool_ids: dict[str, int]

    def encode_plain(self, text: str) -> list[int]: ...


def validate_messages(messages: list[Message]) -> None:
    """Raise InvalidRequestError for an unknown role or name, or content that is not text."""
    for index, message in enumerate(messages):
        role, content, name = message.get("role"), message.get("content"), message.get("name")
        if role not in ROLES:
            raise InvalidRequestError(f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise InvalidRequestError(f"message {index}: content must be a string, not {type(content).__name__}")
        if name is not None and (name not in TURN_NAMES or role not in ("system", "environment")):
            raise InvalidRequestError(f"message {index}: a {role} turn cannot be named {name!r}")
        if message.get("tool_calls") and role != "assistant":
            raise InvalidRequestError(f"message {index}: only an assistant message has tool calls")
        speaker = message.get("speaker")
        if speaker is not None and (name is not None or not isinstance(speaker, str) or not _SPEAKER.match(speaker)):
            raise InvalidRequestError(f"message {index}: a speaker name is 1-64 letters, digits, _ or -")


def _no_constant(value: str) -> object:
    raise ValueError(f"{value} is not JSON")


def tool_call_text(name: str, arguments: str) -> str:
    """The JSON of one call as InternLM2 writes it: {"name": ..., "parameters": {...}}.

    Raises InvalidRequestError unless `arguments` is a JSON object of Unicode text (no NaN, not nested past
    Python's recursion limit)."""
    where = f"tool call {name!r}: arguments"
    try:
        parameters = json.loads(arguments, parse_constant=_no_constant) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{where} are not JSON ({exc.msg})", "messages") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{where} are not JSON ({exc or 'nested too deeply'})", "messages") from None
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"{where} must be a JSON object", "messages")
    text = json.dumps({"name": name, "parameters": parameters}, ensure_ascii=False)
    if why := not_unicode(text):  # an escape such as "\udfff" decodes to a lone surrogate
        raise InvalidRequestError(f"{where} are not valid Unicode text: {why}", "messages")
    return text


def _tool(tok: PromptEncoder, name: str) -> int:
    if name not in tok.tool_ids:
        raise InvalidRequestError(f"this model's vocabulary has no {name} token: it cannot use tools")
    return tok.tool_ids[name]


def build_prompt_ids(
    tok: PromptEncoder, messages: list[Message], add_generation_prompt: bool = True, continue_final: bool = False
) -> list[int]:
    """BOS, one turn per message (an empty system message is left out), then `<|im_start|>assistant\\n`.

    `continue_final`: the last message is the assistant's, left open (no `<|im_end|>`, no new header), so the model
    continues it (prefill).
    """
    # Markers and BOS are control ids; the text between two of them ("role\ncontent", "\n") is one plain chunk, as in
    # the official code's sentencepiece calls, so ids match it, except that control-token text typed in a message
    # stays text.
    validate_messages(messages)
    if continue_final and (not messages or messages[-1]["role"] != "assistant"):
        raise InvalidRequestError("only an assistant message can be continued")
    parts: list[int | str] = [] if tok.bos_id is None else [tok.bos_id]
    for index, message in enumerate(messages):
        role, content, name = message["role"], message["content"], message.get("name")
        if role == "system" and not content and name is None:
            continue
        if name is not None:
            parts += [tok.im_start_id, f"{role} name=", _tool(tok, f"<|{name}|>"), f"\n{content}"]
        elif message.get("speaker"):
            parts += [tok.im_start_id, f"{role} name={message['speaker']}\n{content}"]
        else:
            parts += [tok.im_start_id, f"{role}\n{content}"]
        for call in message.get("tool_calls") or []:
            action = tool_call_text(call["name"], call["arguments"])
            parts += [_tool(tok, "<|action_start|>"), _tool(tok, "<|plugin|>"), f"\n{action}"]
            parts += [_tool(tok, "<|action_end|>")]
        if continue_final and index == len(messages) - 1:
            break
        parts += [tok.im_end_id, "\n"]
    else:
        if add_generation_prompt:
            parts += [tok.im_start_id, "assistant\n"]
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids.append(part)
        elif part:
            ids += tok.encode_plain(part)
    return ids
