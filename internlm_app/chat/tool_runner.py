"""A reply that may call tools, as the web app shows it: stream the model's text; when it writes a call
(`<|action_start|><|plugin|>{...}<|action_end|>`), run the tool, append the call and its `environment` result turn in
InternLM2's format, and generate again, up to a bounded number of calls.

Prompt and parsing are the API's (`tools.with_tools`, `tools.call_schema`, `reply_reader.ChoiceBuilder`): one
implementation of InternLM2's tool format. A forced call (tool_choice "required" or a tool's name) applies to the
first step only and is constrained by the grammar, so even a random-weight model writes a valid call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from internlm_app.chat.reply_reader import ChoiceBuilder, stream_chunks
from internlm_app.chat.tool_set import TOOL_TIMEOUT_SECONDS, ToolResult, ToolSet
from internlm_app.chat_types import (
    GenerationError,
    InvalidRequestError,
    Message,
    ReplyEvents,
    ReplyOptions,
    ReplyStats,
    ToolCall,
)
from internlm_app.runtime.tool_format import call_schema, with_tools
from internlm_app.sampling import SamplingParams

MAX_TOOL_STEPS = 4  # tool calls in one reply; after the last, the model answers with no tools offered


@dataclass(frozen=True)
class TextEvent:
    """Reply text as it streams (of the step under way)."""

    text: str
    step: int


@dataclass(frozen=True)
class ToolCallEvent:
    """The model called a tool (shown before it runs)."""

    call: ToolCall
    step: int


@dataclass(frozen=True)
class ToolResultEvent:
    """What the tool returned, or its error (`result.error`); the next step's prompt holds it."""

    call: ToolCall
    result: ToolResult
    step: int


@dataclass(frozen=True)
class FinalEvent:
    """The reply is over: the turns it added to the conversation (each call as an assistant turn with `tool_calls`
    followed by its `environment` result, then the final assistant text), why it ended, and each step's stats."""

    messages: list[Message]
    finish_reason: str  # of the last step: "stop", "length" or "cancelled"
    stats: list[ReplyStats] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The final answer's text (the last assistant turn's)."""
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


RunEvent = TextEvent | ToolCallEvent | ToolResultEvent | FinalEvent


class ToolCallCutOffError(GenerationError):
    """The model was still writing a tool call when its reply reached max new tokens (`code` tool_call_cut_off) or
    the end of the context budget (`code` tool_call_no_room)."""

    def __init__(self, by_max_new_tokens: bool, max_new_tokens: int):
        if by_max_new_tokens:
            self.code = "tool_call_cut_off"
            why = f"max_new_tokens ({max_new_tokens}): raise it and regenerate"
        else:
            self.code = "tool_call_no_room"
            why = "the end of the context budget: shorten the conversation or raise max_length"
        super().__init__(f"the call of a tool was cut off by {why}")


def run_with_tools(
    backend,
    messages: list[Message],
    toolset: ToolSet,
    params: SamplingParams,
    *,
    tool_choice: str = "auto",
    max_steps: int = MAX_TOOL_STEPS,
    cancel: threading.Event | None = None,
    max_length: int | None = None,
    tool_timeout: float = TOOL_TIMEOUT_SECONDS,
    on_queue: Callable[[int], None] | None = None,
    step_stats: list[ReplyStats] | None = None,
) -> Iterator[RunEvent]:
    """Stream a reply to `messages` with `toolset` offered; yields events, the last a FinalEvent.

    `tool_choice`: "auto" (the model decides), "none" (no tools offered), "required" (the first step is a call to
    one of the tools) or a tool's name (the first step calls it). Setting `cancel`, or closing the iterator, stops
    generation within one token, and no further tool runs. A tool's failure or timeout is its result, never an
    exception; bad input raises InvalidRequestError from the first next(), before anything is generated, and a
    failed generation GenerationError, as the backend's stream does. `on_queue` gets the place in line (1 = next)
    whenever a step waits for the GPU. `step_stats`, when given, gets each step's stats as the step starts (the
    FinalEvent carries the same list), so a caller still has them when a later step fails. A call the model was
    still writing when the reply hit its token limit raises ToolCallCutOffError (never a half call shown as text).
    """
    if tool_choice not in ("auto", "none", "required") and tool_choice not in toolset.tools:
        raise InvalidRequestError(f"tool_choice names {tool_choice!r}, which is not among the tools", "tool_choice")
    added: list[Message] = []
    stats: list[ReplyStats] = [] if step_stats is None else step_stats
    offered = bool(toolset) and tool_choice != "none"
    for step in range(max_steps + 1):  # the last step offers no tools, so it makes no call: the loop ends in a return
        tools_now = offered and step < max_steps  # after max_steps calls the model answers with their results
        forced = None if step > 0 or not tools_now or tool_choice == "auto" else tool_choice
        events = ReplyEvents(on_queue=on_queue)
        stats.append(events.stats)
        prompt = [*messages, *added]
        if tools_now:
            prompt = with_tools(prompt, toolset.functions())
        options = ReplyOptions(
            tools=tools_now,
            force_tool_call=forced is not None,
            json_schema=call_schema(toolset.functions(), None if forced == "required" else forced) if forced else None,
        )
        builder = ChoiceBuilder(None, forced_call=forced is not None, tools=toolset.names if tools_now else None)
        text = ""
        chunks = stream_chunks(backend, prompt, params, options, cancel=cancel, events=events, max_length=max_length)
        with contextlib.closing(chunks):
            for chunk in chunks:
                delta = builder.push(chunk)
                if delta.content:
                    text += delta.content
                    yield TextEvent(delta.content, step)
        rest, _ = builder.finish(events.stats.finish_reason)
        if builder.call_cut_off:
            raise ToolCallCutOffError(events.stats.completion_tokens >= params.max_new_tokens, params.max_new_tokens)
        if rest.content:
            text += rest.content
            yield TextEvent(rest.content, step)
        call = builder.tool_call
        if call is not None and not _cancelled(cancel):
            yield ToolCallEvent(call, step)
        if call is None or _cancelled(cancel):  # a call cancelled before its tool ran is left out of the history
            added.append({"role": "assistant", "content": text})
            yield FinalEvent(added, "cancelled" if _cancelled(cancel) else events.stats.finish_reason, stats)
            return
        result = toolset.call(call["name"], call["arguments"], timeout=tool_timeout)
        added.append({"role": "assistant", "content": text, "tool_calls": [call]})
        added.append({"role": "environment", "name": "plugin", "content": result.content})
        yield ToolResultEvent(call, result, step)
        if _cancelled(cancel):
            yield FinalEvent(added, "cancelled", stats)
            return


def _cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()
