"""Where the weights come from: a local directory or a ModelScope download, converted once if InternLM2."""

from __future__ import annotations

import fcntl
import hashlib
import logging
from pathlib import Path

from .convert import ConversionError, Progress, convert_checkpoint, is_converted, is_internlm2_checkpoint
from .settings import Settings

log = logging.getLogger(__name__)


class ModelSourceError(RuntimeError):
    """The model directory is missing or cannot be downloaded; the message says what to do."""


def download_model(model_id: str, revision: str, cache_dir: Path) -> Path:
    """Fetch (or resume fetching) a model from ModelScope and return its local directory."""
    try:
        from modelscope import snapshot_download
    except ImportError as exc:  # pragma: no cover - modelscope is in requirements.txt
        raise ModelSourceError("modelscope is not installed: pip install modelscope") from exc
    log.info("downloading %s@%s from ModelScope into %s", model_id, revision, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = snapshot_download(model_id, revision=revision, cache_dir=str(cache_dir))
    except Exception as exc:
        raise ModelSourceError(
            f"could not download {model_id} from ModelScope ({exc}). Check the network, or download the model "
            "elsewhere and point INTERNLM_MODEL_PATH / --model-path at the directory."
        ) from exc
    return Path(path)


def converted_dir_for(src: Path, settings: Settings) -> Path:
    """Where the Llama conversion of `src` lives (stable per source path)."""
    if settings.converted_dir:
        return Path(settings.converted_dir)
    digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]
    return Path(settings.cache_dir) / "converted" / f"{src.name}-llama-{digest}"


def source_dir(settings: Settings) -> Path:
    """The model directory as given or downloaded, before any conversion."""
    if settings.model_path is not None:
        path = Path(settings.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path} is not a model directory (no config.json). Point --model-path / INTERNLM_MODEL_PATH at the "
                "folder that holds config.json, or unset it to download "
                f"{settings.model_id} with `python -m internlm_app download`."
            )
        return path
    return download_model(settings.model_id, settings.model_revision, Path(settings.cache_dir))


def resolve_model_dir(settings: Settings, progress: Progress | None = None) -> Path:
    """A directory transformers loads natively: InternLM2 checkpoints are converted once, then reused."""
    src = source_dir(settings)
    if not is_internlm2_checkpoint(src):
        return src
    dst = converted_dir_for(src, settings)
    if is_converted(dst, src):
        log.info("using converted checkpoint %s", dst)
        return dst
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        lock = open(dst.parent / f"{dst.name}.lock", "w")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise ConversionError(
            f"cannot write the converted checkpoint under {dst.parent}: {exc.strerror or exc}. Point "
            "INTERNLM_CONVERTED_DIR (or INTERNLM_CACHE_DIR) at a writable directory."
        ) from exc
    # The web app and the API may start together: one converts, the other waits and then reuses the result.
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted(dst, src):
            return dst
        log.info("converting InternLM2 checkpoint %s -> %s (once)", src, dst)
        return convert_checkpoint(src, dst, progress=progress)
