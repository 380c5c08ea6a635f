"""Where the weights come from: a local directory or a ModelScope download, converted once if InternLM2."""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from pathlib import Path

from internlm_app.errors import UserFacingError
from internlm_app.load_progress import LoadStep, Progress
from internlm_app.runtime.convert import MARKER, convert_checkpoint, is_converted, is_internlm2_checkpoint
from internlm_app.settings import ModelSettings

log = logging.getLogger(__name__)


class ModelSourceError(UserFacingError):
    """The model directory is missing or cannot be downloaded; the message says what to do."""

    reason = "not_a_model"


class _DownloadTracker:
    """Adds ModelScope's per-file callbacks up into LoadSteps over the whole model (bytes and files)."""

    def __init__(self, progress: Progress, sizes: dict[str, int]):
        self._progress, self._sizes = progress, sizes
        self._lock = threading.Lock()
        self._bytes, self._files = 0, 0

    def report(self, filename: str, size: int = 0, finished: bool = False) -> None:
        with self._lock:
            self._bytes += size
            self._files += finished
            step = LoadStep(
                "download",
                self._bytes,
                sum(self._sizes.values()),
                files_done=self._files,
                files_total=len(self._sizes),
                detail=filename,
            )
        self._progress(step)

    def callback_class(self) -> type:
        """A ModelScope ProgressCallback subclass (it wants classes, one instance per file) reporting here."""
        from modelscope.hub.callback import ProgressCallback

        tracker = self

        class _Callback(ProgressCallback):
            def update(self, size: int) -> None:
                tracker.report(self.filename, size)

            def end(self) -> None:
                tracker.report(self.filename, finished=True)

        return _Callback


def _file_sizes(model_id: str, revision: str) -> dict[str, int]:
    """Every file of the model and its size in bytes, from the hub's listing; empty when the listing fails (the
    download then reports bytes without a total)."""
    from modelscope.hub.api import HubApi
    from requests.exceptions import ConnectionError as RequestsConnectionError

    try:
        files = HubApi().get_model_files(model_id, revision=revision, recursive=True)
    except (ConnectionError, RequestsConnectionError):  # (modelscope's NetworkError is a ConnectionError)
        raise  # no network: the download would retry the same for as long again (download_model says what to do)
    except Exception as exc:  # any other failure: the download reports it; the listing is only for the total
        log.debug("could not list the files of %s: %s", model_id, exc)
        return {}
    return {
        str(f.get("Path") or f.get("Name")): int(f.get("Size") or 0)
        for f in files
        if isinstance(f, dict) and f.get("Type", "blob") != "tree"
    }


def download_model(model_id: str, revision: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """Fetch (or resume fetching) a model from ModelScope and return its local directory.

    `progress` gets `download` LoadSteps: bytes and files so far of the whole model. Raises ModelSourceError
    (reason `download_failed`, or `missing_package`) saying what to do.
    """
    try:
        from modelscope import snapshot_download
    except ImportError as exc:  # pragma: no cover - modelscope is in requirements.txt
        raise ModelSourceError("modelscope is not installed: pip install modelscope", "missing_package") from exc
    log.info("downloading %s@%s from ModelScope into %s", model_id, revision, cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise ModelSourceError(
            f"cannot make the cache directory {cache_dir} ({exc.strerror or exc}): set INTERNLM_CACHE_DIR / "
            "--cache-dir to a folder that can be written (on AutoDL, under /root/autodl-tmp)",
            "not_writable",
        ) from exc
    callbacks = []
    try:
        if progress is not None:
            tracker = _DownloadTracker(progress, _file_sizes(model_id, revision))
            tracker.report("")
            callbacks.append(tracker.callback_class())
        path = snapshot_download(
            model_id, revision=revision, cache_dir=str(cache_dir), progress_callbacks=callbacks or None
        )
    except Exception as exc:
        raise ModelSourceError(
            f"could not download {model_id} from ModelScope ({exc}). Check the network, or download the model "
            "elsewhere and point INTERNLM_MODEL_PATH / --model-path at the directory.",
            "download_failed",
        ) from exc
    return Path(path)


def converted_dir_for(src: Path, settings: ModelSettings) -> Path:
    """Where the Llama conversion of `src` lives (stable per source path)."""
    if settings.converted_dir:  # its real place ("~/conv", "."), as convert_checkpoint writes it and the lock sits
        return Path(settings.converted_dir).expanduser().resolve()
    digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]
    return Path(settings.cache_dir).expanduser().resolve() / "converted" / f"{src.name}-llama-{digest}"


def source_dir(settings: ModelSettings, progress: Progress | None = None) -> Path:
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
    _warn_if_short_of_space(Path(settings.cache_dir))
    return download_model(settings.model_id, settings.model_revision, Path(settings.cache_dir), progress)


DOWNLOAD_AND_CONVERSION_BYTES = 31_000_000_000  # InternLM2-chat-7B: 15.5 GB downloaded, 15.5 GB converted


def _warn_if_short_of_space(cache_dir: Path) -> None:
    """Say before a download (minutes of it) that the disk under the cache cannot hold the model and its conversion:
    on AutoDL the default cache is on the 30 GB system disk. Only a warning: a download that is mostly done, or a
    conversion that goes elsewhere (INTERNLM_CONVERTED_DIR), may need less."""
    existing = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # (the download says what is wrong with the cache directory)
    free = shutil.disk_usage(existing).free
    if free < DOWNLOAD_AND_CONVERSION_BYTES:
        log.warning(
            "only %.1f GB free under %s; the model and its conversion need about %.0f GB: set INTERNLM_CACHE_DIR to "
            "a bigger disk (on AutoDL /root/autodl-tmp/models, the data disk)",
            free / 1e9,
            existing,
            DOWNLOAD_AND_CONVERSION_BYTES / 1e9,
        )


def resolve_model_dir(settings: ModelSettings, progress: Progress | None = None) -> Path:
    """A directory transformers loads natively: InternLM2 checkpoints are converted once, then reused."""
    src = source_dir(settings, progress)
    if not is_internlm2_checkpoint(src):
        return src
    dst = converted_dir_for(src, settings)
    if is_converted(dst, src):
        log.info("using converted checkpoint %s", dst)
        return dst
    # Another process may be converting it now: convert_checkpoint waits for it, then reuses the result.
    if (dst / MARKER).is_file():
        log.info("the conversion in %s is of %s as it was before (a file changed since): converting it again", dst, src)
    log.info("converting InternLM2 checkpoint %s -> %s (once)", src, dst)
    return convert_checkpoint(src, dst, progress=progress)
