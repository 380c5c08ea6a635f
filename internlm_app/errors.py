"""Errors meant for people: one base class whose message says what is wrong and what to do.

`reason` names the kind of problem so that a UI can say it in the user's language (the web app's labels are
`load_error_<reason>`), while `str(error)` stays the specific English message for terminals, logs and the API.
"""

from __future__ import annotations

# Kinds of load problem, each with a translated sentence and what to do in web/i18n.py.
LOAD_REASONS = (
    "no_gpu",  # INTERNLM_DEVICE=cuda but no CUDA GPU is visible
    "out_of_memory",  # not enough RAM or GPU memory for the weights
    "needs_gpu",  # a setting (quantization) that only works on CUDA
    "missing_package",  # an optional package a setting needs is not installed
    "damaged_files",  # a weights or config file is missing, incomplete, corrupt or of another model
    "not_a_model",  # INTERNLM_MODEL_PATH is not a model directory
    "download_failed",  # ModelScope could not be reached or refused the download
    "not_writable",  # the converted checkpoint cannot be written where the settings say
    "quantized_checkpoint",  # an AWQ/GPTQ checkpoint, which cannot be converted
    "warmup_failed",  # the first reply on the loaded model failed
    "remote_misconfigured",  # INTERNLM_OPENAI_BASE_URL is this server itself, or not an OpenAI-compatible API
    "unexpected",  # anything else: a bug or an unforeseen environment; the details say what
)


class UserFacingError(RuntimeError):
    """A problem the person running the app can fix; `str()` says what happened and what to do.

    Subclasses set a default `reason`; a raise site passes a more precise one (one of LOAD_REASONS).
    """

    reason = "unexpected"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            if reason not in LOAD_REASONS:
                raise ValueError(f"unknown reason {reason!r}")
            self.reason = reason


def load_error_reason(exc: BaseException) -> str:
    """The reason of a load failure: the error's own, else `unexpected`."""
    return exc.reason if isinstance(exc, UserFacingError) else "unexpected"


def load_error_message(exc: BaseException) -> str:
    """The English details of a load failure: our errors' own message; others with their type, as a bug report needs."""
    return str(exc) if isinstance(exc, UserFacingError) else f"{type(exc).__name__}: {exc}"
