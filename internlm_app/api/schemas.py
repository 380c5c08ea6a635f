"""Request body of the classic route and the checks the OpenAI bodies share; bounds come from internlm_app.sampling."""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from internlm_app.chat_types import Message, history_to_messages, not_unicode
from internlm_app.sampling import SamplingParams, sampling_field
from internlm_app.settings import Settings

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000  # per stop string; a stop is matched incrementally, but its prefix is held back while streaming


def _unicode(text: str) -> str:
    if why := not_unicode(text):
        raise ValueError(f"not valid Unicode text: {why}")
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string a request carries to the tokenizer


def check_stops(value: str | list[str] | None) -> list[str] | None:
    """Stop strings as a list, bounded: at most MAX_STOP_STRINGS non-empty ones of MAX_STOP_CHARS characters."""
    stops = [value] if isinstance(value, str) else value
    if stops is not None and (len(stops) > MAX_STOP_STRINGS or not all(stops)):
        raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    if stops is not None and any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ValueError(f"each stop string has at most {MAX_STOP_CHARS} characters")
    if stops is not None and any(not_unicode(stop) for stop in stops):
        raise ValueError("stop strings must be valid Unicode text")
    return stops or None


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits true / false itself (bool, Any, or a union or container with bool)."""
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) in (Union, types.UnionType, Annotated, list, tuple, dict):
        return any(_takes_bool(arg) for arg in get_args(annotation))
    return False


def _takes_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    if get_origin(annotation) in (Union, types.UnionType, Annotated):
        return any(_takes_none(arg) for arg in get_args(annotation))
    return False


class RequestBody(BaseModel):
    """Base of the API's request bodies. `null` for a field with a default means that default, as OpenAI's
    nullable fields do (`"n": null` is n = 1); true / false is refused where a number (or text) is expected, rather
    than read as 1 / 0 (pydantic's lax mode would take `"max_tokens": true` as 1); the error names the field."""

    @field_validator("*", mode="before")
    @classmethod
    def _null_default_and_no_booleans_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if value is None and not field.is_required() and not _takes_none(field.annotation):
            return field.get_default(call_default_factory=True)
        if isinstance(value, bool) and not _takes_bool(field.annotation):
            raise ValueError("expected a number or text, not true / false")
        return value


class SamplingOverrides(RequestBody):
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
