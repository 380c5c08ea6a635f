"""Fitting a conversation into the context window: which turns stay, how many tokens the reply may have.

The prompt is InternLM2's chat format (`runtime/prompt.py`, through the tokenizer's `build_prompt_ids`); the budget is
the model's context window (or a request's smaller `max_length`), in tokens, shared by the prompt and the reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from internlm_app.chat_types import ContextTooLongError, InvalidRequestError, Message, ReplyOptions, not_unicode
from internlm_app.runtime.tokenizer import ChatTokenizer


@dataclass
class PreparedPrompt:
    """Prompt ids that fit the context budget, how many history messages were left out, the reply's token cap."""

    ids: list[int]
    dropped_messages: int
    max_new_tokens: int


def fit_prompt(
    tokenizer: ChatTokenizer, messages: list[Message], max_new_tokens: int, window: int, options: ReplyOptions
) -> PreparedPrompt:
    """Validate `messages` and build prompt ids that fit `window` tokens.

    The leading system messages are always kept. By default (the web app) the oldest turns are left out while
    prompt + `max_new_tokens` exceeds the budget; with `options.keep_history` (the API) turns are left out only
    when the prompt itself does not fit (then enough for min(max_new_tokens, a quarter of the budget) of reply),
    and otherwise the reply is capped to the room left. With no history left to drop, the reply is capped too;
    only a prompt that leaves no room at all is an error (ContextTooLongError). Bad messages raise
    InvalidRequestError.
    """
    check_unicode(messages)
    if options.raw_prompt:
        ids = tokenizer.encode(messages[0]["content"] if messages else "")
        if len(ids) >= window:
            raise ContextTooLongError(len(ids) + 1, window)
        return PreparedPrompt(ids, 0, min(max_new_tokens, window - len(ids)))
    if not messages or messages[-1].get("role") not in ("user", "environment", "assistant"):
        raise InvalidRequestError("the conversation must end with a user message, a tool result or a prefill")
    continue_final = messages[-1]["role"] == "assistant"
    if continue_final and messages[-1].get("tool_calls"):
        raise InvalidRequestError("the last message has tool calls: send their results before asking again")
    lead = 0
    while lead < len(messages) - 1 and messages[lead].get("role") == "system":
        lead += 1
    users = [i for i in range(lead, len(messages)) if messages[i].get("role") == "user"]
    start = users[-1] if users else len(messages) - 1  # the newest user message and what answers it so far
    system, history, new = messages[:lead], list(messages[lead:start]), messages[start:]
    suffix = tool_call_prefix(tokenizer) if options.force_tool_call else []
    dropped, room_wanted = 0, max_new_tokens
    while True:
        ids = tokenizer.build_prompt_ids(system + history + new, continue_final=continue_final) + suffix
        room = window - len(ids)
        if room >= room_wanted:
            return PreparedPrompt(ids, dropped, min(max_new_tokens, room))
        if room > 0 and ((options.keep_history and not dropped) or not history):
            return PreparedPrompt(ids, dropped, room)
        if not history:
            raise ContextTooLongError(len(ids) + 1, window)
        if options.keep_history:  # the prompt does not fit: once turns go, leave a useful reply room too
            room_wanted = min(max_new_tokens, window // 4)
        excess = len(ids) + room_wanted - window
        cut, freed = 0, 0
        while cut < len(history) and freed < excess:
            freed += tokenizer.count_message_tokens(history[cut])
            cut += 1
        while cut < len(history) and history[cut]["role"] != "user":  # keep whole user/assistant turns
            cut += 1
        history, dropped = history[cut:], dropped + cut


def tool_call_prefix(tokenizer: ChatTokenizer) -> list[int]:
    """The ids that open a tool call (`<|action_start|><|plugin|>\\n`, InternLM2's format), for a forced call."""
    tools = tokenizer.tool_ids
    if not {"<|action_start|>", "<|plugin|>"} <= tools.keys():
        raise InvalidRequestError("this model's vocabulary has no tool tokens: it cannot call tools")
    return [tools["<|action_start|>"], tools["<|plugin|>"], *tokenizer.encode_plain("\n")]


def check_unicode(messages: list[Message]) -> None:
    """Refuse text the tokenizer cannot take; raises InvalidRequestError naming the message."""
    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and (why := not_unicode(content)):
            raise InvalidRequestError(f"message {index + 1} ({message.get('role')}) is not valid Unicode text: {why}")
