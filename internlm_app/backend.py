"""The chat backend: pick it from settings (the in-process engine or a remote OpenAI-compatible server), and load it
once per process in a background thread that reports progress; a failed load can be retried."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .chat_types import ChatBackend
from .convert import Progress
from .settings import Settings

log = logging.getLogger(__name__)

# How many backends this process has created: /health and the Status page show it, so a second copy of the model
# (the web app and the API each loading their own) would be visible.
_created = 0
_created_lock = threading.Lock()


def create_backend(settings: Settings, progress: Progress | None = None) -> ChatBackend:
    """The backend the settings ask for (INTERNLM_BACKEND)."""
    global _created
    if settings.backend == "openai":
        from .remote import RemoteBackend

        remote = RemoteBackend(settings)
        remote.discover_model()
        backend: ChatBackend = remote
    else:
        from .engine import ChatEngine

        backend = ChatEngine.load(settings, progress=progress)
    with _created_lock:
        _created += 1
    return backend


def backends_created() -> int:
    """The number of backends (models, for the local engine) this process has loaded so far."""
    with _created_lock:
        return _created


# Settings that change what gets loaded; two sessions with the same values share one backend.
LOAD_FIELDS = (
    "backend",
    "model_id",
    "model_revision",
    "model_path",
    "cache_dir",
    "converted_dir",
    "dtype",
    "device",
    "device_map",
    "quantization",
    "attn_implementation",
    "max_length",
    "queue_limit",
    "empty_cache_after_reply",
    "static_cache",
    "max_batch_size",
    "kv_cache_memory_share",
    "kv_reuse_tokens",
    "stream_interval_ms",
    "openai_base_url",
    "openai_model",
)
_USER_ERRORS = ("ModelLoadError", "ModelSourceError", "ConversionError", "ContextTooLongError")

State = Literal["idle", "loading", "ready", "failed"]


@dataclass(frozen=True)
class LoadStatus:
    """A snapshot of a load: its state, the step it is at, and the error when it failed."""

    state: State
    step: str = ""
    done: int = 0
    total: int = 0
    elapsed: float = 0.0
    error: str | None = None


def fingerprint(settings: Settings) -> str:
    """The part of the settings that decides which backend is loaded."""
    return repr([(name, str(getattr(settings, name))) for name in LOAD_FIELDS])


def describe_load_error(exc: BaseException) -> str:
    """A one-paragraph message for the page: our own errors already say what to do."""
    if type(exc).__name__ in _USER_ERRORS:
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _StepHandler(logging.Handler):
    """Copies the loading thread's log lines from internlm_app (download, convert, load) into the status."""

    def __init__(self, loader: BackendLoader, thread_id: int):
        super().__init__(logging.INFO)
        self._loader, self._thread_id = loader, thread_id

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread_id:
            self._loader._set_step(record.getMessage())


class BackendLoader:
    """Loads one backend in a daemon thread; thread-safe; a failure is kept until `retry()`, never forever."""

    def __init__(self, settings: Settings, create: Callable[..., ChatBackend] = create_backend):
        self.settings = settings
        self._create = create
        self._lock = threading.Lock()
        self._state: State = "idle"
        self._step, self._done, self._total = "", 0, 0
        self._started = 0.0
        self._error: str | None = None
        self._backend: ChatBackend | None = None

    @property
    def backend(self) -> ChatBackend | None:
        return self._backend

    def start(self) -> None:
        """Start loading unless a load is running, finished, or failed (a failure waits for retry())."""
        with self._lock:
            if self._state != "idle":
                return
            self._state, self._started, self._error = "loading", time.monotonic(), None
            self._step, self._done, self._total = "", 0, 0
        threading.Thread(target=self._run, name="internlm-load", daemon=True).start()

    def retry(self) -> None:
        """Forget a failure and load again."""
        with self._lock:
            if self._state == "failed":
                self._state = "idle"
        self.start()

    def status(self) -> LoadStatus:
        with self._lock:
            elapsed = time.monotonic() - self._started if self._started else 0.0
            return LoadStatus(self._state, self._step, self._done, self._total, elapsed, self._error)

    def _set_step(self, step: str) -> None:
        with self._lock:
            self._step = step

    def _progress(self, done: int, total: int, what: str) -> None:
        with self._lock:
            self._done, self._total, self._step = done, total, f"converting {what} ({done}/{total})"

    def _run(self) -> None:
        package_log = logging.getLogger("internlm_app")
        if package_log.level == logging.NOTSET:
            package_log.setLevel(logging.INFO)  # the steps are logged at INFO
        handler = _StepHandler(self, threading.get_ident())
        package_log.addHandler(handler)
        try:
            try:
                backend = self._create(self.settings, progress=self._progress)
            finally:
                package_log.removeHandler(handler)
        except Exception as exc:
            log.error("loading the model failed", exc_info=exc)  # the traceback goes to the server log only
            with self._lock:
                self._state, self._error = "failed", describe_load_error(exc)
            return
        with self._lock:
            self._backend, self._state = backend, "ready"
