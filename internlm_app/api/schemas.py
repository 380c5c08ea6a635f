"""Request bodies of the classic and the OpenAI-compatible routes; sampling bounds come from internlm_app.sampling."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ..chat_types import Message, history_to_messages, not_unicode
from ..sampling import SamplingParams, sampling_field
from ..settings import Settings

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000  # per stop string; a stop is matched incrementally, but its prefix is held back while streaming


def _unicode(text: str) -> str:
    if why := not_unicode(text):
        raise ValueError(f"not valid Unicode text: {why}")
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string a request carries to the tokenizer


class SamplingOverrides(BaseModel):
    """Sampling fields a request may set; the server's defaults fill the rest."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = sampling_field("temperature", default=None)
    top_p: float | None = sampling_field("top_p", default=None)
    top_k: int | None = sampling_field("top_k", default=None)
    repetition_penalty: float | None = sampling_field("repetition_penalty", default=None)

    def sampling(self, settings: Settings, max_new_tokens: int | None) -> SamplingParams:
        """The request's values over the server's defaults."""
        given = {name: getattr(self, name) for name in SamplingOverrides.model_fields}
        given["max_new_tokens"] = max_new_tokens
        defaults = settings.default_sampling().model_dump()
        return SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


class ClassicRequest(SamplingOverrides):
    """Body of `POST /`, as sent by the InternLM FastAPI tutorial's clients."""

    prompt: Text = Field(min_length=1, description="The user's message.")
    history: list[tuple[Text, Text]] | None = Field(
        None, description="Earlier turns as [user, assistant] pairs, oldest first."
    )
    system: Text | None = Field(None, description="System prompt; omitted means the default one, '' means none.")
    max_new_tokens: int | None = sampling_field("max_new_tokens", default=None)

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"prompt": "你好", "history": [], "temperature": 0.8}]}
    )

    def messages(self, default_system: str) -> list[Message]:
        return history_to_messages(self.prompt, self.history, default_system if self.system is None else self.system)


class ChatMessage(BaseModel):
    """One message of an OpenAI chat request; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(SamplingOverrides):
    """Body of `POST /v1/chat/completions` (the fields this server uses; others are ignored)."""

    model: str | None = Field(None, description="Ignored: this server serves one model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = sampling_field("max_new_tokens", default=None)
    max_completion_tokens: int | None = sampling_field("max_new_tokens", default=None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters that end the reply."
    )
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "internlm2-chat-7b", "messages": [{"role": "user", "content": "hi"}]}]
        },
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > MAX_STOP_STRINGS or not all(stops)):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        if stops is not None and any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"each stop string has at most {MAX_STOP_CHARS} characters")
        if stops is not None and any(not_unicode(stop) for stop in stops):
            raise ValueError("stop strings must be valid Unicode text")
        return stops or None

    def chat_messages(self, default_system: str) -> list[Message]:
        """Messages for the engine: the default system prompt when none is given ('' keeps no system turn)."""
        messages: list[Message] = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""} for m in self.messages
        ]
        if messages[0]["role"] != "system" and default_system:
            messages.insert(0, {"role": "system", "content": default_system})
        return messages

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
