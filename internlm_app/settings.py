"""Settings by concern (model, server, web app) as pydantic-settings classes (INTERNLM_ prefix); the same fields
feed the CLI flags (cli.py) and the README table. The backend and the loader receive `ModelSettings` only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from internlm_app.sampling import SamplingParams, sampling_field

DEFAULT_MODEL_ID = "Shanghai_AI_Laboratory/internlm2-chat-7b"
# The system prompt of the official `model.chat` (recorded in the fixture's reference.json).
DEFAULT_SYSTEM_PROMPT = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)
MAX_LENGTH_BOUNDS = (64, 262144)
LIST_FORMS = "one value, a comma-separated list, or a JSON list"


def parse_list(value: object) -> object:
    """A list setting from the environment or a flag: `a`, `a,b` or `["a", "b"]` (an empty string: no items)."""
    if not isinstance(value, str):
        return value  # already a list (Python callers, tests)
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"starts with '[' but is not a JSON list ({exc.msg} at character {exc.pos})") from None
        except RecursionError:
            raise ValueError("starts with '[' but is nested too deeply") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("a JSON list here must hold strings only")
        return items
    return [item.strip() for item in text.split(",")]


# A path whose `~` is expanded when the settings are read, so that a default can be shown as it is written.
HomePath = Annotated[Path, AfterValidator(Path.expanduser)]


def check_base_url(url: str) -> str:
    """An http(s) URL with a host, a valid port and no query or fragment (the client appends paths to it: ValueError
    otherwise); returned without a trailing slash."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in parts.netloc):
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:23333/v1")
    if parts.query or parts.fragment:
        raise ValueError("must have no ?query or #fragment: the client adds /chat/completions after it")
    return url.strip().rstrip("/")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _canonical_origin(origin: str) -> str | None:
    """`origin` as a browser sends it in its Origin header (scheme://host[:port], lower case, no default port), or
    None when no browser ever sends it so."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or "*" in parts.netloc or "@" in parts.netloc:
        return None
    if parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")):
        return None
    shown_port = f":{port}" if port is not None and port != _DEFAULT_PORTS[parts.scheme] else ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{shown_port}"


_THIS_MACHINE = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::1", "::"})


def check_not_forwarding_to_itself(settings: ModelSettings, host: str, port: int) -> None:
    """ValueError when a server on `host`:`port` would forward its replies (INTERNLM_BACKEND=openai) to itself; the
    running server refuses such requests too (508), this says it before anything starts."""
    if settings.backend != "openai":
        return
    parts = urlsplit(settings.openai_base_url)
    target_port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    if target_port == port and (parts.hostname in _THIS_MACHINE or parts.hostname == host):
        raise ValueError(
            f"INTERNLM_OPENAI_BASE_URL ({settings.openai_base_url}) is this server's own address (port {port}): "
            "point it at the model server (LMDeploy's api_server or vLLM, e.g. http://127.0.0.1:23333/v1), or "
            "serve on another --port"
        )


class _InternLMSettings(BaseSettings):
    """Read from INTERNLM_<NAME> environment variables."""

    # hide_input_in_errors: a bad value is never echoed (it may be an API key or the web password).
    model_config = SettingsConfigDict(
        env_prefix="INTERNLM_", extra="ignore", protected_namespaces=(), hide_input_in_errors=True
    )

    @classmethod
    def _blank_is_default(cls, value: object, info: ValidationInfo) -> object:
        """An empty value (`INTERNLM_TOOLS_DIR=`) means the setting's default, never the path `.` (the current
        folder) or an empty password; for the fields each class names."""
        if isinstance(value, str) and not value.strip() and info.field_name:
            field = cls.model_fields[info.field_name]
            return field.get_default(call_default_factory=True)
        return value


class ModelSettings(_InternLMSettings):
    """What is loaded and how it decodes: everything the backend (local engine or remote server) is created from."""

    # Model source
    model_id: str = Field(DEFAULT_MODEL_ID, description="ModelScope model id downloaded when no model path is given.")
    model_revision: str = Field("master", description="ModelScope revision (branch, tag or commit) of the model.")
    cache_dir: HomePath = Field(
        Path("~/.cache/internlm_app/models"),
        validate_default=True,
        description="ModelScope download cache and converted checkpoints.",
    )
    model_path: HomePath | None = Field(None, description="Local model directory; skips the download.")
    converted_dir: HomePath | None = Field(
        None, description="Where the Llama conversion of an InternLM2 checkpoint goes (default: under the cache dir)."
    )

    # Loading
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype: auto is float16 on CUDA and float32 on CPU."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Run on CUDA when present (auto) or force one.")
    device_map: str = Field("auto", description="accelerate device_map on CUDA ('auto' splits over all GPUs).")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="bitsandbytes quantization on CUDA.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    max_length: int = Field(
        32768,
        ge=MAX_LENGTH_BOUNDS[0],
        le=MAX_LENGTH_BOUNDS[1],
        description="Context budget in tokens (prompt + reply); older turns are left out beyond it.",
    )
    empty_cache_after_reply: bool = Field(False, description="Release the CUDA cache after each reply (torch_gc).")
    static_cache: bool | Literal["auto"] = Field(
        "auto",
        description="CUDA only: decode one reply over a static KV cache sized to max_length with a torch.compile'd "
        "step (CUDA graphs). auto: on when that cache fits in 3/4 of the GPU memory left beside the weights, else the "
        "dynamic cache (the log, the Status page and doctor say which and why); true / false force it. Loading "
        "compiles it in a warm-up reply (tens of seconds); the cache takes 128 KiB per token for InternLM2-7B in "
        "float16 (1 GiB at 8192).",
    )
    max_batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Most replies decoded at once. A reply that starts while another runs joins a continuous batch "
        "(transformers' paged KV cache); beyond this many, requests wait in line. 1: one reply at a time.",
    )
    kv_cache_memory_share: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Share of the GPU memory left after the weights, the static cache and KV reuse that the batch's "
        "paged KV cache may take (the rest is headroom for activations).",
    )
    kv_reuse_tokens: int = Field(
        16384,
        ge=0,
        le=1_048_576,
        description="KV cache tokens kept after a reply so that the next turn of a conversation (or a regenerate or "
        "edit) does not prefill the shared part again; least recently used conversations go first (0: off).",
    )
    stream_interval_ms: int = Field(
        20,
        ge=0,
        le=1000,
        description="Shortest time between two streamed chunks of the local engine: tokens generated faster go out "
        "together, saving a thread wake-up each (0: every token on its own).",
    )

    queue_limit: int = Field(16, ge=0, le=1024, description="Requests waiting for the GPU before the API answers 503.")

    # Remote backend
    backend: Literal["local", "openai"] = Field("local", description="local loads the model; openai calls a server.")
    openai_base_url: str = Field(
        "http://127.0.0.1:23333/v1",
        description="OpenAI-compatible server for the backend (LMDeploy's api_server port by default; never this "
        "app's own port: such a request is refused).",
    )
    openai_api_key: SecretStr = Field(
        SecretStr("EMPTY"), description="Key sent to the OpenAI-compatible server (empty: EMPTY, as vLLM expects)."
    )
    openai_model: str = Field("internlm2-chat-7b", description="Model name sent to the OpenAI-compatible server.")
    openai_timeout: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="Seconds the backend waits for the server's next bytes (its first token included) before the "
        "reply fails; connecting has 10 s.",
    )

    # Default sampling: a reply that names no sampling parameters (the API's defaults, the terminal chat's flags)
    temperature: float = sampling_field("temperature", show_range=True)
    top_p: float = sampling_field("top_p", show_range=True)
    top_k: int = sampling_field("top_k", show_range=True)
    repetition_penalty: float = sampling_field("repetition_penalty", show_range=True)
    max_new_tokens: int = sampling_field("max_new_tokens", show_range=True)

    @field_validator("cache_dir", "model_path", "converted_dir", "openai_api_key", mode="before")
    @classmethod
    def _blank_model_setting(cls, value: object, info: ValidationInfo) -> object:
        return cls._blank_is_default(value, info)

    @field_validator("openai_base_url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        return check_base_url(url)

    def default_sampling(self) -> SamplingParams:
        return SamplingParams(**{name: getattr(self, name) for name in SamplingParams.model_fields})

    @property
    def model(self) -> ModelSettings:
        """These fields alone, as a ModelSettings: all the backend receives from a Settings (no API keys, no web
        password); not read from the environment again."""
        if type(self) is ModelSettings:
            return self
        return ModelSettings.model_construct(
            _fields_set=self.model_fields_set & ModelSettings.model_fields.keys(),
            **{name: getattr(self, name) for name in ModelSettings.model_fields},
        )


class ServerSettings(_InternLMSettings):
    """How `serve` and `api` listen and whom the API lets in."""

    host: str = Field("0.0.0.0", description="Address `serve` (web app + API) and `api` bind to.")
    port: int = Field(6006, ge=1, le=65535, description="Port `serve` and `api` bind to (AutoDL forwards 6006).")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description=f'Bearer keys the API requires: {LIST_FORMS} (sk-1 / sk-1,sk-2 / ["sk-1"]).'
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description=f"Origins allowed by CORS: {LIST_FORMS}."
    )
    log_prompts: bool = Field(False, description="Log prompt text (debug only).")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _list_forms(cls, value: object) -> object:
        return parse_list(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins_as_browsers_send_them(cls, origins: list[str]) -> list[str]:
        for number, origin in enumerate(origins, 1):
            if not origin.strip():
                raise ValueError("an origin is empty (a stray comma?)")
            if origin != "*" and _canonical_origin(origin) != origin:
                raise ValueError(
                    f"origin {number} can never match: an origin is * or scheme://host[:port] in lower case, without "
                    "the default port, a path, a trailing slash or a wildcard (e.g. https://example.com), as a "
                    "browser sends it"
                )
        return origins

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value().strip() for key in keys):
            raise ValueError("API keys must not be empty (a stray comma?): an empty key would leave the API open")
        if any(not (key.get_secret_value().isascii() and key.get_secret_value().isprintable()) for key in keys):
            raise ValueError("API keys must be printable ASCII (an HTTP header carries them)")
        if any(" " in key.get_secret_value() for key in keys):
            raise ValueError("API keys must not contain spaces (the Authorization header splits on them)")
        return keys


class WebSettings(_InternLMSettings):
    """The web app's own: its password, where conversations are kept, the user's tools."""

    db_path: HomePath = Field(
        Path("~/.cache/internlm_app/conversations.db"), validate_default=True, description="SQLite file."
    )
    web_password: SecretStr | None = Field(None, description="Password required by the web app.")
    tools_dir: Path | None = Field(
        None,
        description="Folder whose `*.py` files' plain functions the chat offers the model as tools, beside the "
        "built-in ones (their code runs with the app's rights); unset or empty: built-in tools only.",
    )

    @field_validator("db_path", "web_password", "tools_dir", mode="before")
    @classmethod
    def _blank_web_setting(cls, value: object, info: ValidationInfo) -> object:
        return cls._blank_is_default(value, info)


# Fields are collected in reverse MRO order, so this lists model, server, then web settings (the README table's order).
class Settings(WebSettings, ServerSettings, ModelSettings):
    """Every setting: what the entry points (CLI, `streamlit run app.py`) read from the environment."""

    # Read by every front end (web app, API, terminal chat), never by the backend: a conversation's first turn.
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="Default system prompt; empty means none.")


# The settings table's sections, by class and who reads them (Settings adds system_prompt to the three).
SETTINGS_PARTS: tuple[tuple[type[BaseSettings], str], ...] = (
    (ModelSettings, "the backend: what is loaded and how it decodes (the engine and the loader read only these)"),
    (ServerSettings, "`serve` and `api`: where they listen, whom the API lets in"),
    (WebSettings, "the web app"),
    (Settings, "every front end (web app, API, terminal chat)"),
)


def describe_settings_error(exc: ValidationError) -> str:
    """One line per invalid setting (or sampling value), named by its environment variable and flag, with the value
    given unless it may be a secret (keys, passwords) or a list."""
    lines = []
    for error in exc.errors(include_url=False):
        name = _setting_name(error.get("loc", ()))
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        given = error.get("input")
        if isinstance(given, str | int | float) and not any(w in name for w in ("key", "password", "origin")):
            message += f" (given: {str(given)[:60]!r})"
        lines.append(f"INTERNLM_{name.upper()} / {_flag(name)}: {message}" if name else message)
    return "\n".join(lines)


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """The setting an error is about: a flag's error is located under its subcommand (`chat.temperature`)."""
    names = [part for part in loc if isinstance(part, str) and part in Settings.model_fields]
    return names[0] if names else str(loc[0]) if loc else ""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings_table() -> str:
    """Every setting as a Markdown table row, by class: environment variable, default, description (the README's)."""
    rows = ["| Environment variable | Default | Meaning |", "| --- | --- | --- |"]
    listed: set[str] = set()
    for part, readers in SETTINGS_PARTS:
        rows.append(f"| **`{part.__name__}`** | | Read by {readers}. |")
        for name, field in part.model_fields.items():
            if name not in listed:
                listed.add(name)
                rows.append(f"| `INTERNLM_{name.upper()}` | `{_shown_default(name, field)}` | {field.description} |")
    return "\n".join(rows)


def _shown_default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "[]"  # the list settings
    if name == "system_prompt":
        return "the official InternLM2 one"
    value = field.default
    return "(none)" if value is None else str(value.get_secret_value() if isinstance(value, SecretStr) else value)
