"""Types shared by the engine, the UI, the API and the store: messages, reply stats, errors, the backend seam."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, TypedDict, get_args

from .sampling import SamplingParams

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
ROLES: tuple[str, ...] = get_args(Role)
TURN_ROLES = ("user", "assistant")  # roles of stored conversation messages (the system prompt is a conversation field)


class Message(TypedDict):
    role: Role
    content: str


def history_to_messages(query: str, history: list[tuple[str, str]] | None, system: str | None) -> list[Message]:
    """Messages for InternLM2-style (user, assistant) pairs, with an optional system prompt first."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for user, assistant in history or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": query}]


def not_unicode(text: str) -> str | None:
    """Why `text` is not Unicode text the tokenizer can take (a lone surrogate such as "\\udfff", which JSON and
    Python strings allow), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{exc.reason} at character {exc.start}"
    return None


@dataclass
class ReplyStats:
    """What one reply cost and why it ended."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None  # seconds from the start of generation (after the queue)
    tokens_per_second: float | None = None  # decode speed, first token excluded
    total_seconds: float = 0.0
    queue_seconds: float = 0.0
    finish_reason: FinishReason = "stop"
    dropped_messages: int = 0  # oldest history messages left out to fit the context budget
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused from an earlier turn instead of prefilled
    batched: bool = False  # decoded in the continuous batch (another reply was running) rather than alone
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class EngineError(Exception):
    """Base of the errors a caller of the engine may see; `status` is the HTTP code the API answers with."""

    status = 500


class InvalidRequestError(EngineError):
    """The messages or parameters cannot be used (bad role, empty conversation ...)."""

    status = 400


class ContextTooLongError(InvalidRequestError):
    """Even the system prompt and the newest message leave no room for a reply in the context budget."""

    def __init__(self, needed: int, limit: int):
        self.needed, self.limit = needed, limit
        super().__init__(
            f"the prompt needs {needed} tokens (with one reply token) but the context budget is {limit}: "
            f"{needed - limit} tokens too many"
        )


class QueueFullError(EngineError):
    """Too many requests are already waiting for the GPU."""

    status = 503


class GenerationError(EngineError):
    """Generation failed (e.g. CUDA out of memory); the engine is usable again."""

    status = 503


@dataclass
class ReplyEvents:
    """Optional callbacks a caller passes to observe a reply: its queue place and the final stats."""

    on_queue: Callable[[int], None] | None = None  # called with the place in line (1 = next) while waiting
    stats: ReplyStats = field(default_factory=ReplyStats)


class ChatBackend(Protocol):
    """The one seam the UI, the API and the CLI use to get replies (local engine or remote server)."""

    def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        cancel: object | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Iterator[str]: ...
