"""The format of a conversation export file: its limits (which bound what the app accepts as input too, so that every
export imports again), the pydantic models an import is validated against, and `parse_export`."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    model_validator,
)

from internlm_app.chat_types import FinishReason, ReplyStats

FORMAT = "internlm-chat-export"
VERSION = 1
MAX_IMPORT_BYTES = 32 * 1024 * 1024  # one JSON export; a store that does not fit in one is exported as a ZIP of parts
MAX_PART_BYTES = 128 * 1024 * 1024  # a part inside a ZIP: one conversation larger than MAX_IMPORT_BYTES on its own
MAX_ARCHIVE_BYTES = 200 * 1024 * 1024  # a ZIP of parts as uploaded (the web server's upload limit: streamlit.toml)
MAX_ARCHIVE_PARTS = 1_000
MAX_ARCHIVE_JSON_BYTES = 1024 * 1024 * 1024  # its parts together, unpacked
MAX_ARCHIVE_MESSAGES = 500_000  # its parts together: one import's work and memory (about 150 MB and 20 s)
MAX_CONVERSATIONS = 1_000
MAX_TOTAL_MESSAGES = 50_000
MAX_MESSAGES = MAX_TOTAL_MESSAGES  # per conversation: the store caps none (every regenerated version is one)
MAX_CONTENT_CHARS = 200_000
MAX_PROMPT_CHARS = 100_000
MAX_TITLE_CHARS = 200
MAX_MAP_KEYS = 32  # entries of a settings or stats object
MAX_VALUE_CHARS = 10_000  # a string inside settings or stats
MAX_ATTACHMENTS = 20  # per message
MAX_ATTACHMENT_CHARS = 200_000  # extracted text of one attachment
MAX_FILE_NAME_CHARS = 255
MAX_MIME_CHARS = 255  # RFC 6838: type and subtype of up to 127 characters each
MAX_ERRORS_SHOWN = 5


IMPORT_REASONS = ("too_large", "not_json", "not_an_export", "unsupported_version", "invalid")


class ImportValidationError(ValueError):
    """The file is not a valid conversation export; nothing was imported.

    `reason` (one of IMPORT_REASONS) names the kind for a translated sentence; `str()` is the English detail.
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def _scalar(value: object) -> object:
    """A settings or stats value: a short string, a 64-bit int, a finite float, a bool or null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= MAX_VALUE_CHARS:
        value.encode("utf-8")  # rejects lone surrogates, which SQLite cannot store
        return value
    raise ValueError(f"values must be strings (at most {MAX_VALUE_CHARS} characters), numbers, booleans or null")


def _text(max_chars: int, min_chars: int = 0) -> object:
    return Annotated[str, StringConstraints(min_length=min_chars, max_length=max_chars)]


Content = _text(MAX_CONTENT_CHARS)
Prompt = _text(MAX_PROMPT_CHARS)
Title = _text(MAX_TITLE_CHARS)
ShortText = _text(64)
Key = _text(64, min_chars=1)
Scalar = Annotated[object, AfterValidator(_scalar)]
FlatMap = Annotated[dict[Key, Scalar], Field(max_length=MAX_MAP_KEYS)]
Timestamp = Annotated[float, Field(ge=0, le=32_503_680_000, allow_inf_nan=False)]  # up to the year 3000


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


Count = Annotated[int, Field(ge=0, le=10**9)]
Seconds = Annotated[float, Field(ge=0, le=10**7, allow_inf_nan=False)]


# A ReplyStats field's type -> its bounded import type: the model below follows ReplyStats, field for field.
_BOUNDED = {
    "int": Count,
    "float": Seconds,
    "float | None": Seconds | None,
    "bool": bool,
    "FinishReason": FinishReason,
    "str | None": Annotated[str, StringConstraints(max_length=MAX_VALUE_CHARS)] | None,
}


MAX_TOOL_STEPS = 16  # tool calls of one reply (the runner makes at most a few)


class ToolStepIn(_Strict):
    """One tool call of an imported reply (chat_context.ToolReplyStats.tool_steps): the call, the text the model
    wrote before it, and the result (absent: the call was stopped before its tool ran)."""

    id: Annotated[str, StringConstraints(max_length=200)] = ""
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    # As long as a message may be: the model writes the arguments, a tool the result, and both are kept whole.
    arguments: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] = ""
    text: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] = ""
    result: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] | None = None
    error: Annotated[str, StringConstraints(max_length=MAX_VALUE_CHARS)] | None = None  # why the tool failed
    seconds: Seconds = 0.0


class _StatsBase(_Strict):
    model_config = ConfigDict(strict=False, extra="forbid", frozen=True)  # numbers may come as JSON ints or floats


StatsIn = create_model(
    "StatsIn",
    __base__=_StatsBase,
    __doc__="The reply stats of an imported message: ReplyStats's fields, bounded, so the UI can always show them.",
    **{f.name: (_BOUNDED[f.type], f.default) for f in dataclasses.fields(ReplyStats)},
    tool_steps=(Annotated[list[ToolStepIn], Field(max_length=MAX_TOOL_STEPS)], []),
)


class AttachmentIn(_Strict):
    """A file of an imported message: its name, MIME type, extracted text and that text's token count."""

    name: _text(MAX_FILE_NAME_CHARS, min_chars=1)
    mime_type: _text(MAX_MIME_CHARS, min_chars=1)
    text: _text(MAX_ATTACHMENT_CHARS) = ""
    tokens: Count = 0


class MessageIn(_Strict):
    """One message of an imported conversation; `id` and `parent` (ids within the file) place it in the tree."""

    id: Count | None = None
    parent: Count | None = None
    role: Literal["user", "assistant"]  # the system prompt is a field of the conversation
    content: Content
    status: Literal["complete", "streaming", "stopped", "error"] = "complete"
    created_at: Timestamp | None = None
    stats: StatsIn | None = None
    feedback: Annotated[int, Field(ge=0, le=1)] | None = None  # strict: 1 or 0, never true or false
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)

    @model_validator(mode="after")
    def _feedback_on_replies(self) -> MessageIn:
        if self.feedback is not None and self.role != "assistant":
            raise ValueError("feedback is for replies (assistant messages)")
        return self


class ConversationIn(_Strict):
    """One imported conversation; its `id` is ignored (imports get new ids).

    Its messages are a tree when they have ids (every one, parents before children, `selected` the leaf shown;
    the last message when left out), else the linear chat of an export before versions."""

    id: ShortText | None = None
    title: Title = ""
    system_prompt: Prompt = ""
    settings: FlatMap = Field(default_factory=dict)
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    messages: list[MessageIn] = Field(default_factory=list, max_length=MAX_MESSAGES)
    selected: Count | None = None

    @model_validator(mode="after")
    def _tree(self) -> ConversationIn:
        with_id = sum(m.id is not None for m in self.messages)
        if with_id == 0:
            if self.selected is not None or any(m.parent is not None for m in self.messages):
                raise ValueError("parent and selected refer to message ids, and the messages have none")
            return self
        if with_id < len(self.messages):
            raise ValueError("either every message has an id or none has")
        seen: set[int] = set()
        for m in self.messages:
            if m.parent is not None and m.parent not in seen:
                raise ValueError(f"message {m.id}: its parent {m.parent} is not an earlier message")
            if m.id in seen:
                raise ValueError(f"message id {m.id} is used twice")
            seen.add(m.id)
        if self.selected is not None and self.selected not in seen:
            raise ValueError(f"the selected message {self.selected} is not a message of the conversation")
        return self


class ExportDocument(_Strict):
    """A whole export file."""

    format: Literal["internlm-chat-export"]
    version: Literal[1]
    exported_at: Timestamp | None = None
    conversations: list[ConversationIn] = Field(max_length=MAX_CONVERSATIONS)

    @model_validator(mode="after")
    def _total(self) -> ExportDocument:
        total = sum(len(c.messages) for c in self.conversations)
        if total > MAX_TOTAL_MESSAGES:
            raise ValueError(f"{total} messages in all; at most {MAX_TOTAL_MESSAGES} can be imported at once")
        return self


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object repeats a key")
    return result


def _describe(error: ValidationError) -> str:
    errors = error.errors(include_input=False, include_url=False)
    lines = [f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}" for e in errors[:MAX_ERRORS_SHOWN]]
    more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
    return "; ".join(lines) + more


def parse_export(data: bytes | str, max_bytes: int | None = None) -> ExportDocument:
    """Decode and validate an export file (of at most `max_bytes`, MAX_IMPORT_BYTES by default), or raise
    ImportValidationError."""
    limit = MAX_IMPORT_BYTES if max_bytes is None else max_bytes
    if not isinstance(data, bytes | str):
        raise ImportValidationError("the export must be bytes or text", "not_json")
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ImportValidationError(f"the file is larger than {limit // (1024 * 1024)} MiB", "too_large")
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        raw = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ImportValidationError(f"not a JSON file: {str(exc)[:200]}", "not_json") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ImportValidationError(
            f"not a conversation export (expected a JSON object with format {FORMAT!r})", "not_an_export"
        )
    version = raw.get("version")
    if type(version) is not int or version != VERSION:
        raise ImportValidationError(
            f"unsupported export version {repr(version)[:20]}; this app reads {VERSION}", "unsupported_version"
        )
    try:
        return ExportDocument.model_validate(raw)
    except ValidationError as exc:
        raise ImportValidationError(f"invalid export: {_describe(exc)}") from None
    except RecursionError:
        raise ImportValidationError("invalid export: nested too deeply") from None
