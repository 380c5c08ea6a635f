"""Request bodies of `/v1/chat/completions` and `/v1/completions`, and what each asks of the engine.

Field meanings follow OpenAI's API reference; `top_k` and `repetition_penalty` are vLLM's extensions. Every field
that is accepted is honoured: an OpenAI field this server cannot honour is refused with a 400 naming it, and so is a
field it does not know (vLLM's `min_p`, a typo, also inside `tools` or `response_format`), as OpenAI does; only
`metadata`, `prompt_cache_key`, `prompt_cache_retention` and `safety_identifier`, which change no reply, are accepted
and ignored. `null` means a field's default, as in OpenAI's API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from internlm_app.api.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS, RequestBody, Text, check_stops
from internlm_app.backends.sampler import MAX_TOP_LOGPROBS
from internlm_app.chat_types import InvalidRequestError, Message, ReplyOptions, ToolCall
from internlm_app.runtime.grammar import unenforced_keyword
from internlm_app.runtime.tool_format import call_schema, with_tools
from internlm_app.sampling import BOUNDS, GREEDY_BELOW, SamplingParams
from internlm_app.settings import Settings

MAX_CHOICES = 8  # n (and prompts × n on /v1/completions): each choice is a reply on the GPU
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class UnsupportedField(InvalidRequestError):
    """A field this server cannot honour as sent; the API answers 400 naming it."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}", param=field)


def _text_parts(value: object) -> object:
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "".join(texts)


class FunctionCall(BaseModel):
    name: Text
    arguments: Text = "{}"


class ToolCallIn(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a chat request; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | None = None
    name: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Who speaks: `<|im_start|>user name=...`."
    )
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: object) -> object:
        return _text_parts(value)

    def engine_message(self) -> Message:
        content = self.content or ""
        if self.role == "tool":  # a tool's result: InternLM2's environment turn from <|plugin|>
            return {"role": "environment", "name": "plugin", "content": content}
        message: Message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name:
            message["speaker"] = self.name
        if self.tool_calls:
            calls: list[ToolCall] = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in self.tool_calls
            ]
            message["tool_calls"] = calls
        return message


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is no JSON Schema, by the metaschema of the draft its `$schema` names, else of draft 2020-12, 7
    or 4 (None when any takes it: clients write all three); "type": "nonsense" or "type": 5 is one. Patterns are
    not compiled: they are ECMA-262 regexes, not Python's. CPU-bound (seconds per MiB): run it off the event loop."""
    from jsonschema import Draft4Validator, Draft7Validator, Draft202012Validator, validators
    from jsonschema.exceptions import best_match

    if "$schema" in schema and not isinstance(schema["$schema"], str):
        return "$schema must be a string (a draft's URI)"
    declared = validators.validator_for(schema, default=None) if "$schema" in schema else None
    first = None
    for validator in [declared] if declared is not None else [Draft202012Validator, Draft7Validator, Draft4Validator]:
        try:
            error = best_match(validator(validator.META_SCHEMA).iter_errors(schema))
        except RecursionError:
            return "nested too deeply"
        if error is None:
            return None
        first = first or error
    assert first is not None
    where = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in first.absolute_path)
    return f"{first.message[:300]}{' at ' + where if where else ''}"


class _Exact(BaseModel):
    """An object of a request whose unknown keys are refused (a misspelt `shema` would otherwise mean no schema)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


_OBJECT_KEYWORDS = {"properties", "required", "additionalProperties", "$defs", "definitions", "$schema"}
_OBJECT_KEYWORDS |= {"title", "description", "$comment"}


class FunctionDefinition(_Exact):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """A call's arguments are one JSON object (InternLM2's "parameters", OpenAI's "arguments"): the schema must be
        of type object, as OpenAI requires; without a type, only object keywords (properties, required, ...)."""
        if not value:
            return value
        if not (value.get("type") == "object" if "type" in value else value.keys() <= _OBJECT_KEYWORDS):
            raise ValueError('must be a JSON Schema of "type": "object" (a call\'s arguments are a JSON object)')
        return value


class Tool(_Exact):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Exact):
    name: str


class NamedToolChoice(_Exact):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Exact):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Exact):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with a schema")
        return self


class StreamOptions(_Exact):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of streamed events: accepted, none is added here


def _max_tokens_field() -> Any:
    return Field(None, ge=1, description="Most tokens to generate; capped to the room the context window leaves.")


Temperature = Annotated[float, Field(ge=BOUNDS["temperature"].low, le=BOUNDS["temperature"].high)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class GenerationRequest(RequestBody):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = Field(None, description="This server serves one model; any name is accepted.")
    temperature: Temperature | None = None
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="0 means greedy decoding.")
    top_k: int | None = Field(None, ge=-1, le=int(BOUNDS["top_k"].high), description="-1 or 0 turn it off (vLLM).")
    repetition_penalty: float | None = Field(None, ge=BOUNDS["repetition_penalty"].low, le=2.0)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63, description="Same seed and request, the model alone on the GPU: same text."
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters that end the reply."
    )
    user: str | None = Field(None, max_length=256, description="An end-user id, written to the request log.")
    # OpenAI fields that change no reply: accepted, and ignored.
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored (nothing is stored).")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored (KV reuse is automatic here).")
    prompt_cache_retention: str | None = Field(None, description="Accepted and ignored (KV reuse is automatic here).")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    # OpenAI fields this server cannot honour: refused when set (see `refuse_unsupported`).
    logit_bias: dict[str, float] | None = None
    service_tier: str | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    web_search_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        return check_stops(value)

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "is only allowed when stream is true")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "is not supported by this server")
        if self.service_tier not in (None, "auto", "default"):
            raise UnsupportedField("service_tier", "this server has one tier: auto")
        if self.store:
            raise UnsupportedField("store", "this server does not store completions")
        if self.reasoning_effort is not None:
            raise UnsupportedField("reasoning_effort", "this model is not a reasoning model")
        if self.web_search_options is not None:
            raise UnsupportedField("web_search_options", "this server has no web search")

    def sampling(
        self, settings: Settings, max_new_tokens: int | None, default_max: int | None = None
    ) -> SamplingParams:
        """The request's sampling over the server's defaults. top_p 0 is greedy; top_k -1 is off; max tokens beyond
        the slider's bound are kept for the engine to cap to the room left."""
        values = settings.default_sampling().model_dump()
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if (value := getattr(self, name)) is not None:
                values[name] = value
        if self.top_p is not None and self.top_p < GREEDY_BELOW:
            values["temperature"], values["top_p"] = 0.0, 1.0
        values["top_p"] = max(values["top_p"], BOUNDS["top_p"].low)
        values["top_k"] = max(values["top_k"], 0)
        wanted = max_new_tokens if max_new_tokens is not None else default_max
        values["max_new_tokens"] = wanted if wanted is not None else values["max_new_tokens"]
        return SamplingParams.unbounded_length(**values)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    """Body of `POST /v1/chat/completions`."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"model": "internlm2-chat-7b", "messages": [{"role": "user", "content": "hi"}]}]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _max_tokens_field()
    max_completion_tokens: int | None = _max_tokens_field()
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="A reply makes at most one call either way.")
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Legacy function calling and other modalities: refused when set.
    functions: list[dict] | None = None
    function_call: Any = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.functions is not None or self.function_call is not None:
            raise UnsupportedField("functions", "legacy function calling is not supported; send tools instead")
        if self.audio is not None or (self.modalities and self.modalities != ["text"]):
            raise UnsupportedField("modalities", "this model reads and writes text only")
        if self.prediction is not None:
            raise UnsupportedField("prediction", "predicted outputs are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "needs logprobs: true")
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if choice not in (None, "none", "auto") and not names:
            raise UnsupportedField("tool_choice", "asks for a tool call but no tools were given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise UnsupportedField("tool_choice", f"names {choice.function.name!r}, which is not among the tools")
        if len(set(names)) != len(names):
            raise UnsupportedField("tools", "two tools have the same name")
        json_out = self.response_format is not None and self.response_format.type != "text"
        if json_out and names and choice != "none":
            raise UnsupportedField("response_format", "JSON output and tool calls cannot be combined; pick one")
        if self.messages[-1].role == "assistant" and self.tool_choice not in (None, "none", "auto"):
            raise UnsupportedField("tool_choice", "a forced tool call cannot continue an assistant message")
        if self.messages[-1].role == "assistant" and json_out:
            raise UnsupportedField("response_format", "JSON output cannot continue an assistant message (prefill)")
        self._refuse_unanswerable_tool_messages()
        forced = self.forced_tool
        for index, tool in enumerate(self.tools or []):  # a forced call is decoded under its tool's schema
            if forced in ("*", tool.function.name) and (where := unenforced_keyword(tool.function.parameters or {})):
                raise UnsupportedField(
                    "tools",
                    f"tools[{index}].function.parameters uses {where}, which constrained decoding cannot enforce in "
                    "a call tool_choice forces; leave it out",
                )

    def _refuse_unanswerable_tool_messages(self) -> None:
        """A tool message answers a call of the assistant message just before it (others of the same answers may
        come between), by its tool_call_id, as in OpenAI's API; anything else is a 400 naming the message."""
        calls: set[str] | None = None  # the ids of the calls that the messages being read may answer
        for index, message in enumerate(self.messages):
            if message.role == "assistant":
                calls = {call.id for call in message.tool_calls or []} or None
            elif message.role != "tool":
                calls = None
            elif calls is None:
                raise UnsupportedField(
                    f"messages.{index}", "a tool message must follow an assistant message with tool_calls"
                )
            elif message.tool_call_id not in calls:
                raise UnsupportedField(
                    f"messages.{index}.tool_call_id",
                    f"{message.tool_call_id!r} is none of the calls of the assistant message before it",
                )

    def check_schemas(self) -> None:
        """Refuse a tool's parameters or response_format's schema that is no JSON Schema (`schema_problem`), as
        OpenAI does, for any tool_choice; UnsupportedField names where it was sent. Run it off the event loop."""
        for index, tool in enumerate(self.tools or []):
            if tool.function.parameters is not None and (why := schema_problem(tool.function.parameters)):
                raise UnsupportedField(f"tools.{index}.function.parameters", f"not a valid JSON Schema: {why}")
        schema = self.response_format.json_schema if self.response_format is not None else None
        if schema is not None and (why := schema_problem(schema.schema_)):
            raise UnsupportedField("response_format.json_schema.schema", f"not a valid JSON Schema: {why}")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def offers_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """ "*" when any tool must be called (required), the tool's name for a named choice, else None."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else "*"

    def chat_messages(self, default_system: str) -> list[Message]:
        """Messages for the engine: the default system prompt when none comes first ('' keeps no system turn), the
        tools turn when tools are offered."""
        messages = [m.engine_message() for m in self.messages]
        if messages[0]["role"] != "system" and default_system:
            messages.insert(0, {"role": "system", "content": default_system})
        if self.offers_tools:
            messages = with_tools(messages, [t.function.model_dump(exclude_none=True) for t in self.tools or []])
        return messages

    def reply_options(self, seed: int | None) -> ReplyOptions:
        schema: dict | bool | None = None
        functions = [t.function.model_dump(exclude_none=True) for t in self.tools or []]
        if (forced := self.forced_tool) is not None:
            schema = call_schema(functions, None if forced == "*" else forced)
        elif self.response_format is not None and self.response_format.type == "json_object":
            schema = {"type": "object"}  # OpenAI's JSON mode: one JSON object
        elif self.response_format is not None and self.response_format.type == "json_schema":
            schema = self.response_format.json_schema.schema_  # {}: any JSON value
        return ReplyOptions(
            seed=seed,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            json_schema=schema,
            tools=self.offers_tools,
            force_tool_call=forced is not None,
            keep_history=True,
            stop=self.stop,
        )


class CompletionRequest(GenerationRequest):
    """Body of `POST /v1/completions`: a raw prompt, no chat template (special-token text in it is read as tokens)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"examples": [{"model": "internlm2-chat-7b", "prompt": "The capital of France is"}]},
    )

    prompt: Text | list[Text] = Field(description="One prompt, or a list of prompts (each gets n choices).")
    max_tokens: int | None = _max_tokens_field()
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Top alternatives per token.")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value: object) -> object:
        if isinstance(value, list) and value and all(isinstance(item, int | list) for item in value):
            raise ValueError("token ids are not accepted as a prompt here; send the prompt as text")
        return value

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise UnsupportedField("echo", "is not supported by this server")
        if self.suffix:
            raise UnsupportedField("suffix", "insertion (fill in the middle) is not supported by this model")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", "only best_of equal to n is supported")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise UnsupportedField("n", f"prompts × n is at most {MAX_CHOICES}")
        if not self.prompts or not all(self.prompts):
            raise UnsupportedField("prompt", "a prompt must not be empty")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def reply_options(self, seed: int | None) -> ReplyOptions:
        return ReplyOptions(
            seed=seed,
            logprobs=self.logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            raw_prompt=True,
            stop=self.stop,
        )
