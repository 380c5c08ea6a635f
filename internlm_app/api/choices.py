"""One choice of an OpenAI response, built from the engine's reply chunks: content cut at stop strings, InternLM2's
tool call turned into OpenAI `tool_calls`, logprobs in OpenAI's shapes.

A reply with tools offered reads: text (the content), then `<|action_start|>`, `<|plugin|>`, the call's JSON and
`<|action_end|>`, which ends it (chat/chat_format.md). A forced call (`tool_choice` required or named) has the
first two in the prompt already: the whole reply is the call's JSON. JSON that is not a call is shown as content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat_types import ReplyChunk, TokenLogprob, ToolCall
from ..stop_strings import StopFilter
from ..tools import parse_tool_call


def logprob_entry(record: TokenLogprob) -> dict:
    """OpenAI's chat logprobs entry: token, logprob, bytes (a list of ints) and top_logprobs."""
    top = [{"token": text, "logprob": value, "bytes": list(data)} for text, data, value in record.top]
    return {"token": record.token, "logprob": record.logprob, "bytes": list(record.bytes), "top_logprobs": top}


@dataclass
class Delta:
    """What one step adds to a choice: content text, a finished tool call, and the content tokens' logprobs."""

    content: str = ""
    tool_call: ToolCall | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_call or self.logprobs)


class ChoiceBuilder:
    """Feeds on one reply's chunks (`push`, then `finish`); `ended` turns true when a stop string ended it."""

    def __init__(self, stops: list[str] | None, *, forced_call: bool = False):
        self._stops = StopFilter(stops)
        self._state = "call" if forced_call else "content"  # content -> action -> call | code
        self._call_text = ""
        self.tool_call: ToolCall | None = None
        self.ended = False

    def push(self, chunk: ReplyChunk) -> Delta:
        if self.ended:
            return Delta()
        if chunk.control is not None:
            return self._control(chunk.control)
        if self._state == "call":
            self._call_text += chunk.text
            return Delta()
        if self._state == "action":  # text right after <|action_start|> without a tool token: plain content
            self._state = "content"
        text = self._stops.push(chunk.text)
        self.ended = self._stops.hit
        return Delta(content=text, logprobs=list(chunk.logprobs or []))

    def _control(self, control: str) -> Delta:
        if self._state == "content" and control == "<|action_start|>":
            self._state = "action"
        elif self._state == "action" and control == "<|plugin|>":
            self._state = "call"
        elif self._state == "action" and control == "<|interpreter|>":
            self._state = "content"  # no code interpreter is offered: its code stays content
        elif self._state == "call" and control == "<|action_end|>":
            return self._end_call()
        return Delta()

    def _end_call(self) -> Delta:
        self._state = "done"
        self.tool_call = parse_tool_call(self._call_text)
        if self.tool_call is None:  # not a call after all: the model's text is shown rather than lost
            return Delta(content=self._stops.push(self._call_text))
        return Delta(tool_call=self.tool_call)

    def finish(self, finish_reason: str) -> tuple[Delta, str]:
        """The rest (held-back text, a call cut short) and OpenAI's finish_reason for an engine finish reason."""
        delta = Delta()
        if self._state == "call":  # ended without <|action_end|> (length): a complete call still counts
            delta = self._end_call()
        if not self.ended:
            delta.content += self._stops.flush()
        if self.tool_call is not None:
            return delta, "tool_calls"
        return delta, "length" if finish_reason == "length" and not self.ended else "stop"
