"""Reading one reply's chunks, shared by the API and the web app's tool runner: content cut at stop strings, InternLM2's
tool call turned into a ToolCall, logprobs in step with the text sent; and the chunks of any backend.

A reply with tools offered reads: text (the content), then `<|action_start|>`, `<|plugin|>`, the call's JSON and
`<|action_end|>`, which ends it (chat/chat_format.md). A forced call (`tool_choice` required or named) has the
first two in the prompt already: the whole reply is the call's JSON. JSON that is not a call to an offered tool is
shown as content, never dropped.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field

from internlm_app.chat_types import ChatBackend, Message, Reply, ReplyChunk, ReplyOptions, TokenLogprob, ToolCall
from internlm_app.runtime.stop_strings import StopFilter
from internlm_app.runtime.tool_format import parse_tool_call
from internlm_app.sampling import SamplingParams


@dataclass
class Delta:
    """What one step adds to a choice: content text, a finished tool call, and the content tokens' logprobs."""

    content: str = ""
    tool_call: ToolCall | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_call or self.logprobs)


class StopCutText:
    """Text cut at the first stop string, with each piece's logprobs: only those of tokens whose text went out.

    A token's record is released once all its text has been sent; when a stop string cuts the text, the tokens that
    begin before the cut are released and the rest are dropped with the text (a token's length is that of its text;
    a special token, with no text, goes with the next one).
    """

    def __init__(self, stops: list[str] | None):
        self.stops = StopFilter(stops)
        self._held: deque[TokenLogprob] = deque()  # records whose text is not (all) sent yet, in order
        self._unassigned = 0  # characters sent that no held record has claimed yet

    @property
    def hit(self) -> bool:
        return self.stops.hit

    def push(self, text: str, records: list[TokenLogprob] | None = None) -> tuple[str, list[TokenLogprob]]:
        self._held.extend(records or [])
        out = self.stops.push(text)
        if self.stops.hit:
            return out, self._release(len(out), cut=True)
        return out, self._release(len(out))

    def flush(self) -> tuple[str, list[TokenLogprob]]:
        """The text held back at the end (no stop string came), with every remaining record."""
        out = self.stops.flush()
        released = list(self._held)
        self._held.clear()
        return out, released

    def _release(self, sent: int, cut: bool = False) -> list[TokenLogprob]:
        self._unassigned += sent
        released = []
        while self._held:
            size = len(self._held[0].token) if self._held[0].bytes else 0
            if (self._unassigned <= 0) if cut else (size > self._unassigned):
                break  # cut: the token starts at or after the cut; otherwise: not all of its text was sent yet
            self._unassigned -= size
            released.append(self._held.popleft())
        if cut:
            self._held.clear()
            self._unassigned = 0
        return released


class ChoiceBuilder:
    """Feeds on one reply's chunks (`push`, then `finish`); `ended` turns true when a stop string ended it."""

    def __init__(
        self,
        stops: list[str] | None,
        *,
        forced_call: bool = False,
        tools: list[str] | None = None,
        strict: dict[str, dict] | None = None,
    ):
        """`tools`: the offered tools' names (a call to another name is content). `strict`: the parameter schemas of
        tools offered with `strict: true`: a call to one whose arguments do not validate is content too (a forced
        call is valid by its grammar; one the model writes by itself is checked here)."""
        self._text = StopCutText(stops)
        self._state = "call" if forced_call else "content"  # content -> action -> call -> done
        self._tools = tools
        self._strict = strict or {}
        self._call_text = ""
        self._call_records: list[TokenLogprob] = []
        self.tool_call: ToolCall | None = None
        self.ended = False
        self.call_cut_off = False  # `finish` found a call still being written at the token limit, not a whole one

    def push(self, chunk: ReplyChunk) -> Delta:
        if self.ended:
            return Delta()
        if chunk.control is not None:
            return self._control(chunk.control)
        if self._state == "call":
            self._call_text += chunk.text
            self._call_records += chunk.logprobs or []
            return Delta()
        if self._state == "action":  # text right after <|action_start|> without a tool token: plain content
            self._state = "content"
        text, records = self._text.push(chunk.text, chunk.logprobs)
        self.ended = self._text.hit
        return Delta(content=text, logprobs=records)

    def _control(self, control: str) -> Delta:
        if self._state == "content" and control == "<|action_start|>":
            self._state = "action"
            text, records = self._text.flush()  # no stop string spans a control token: what was held back goes out
            return Delta(content=text, logprobs=records)  # now, before the call that may follow
        elif self._state == "action" and control == "<|plugin|>":
            self._state = "call"
        elif self._state == "action" and control == "<|interpreter|>":
            self._state = "content"  # no code interpreter is offered: its code stays content
        elif self._state == "call" and control == "<|action_end|>":
            return self._end_call()
        return Delta()

    def _end_call(self) -> Delta:
        self._state = "done"
        call = parse_tool_call(self._call_text)
        if call is not None and (self._tools is None or call["name"] in self._tools) and self._valid(call):
            self.tool_call = call
            return Delta(tool_call=call)
        # Not a call to an offered tool after all: the model's text is shown (with its logprobs) rather than lost.
        text, records = self._text.push(self._call_text, self._call_records)
        self.ended = self._text.hit
        return Delta(content=text, logprobs=records)

    def _valid(self, call: ToolCall) -> bool:
        """Whether the call's arguments validate against its tool's schema, when that tool is strict. Runs on the
        server's event loop: its `pattern`s are matched with a time limit for the whole call (`bounded_validator`),
        since one like ^(a+)+$ takes seconds to reject "aaa…a!" and a pattern that runs out of time fails it."""
        schema = self._strict.get(call["name"])
        if schema is None:
            return True
        return bounded_validator(schema, STRICT_CHECK_SECONDS).is_valid(json.loads(call["arguments"]))

    def finish(self, finish_reason: str) -> tuple[Delta, str]:
        """The rest (held-back text, a call cut short) and OpenAI's finish_reason for an engine finish reason."""
        delta = Delta()
        if self._state == "call":  # ended without <|action_end|> (length): a complete call still counts
            delta = self._end_call()
            self.call_cut_off = self.tool_call is None and finish_reason == "length"
        if not self.ended:
            text, records = self._text.flush()
            delta.content += text
            delta.logprobs += records
        if self.tool_call is not None:
            return delta, "tool_calls"
        return delta, "length" if finish_reason == "length" and not self.ended else "stop"


def stream_chunks(
    backend: ChatBackend, messages: list[Message], params: SamplingParams, options: ReplyOptions, **kwargs
) -> Reply[ReplyChunk]:
    """The backend's reply as ReplyChunks (a remote backend serves plain options only: InvalidRequestError)."""
    return backend.stream_chunks(messages, params, options, **kwargs)


STRICT_CHECK_SECONDS = 0.2  # the most a strict tool's call may spend in pattern matching


def bounded_validator(schema: dict, seconds: float):
    """A jsonschema validator for `schema` (its declared draft, else 2020-12) whose `pattern` keyword matches with the
    `regex` package under one shared deadline (`seconds` for the whole validation): a pattern still running then is
    a mismatch. Python's `re`, jsonschema's default, cannot be stopped."""
    import time

    import regex
    from jsonschema import ValidationError, validators

    deadline = time.monotonic() + seconds

    def pattern(validator, expected, instance, _schema):
        if not isinstance(instance, str):
            return
        try:
            found = regex.search(expected, instance, timeout=max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            found = None
        except regex.error:
            return  # a pattern Python cannot read (ECMA-262 only): not checked here
        if found is None:
            yield ValidationError(f"{instance!r} does not match {expected!r} (or took too long to check)")

    base = validators.validator_for(schema, default=validators.Draft202012Validator)
    return validators.extend(base, {"pattern": pattern})(schema)
