"""The chat backend: pick it from settings (the in-process engine or a remote OpenAI-compatible server), and load it
once per process in a background thread that reports progress; a failed load can be retried."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import SecretStr

from internlm_app.chat_types import ChatBackend
from internlm_app.errors import load_error_message, load_error_reason
from internlm_app.load_progress import LoadStep, Progress, TerminalProgress, describe
from internlm_app.settings import ModelSettings

log = logging.getLogger(__name__)

# How many backends this process has created: /health and the Status page show it, so a second copy of the model
# (the web app and the API each loading their own) would be visible.
_created = 0
_created_lock = threading.Lock()


def create_backend(settings: ModelSettings, progress: Progress | None = None) -> ChatBackend:
    """The backend the settings ask for (INTERNLM_BACKEND); it receives their model part only (`settings.model`)."""
    global _created
    settings = settings.model
    if settings.backend == "openai":
        from internlm_app.backends.remote import RemoteBackend

        remote = RemoteBackend(settings)
        if progress:
            progress(LoadStep("connect", detail=settings.openai_base_url))
        remote.discover_model()
        backend: ChatBackend = remote
    else:
        from internlm_app.backends.engine import ChatEngine

        backend = ChatEngine.load(settings, progress=progress)
    with _created_lock:
        _created += 1
    return backend


class BackendFactory(Protocol):
    """How a BackendLoader makes its backend: `create_backend`, or a launcher's wrapper around it (the browser tests
    hold the load and pace the real model's forward passes: tests/browser_server.py)."""

    def __call__(self, settings: ModelSettings, progress: Progress | None = None) -> ChatBackend: ...


def backends_created() -> int:
    """The number of backends (models, for the local engine) this process has loaded so far."""
    with _created_lock:
        return _created


# Settings that change what gets loaded: all of ModelSettings (sampling defaults too: they are the engine's default).
# Two sessions with the same values share one backend.
LOAD_FIELDS = tuple(ModelSettings.model_fields)
State = Literal["idle", "loading", "ready", "failed"]


@dataclass(frozen=True)
class LoadStatus:
    """A snapshot of a load: its state, the step it is at, and the error when it failed.

    `step` is the step in English (for /health and logs), `progress` the same step typed (the web app translates it);
    on failure `error` is the English message and `error_reason` one of errors.LOAD_REASONS.
    """

    state: State
    step: str = ""
    progress: LoadStep | None = None
    elapsed: float = 0.0
    error: str | None = None
    error_reason: str = ""


def fingerprint(settings: ModelSettings) -> str:
    """The part of the settings that decides which backend is loaded (a secret as its hash, not as `**********`)."""
    return repr([(name, _comparable(getattr(settings, name))) for name in LOAD_FIELDS])


def _comparable(value: object) -> str:
    if isinstance(value, SecretStr):
        return "sha256:" + hashlib.sha256(value.get_secret_value().encode()).hexdigest()
    return str(value)


def _show_steps_in_terminal() -> None:
    """Make the load's INFO lines reach the terminal when nothing set up logging (`streamlit run app.py`)."""
    package_log = logging.getLogger("internlm_app")
    if package_log.level == logging.NOTSET:
        package_log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)


class BackendLoader:
    """Loads one backend in a daemon thread; thread-safe; a failure is kept until `retry()`, never forever.

    Each step is logged (a line every few seconds while a download runs) and kept for `status()`; a failure is one
    log line (the traceback only at DEBUG level, `--verbose`).
    """

    def __init__(self, settings: ModelSettings, create: BackendFactory = create_backend):
        self.settings = settings
        self._create = create
        self._lock = threading.Lock()
        self._state: State = "idle"
        self._progress_step: LoadStep | None = None
        self._started = 0.0
        self._error: str | None = None
        self._error_reason = ""
        self._backend: ChatBackend | None = None
        self._terminal = TerminalProgress(log)

    @property
    def backend(self) -> ChatBackend | None:
        return self._backend

    def start(self) -> None:
        """Start loading unless a load is running, finished, or failed (a failure waits for retry())."""
        with self._lock:
            if self._state != "idle":
                return
            self._state, self._started, self._error, self._error_reason = "loading", time.monotonic(), None, ""
            self._progress_step = None
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
            step = self._progress_step
            return LoadStatus(
                self._state, describe(step) if step else "", step, elapsed, self._error, self._error_reason
            )

    def _progress(self, step: LoadStep) -> None:
        with self._lock:
            self._progress_step = step
        self._terminal(step)

    def _run(self) -> None:
        _show_steps_in_terminal()
        try:
            backend = self._create(self.settings, progress=self._progress)
        except Exception as exc:
            reason, message = load_error_reason(exc), load_error_message(exc)
            log.error("loading the model failed: %s", message)
            log.debug("the load's traceback", exc_info=exc)
            with self._lock:
                self._state, self._error, self._error_reason = "failed", message, reason
            return
        with self._lock:
            self._backend, self._state = backend, "ready"
