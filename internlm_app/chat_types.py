"""Types shared by the engine, the UI, the API and the store: messages, reply stats, errors, the backend seam."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, NotRequired, Protocol, TypedDict, TypeVar, get_args

from internlm_app.sampling import SamplingParams

T = TypeVar("T")

if TYPE_CHECKING:
    import threading

# "environment" is InternLM2's role for what a tool returns (chat/chat_format.md); OpenAI's "tool" maps to it.
Role = Literal["system", "user", "assistant", "environment"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
ROLES: tuple[str, ...] = get_args(Role)
TURN_ROLES = ("user", "assistant")  # roles of stored conversation messages (the system prompt is a conversation field)


@dataclass
class DeviceMemory:
    """Memory of one CUDA device in bytes (`runtime.gpu.memory_report`; what `release_memory` returns)."""

    index: int
    name: str
    allocated: int
    reserved: int
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


class ToolCall(TypedDict):
    """A function call the assistant made: its name and its arguments as JSON text (OpenAI's shape, flattened)."""

    id: str
    name: str
    arguments: str


class Message(TypedDict):
    role: Role
    content: str
    # InternLM2's `name=<|plugin|>` / `name=<|interpreter|>` on a system or environment turn: "plugin" or "interpreter".
    name: NotRequired[str]
    speaker: NotRequired[str]  # who speaks, as plain text: `<|im_start|>user name=alice` (OpenAI's message `name`)
    tool_calls: NotRequired[list[ToolCall]]  # an assistant turn's calls, rendered after its content


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
    error: str | None = None  # what went wrong, in English (the API's message)
    error_code: str | None = None  # the EngineError's `code`, so that a page can say it in its language

    def failed(self, exc: BaseException) -> None:
        """End as an error: `exc`'s message (and code) unless an earlier error was recorded."""
        self.finish_reason = "error"
        if self.error is None:
            self.error = str(exc) or type(exc).__name__
            self.error_code = getattr(exc, "code", None)

    def to_dict(self) -> dict:
        return asdict(self)


class EngineError(Exception):
    """Base of the errors a caller of the engine may see; `status` is the HTTP code the API answers with, `code`
    (where set) names the kind for a translated message (the web app's `error_<code>` labels)."""

    status = 500
    code: str | None = None


class InvalidRequestError(EngineError):
    """The messages or parameters cannot be used (bad role, empty conversation ...); `param` names the request field
    at fault when one is (the API's error body carries it)."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextTooLongError(InvalidRequestError):
    """Even the system prompt and the newest message leave no room for a reply in the context budget."""

    code = "context_too_long"

    def __init__(self, needed: int, limit: int):
        self.needed, self.limit = needed, limit
        super().__init__(
            f"the prompt needs {needed} tokens (with one reply token) but the context budget is {limit}: "
            f"{needed - limit} tokens too many"
        )


class QueueFullError(EngineError):
    """Too many requests are already waiting for the GPU."""

    status = 503
    code = "queue_full"


class GenerationError(EngineError):
    """Generation failed (e.g. CUDA out of memory); the engine is usable again."""

    status = 503


@dataclass
class ReplyEvents:
    """Optional callbacks a caller passes to observe a reply: its queue place and the final stats."""

    on_queue: Callable[[int], None] | None = None  # called with the place in line (1 = next) while waiting
    stats: ReplyStats = field(default_factory=ReplyStats)


@dataclass(frozen=True)
class ReplyOptions:
    """What one reply asks for beyond sampling (the OpenAI API's extras); the defaults change nothing.

    Any of seed, logprobs, penalties or a grammar decodes the reply on the one-reply worker with the engine's own
    sampler (`backends/sampler.py`): the continuous batch samples only by temperature / top-p / top-k.
    """

    seed: int | None = None  # sampling draws from a generator seeded with this: same request alone -> same text
    logprobs: int | None = None  # None: off; k: each token's log-probability and its k most likely alternatives
    presence_penalty: float = 0.0  # OpenAI's formula: logit[j] -= presence * (count[j] > 0) + frequency * count[j]
    frequency_penalty: float = 0.0
    json_schema: dict | None = None  # the reply is JSON valid against this schema ({"type": "object"}: json_object)
    tools: bool = False  # tools were offered: <|action_start|> begins a call instead of ending the reply
    force_tool_call: bool = False  # the reply is a tool call: the prompt ends in <|action_start|><|plugin|>\n
    keep_history: bool = False  # cap the reply to the room left rather than drop turns; drop only what cannot fit
    raw_prompt: bool = False  # the one message's content is the whole prompt, special tokens included (completions)
    stop: list[str] | None = None  # generation ends at the token that completes one (the caller cuts the text)
    admission: QueueAdmission | None = None  # one of a request's n choices, let in as one (`ReplyQueue.reserve`)

    @property
    def needs_sampler(self) -> bool:
        return (
            self.seed is not None
            or self.logprobs is not None
            or bool(self.presence_penalty or self.frequency_penalty)
            or self.json_schema is not None
        )


@dataclass
class TokenLogprob:
    """One generated token: its text, UTF-8 bytes, log-probability (natural log, of the model's distribution before
    temperature / top-p / top-k), and the most likely alternatives at that position as (text, bytes, logprob)."""

    token_id: int
    token: str
    bytes: builtins.bytes
    logprob: float
    top: list[tuple[str, builtins.bytes, float]] = field(default_factory=list)


@dataclass
class ReplyChunk:
    """A piece of a streamed reply: text and the ids it came from, their logprobs when asked for, or one control
    token the reply carries as structure (`control`, e.g. "<|action_start|>", with no text)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    control: str | None = None


# A streamed reply: a generator, so that closing it (`close()`, or leaving a `with contextlib.closing(...)`) stops
# the generation behind it.
Reply = Generator[T, None, None]


@dataclass
class ModelInfo:
    """What was loaded, where and how (shown by the Status page, /health and `doctor`)."""

    name: str
    path: str
    dtype: str
    device: str
    device_map: dict | str | None
    quantization: str
    attn_implementation: str
    context_window: int
    parameters: int = 0
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class QueueAdmission(Protocol):
    """A request's choice let in with the others (`ReplyQueue.reserve`): never refused by the limit; it counts against
    it until it is in line. `give_back`: it will not get in line (it failed or was closed first); idempotent."""

    def give_back(self) -> None: ...


class ReplyQueue(Protocol):
    """Replies in first-come order for the GPU: `slots` generate at once, the rest wait (the engine's GpuQueue)."""

    slots: int
    max_waiting: int | None  # waiting replies before a new one is refused (QueueFullError); None: no limit

    @property
    def active(self) -> int: ...  # replies generating now

    @property
    def busy(self) -> bool: ...  # every slot taken: a new reply waits (one only the worker decodes may wait anyway)

    def waiting(self) -> int: ...

    def check_room(self) -> None: ...  # raises QueueFullError if a reply arriving now would be refused

    def reserve(self, count: int) -> list[QueueAdmission]: ...  # `count` choices let in as one, or QueueFullError


@dataclass(frozen=True)
class DecodeReason:
    """Why a decode path was chosen. `text` is the English the log, `doctor` and /health show; `id` and `values`
    let a page say it in its own language (the messages: `backends.decode_plan.REASONS`)."""

    id: str
    text: str
    values: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class DecodingState:
    """How replies are decoded and why (the decode plan chosen at load), and the KV cache kept across turns."""

    single_path: Literal["static", "dynamic"]  # one reply alone: static KV cache + torch.compile, or dynamic cache
    single_reason: DecodeReason
    batch_slots: int  # most replies decoded together; 1: no continuous batching
    batch_reason: DecodeReason
    kv_bytes_per_token: int  # KV cache per token of context
    batch_cache_tokens: int  # the batch's paged KV cache, in tokens (0 without batching)
    page_size: int  # tokens per page of that cache (the unit of prefix sharing)
    kv_reuse_tokens: int  # the budget of KV cache kept across turns, in tokens
    kept_tokens: int  # tokens of KV cache kept across turns right now

    def to_dict(self) -> dict:
        """For /health: each reason as its English text, with its message id beside it (`single_reason_id`)."""
        state = asdict(self)
        for name in ("single_reason", "batch_reason"):
            reason: DecodeReason = getattr(self, name)
            state[name], state[f"{name}_id"] = reason.text, reason.id
        return state


class ChatBackend(Protocol):
    """The one seam the UI, the API and the CLI use (the local engine, or a remote OpenAI-compatible server).

    Errors are EngineErrors: InvalidRequestError (and ContextTooLongError) for a request the backend refuses,
    QueueFullError when too many wait, GenerationError when generation fails.
    """

    info: ModelInfo
    local: bool  # the model runs in this process: tools, JSON output, logprobs and penalties need that

    @property
    def queue(self) -> ReplyQueue | None: ...  # None: a remote server queues requests itself

    @property
    def context_window(self) -> int: ...  # tokens of prompt + reply the model takes

    def decoding(self) -> DecodingState | None: ...  # None: decoded elsewhere (remote)

    def unavailable(self) -> str | None:
        """Why no reply can be made now (a remote model server that does not answer), else None; /health asks it.
        Blocks up to a few seconds: call it off the event loop."""
        ...

    def release_memory(self) -> tuple[list[DeviceMemory], list[DeviceMemory]]:
        """Release what the backend caches on the GPU; memory per GPU before and after (empty lists: none here)."""
        ...

    def count_tokens(self, text: str) -> int: ...  # tokens of `text` alone (remote: an estimate that errs high)

    def prompt_tokens(self, messages: list[Message]) -> int: ...  # tokens of the prompt these messages make

    def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Reply[str]:
        """The reply's text as it is generated; setting `cancel` or closing the iterator stops it (within a token
        locally). `events.stats` holds the reply's ReplyStats when it ends; `max_length` caps the context budget."""
        ...

    def stream_chunks(
        self,
        messages: list[Message],
        params: SamplingParams,
        options: ReplyOptions = ...,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Reply[ReplyChunk]:
        """Like stream_reply, as ReplyChunks with the `options` (tools, JSON schema, logprobs, ...); InvalidRequestError
        for options the backend cannot honour."""
        ...
