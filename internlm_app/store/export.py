"""Export conversations as JSON or Markdown, and import a JSON export after strict validation."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
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
from internlm_app.store.db import ConversationStore
from internlm_app.store.records import Conversation, StoredMessage, title_from
from internlm_app.store.tree import Attachment, path_to

FORMAT = "internlm-chat-export"
VERSION = 1
MAX_IMPORT_BYTES = 32 * 1024 * 1024
MAX_CONVERSATIONS = 1_000
MAX_MESSAGES = 5_000  # per conversation
MAX_TOTAL_MESSAGES = 50_000
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


# ----- export -----


def _message_to_dict(m: StoredMessage, number: dict[int, int]) -> dict:
    return {
        "id": number[m.id],
        "parent": number.get(m.parent_id) if m.parent_id is not None else None,
        "role": m.role,
        "content": m.content,
        "status": m.status,
        "created_at": m.created_at,
        "stats": m.stats,
        "feedback": m.feedback,
        "attachments": [
            {"name": a.name, "mime_type": a.mime_type, "text": a.text, "tokens": a.tokens} for a in m.attachments
        ],
    }


def conversation_to_dict(conv: Conversation) -> dict:
    """The export form of one conversation: every message (every version), numbered 1, 2, ... in the file, each with
    its parent's number, and the selected leaf."""
    tree = conv.tree or conv.messages
    number = {m.id: n for n, m in enumerate(tree, start=1)}
    return {
        "id": conv.id,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "settings": conv.settings,
        "created_at": conv.created_at,
        "updated_at": conv.updated_at,
        "selected": number.get(conv.leaf_id) if conv.leaf_id is not None else None,
        "messages": [_message_to_dict(m, number) for m in tree],
    }


def _load(store: ConversationStore, cids: Iterable[str] | None) -> list[Conversation]:
    ids = [s.id for s in store.list_conversations(limit=None)] if cids is None else list(cids)
    conversations = []
    for cid in ids:
        conv = store.get_conversation(cid)
        if conv is None:
            if cids is None:
                continue  # deleted meanwhile
            raise KeyError(f"no conversation {cid!r}")
        conversations.append(conv)
    return conversations


def export_json(store: ConversationStore, cids: Iterable[str] | None = None) -> str:
    """A JSON export document of the given conversations (all when None), most recent first."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.time(),
        "conversations": [conversation_to_dict(c) for c in _load(store, cids)],
    }
    return json.dumps(document, ensure_ascii=False, indent=1)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def conversation_markdown(conv: Conversation) -> str:
    """One conversation as Markdown."""
    title = " ".join(conv.title.split()) or "Untitled conversation"
    parts = [f"# {title}", f"*Created {_when(conv.created_at)} · updated {_when(conv.updated_at)}*"]
    if conv.system_prompt:
        parts.append("**System prompt**\n\n" + "\n".join("> " + line for line in conv.system_prompt.splitlines()))
    for m in conv.messages:  # the selected versions
        note = "" if m.status == "complete" else f" *({m.status})*"
        note += {1: " 👍", 0: " 👎"}.get(m.feedback, "")
        files = "".join(f"\n\n*Attached: {a.name} ({a.mime_type})*" for a in m.attachments)
        parts.append(f"**{m.role.capitalize()}**{note}{files}\n\n{m.content}")
    return "\n\n".join(parts) + "\n"


def export_markdown(store: ConversationStore, cids: Iterable[str] | None = None) -> str:
    """The given conversations (all when None) as one Markdown document."""
    return "\n---\n\n".join(conversation_markdown(c) for c in _load(store, cids))


# ----- import -----


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


def parse_export(data: bytes | str) -> ExportDocument:
    """Decode and validate an export file, or raise ImportValidationError."""
    if not isinstance(data, bytes | str):
        raise ImportValidationError("the export must be bytes or text", "not_json")
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > MAX_IMPORT_BYTES:
        raise ImportValidationError(f"the file is larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB", "too_large")
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


def _to_conversation(item: ConversationIn, now: float) -> Conversation:
    created = item.created_at if item.created_at is not None else now
    linear = all(m.id is None for m in item.messages)  # an export before versions: a chain
    tree = [
        StoredMessage(
            id=n if linear else m.id,
            conversation_id="",
            role=m.role,
            content=m.content,
            created_at=m.created_at if m.created_at is not None else created,
            status=m.status,
            stats=m.stats.model_dump(exclude_unset=True) if m.stats is not None else None,
            parent_id=(n - 1 if n > 1 else None) if linear else m.parent,
            feedback=m.feedback,
            attachments=[Attachment(a.name, a.mime_type, a.text, a.tokens) for a in m.attachments],
        )
        for n, m in enumerate(item.messages, start=1)
    ]
    leaf = item.selected if item.selected is not None else (tree[-1].id if tree else None)
    by_id = {m.id: m for m in tree}
    path = path_to(by_id, {m.id: m.parent_id for m in tree}, leaf)
    updated = item.updated_at if item.updated_at is not None else max([created, *(m.created_at for m in tree)])
    title = item.title or next((title_from(m.content) for m in path if m.role == "user"), "")
    return Conversation("", title, item.system_prompt, dict(item.settings), created, updated, path, tree, leaf)


def fingerprint(conv: Conversation) -> tuple:
    """What makes two conversations the same one: system prompt, creation time and every message's role, text and
    place in the tree (not the selected version, feedback or attachments, which change without making it another)."""
    if conv.tree:
        index = {m.id: n for n, m in enumerate(conv.tree)}
        shape = [(index.get(m.parent_id, -1) if m.parent_id is not None else -1, m) for m in conv.tree]
    else:  # a path alone: a chain
        shape = list(enumerate(conv.messages, start=-1))
    return (conv.system_prompt, round(conv.created_at, 3), tuple((n, m.role, m.content) for n, m in shape))


class ImportedIds(list):
    """The new ids of an import; `skipped`: how many conversations were left out as already in the store."""

    skipped: int = 0


def import_json(store: ConversationStore, data: bytes | str, skip_existing: bool = False) -> ImportedIds:
    """Import the conversations of an export in one transaction (all or nothing) and return their new ids. With
    `skip_existing`, one the store already holds (the same `fingerprint`: an export imported again) is left out."""
    document = parse_export(data)
    now = time.time()
    incoming = [_to_conversation(c, now) for c in document.conversations]
    kept = incoming
    if skip_existing:
        have = {fingerprint(c) for s in store.list_conversations(limit=None) if (c := store.get_conversation(s.id))}
        kept = [c for c in incoming if fingerprint(c) not in have]
    ids = ImportedIds(store.import_conversations(kept))
    ids.skipped = len(incoming) - len(kept)
    return ids
