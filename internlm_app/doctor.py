"""`doctor`: what this machine has, the state of the model directory (or of the remote model server), and what to
fix."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from internlm_app.backends.decode_plan import estimate_for_checkpoint
from internlm_app.runtime import gpu
from internlm_app.runtime.convert import (
    MARKER,
    ConversionError,
    check_conversion,
    check_headers,
    check_source,
    is_converted,
    is_internlm2_checkpoint,
    read_json,
    source_shards,
)
from internlm_app.runtime.loader import ModelLoadError, check_tokenizer_files, checkpoint_bytes
from internlm_app.runtime.model_source import converted_dir_for
from internlm_app.settings import ModelSettings

PACKAGES = ("torch", "transformers", "accelerate", "sentencepiece", "safetensors", "modelscope", "streamlit", "fastapi")
MIN_TRANSFORMERS = (5, 3)


@dataclass(frozen=True)
class Problem:
    """Something to fix: `key` names it for translations (the web's `doctor_<key>` labels, filled with `values`),
    `text` says it in English for the terminal."""

    key: str
    text: str
    values: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_in_the_way(folder: Path) -> bool:
    """Whether `folder`, or the nearest of its parents that exists, is a file (so the folder cannot be made)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing is not None and not existing.is_dir()


def _model_state(settings: ModelSettings) -> dict:
    if settings.model_path is not None:
        src = Path(settings.model_path).expanduser()
    else:
        src = Path(settings.cache_dir) / settings.model_id.replace(".", "___")  # ModelScope's cache layout
    state: dict = {"source": str(src), "present": (src / "config.json").is_file()}
    if not state["present"]:
        return state
    try:
        state["weights_bytes"] = checkpoint_bytes(src)
        state["internlm2_format"] = is_internlm2_checkpoint(src)
        model_type = read_json(src / "config.json").get("model_type")
        if not isinstance(model_type, str):
            raise ConversionError(f"{src / 'config.json'} names no model_type: download the model again")
        if state["weights_bytes"] and state["internlm2_format"]:
            _, shards = check_source(src)  # what the conversion checks first: config values, tokenizer, weight index
            check_headers(shards)
        elif state["weights_bytes"]:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if model_type not in CONFIG_MAPPING:
                state["own_code"] = model_type  # transformers has no class for it: the folder's own code is needed
                return state
            check_headers(source_shards(src))  # the weight index names files that are there, and they can be read
            check_tokenizer_files(src)
        elif state["internlm2_format"] and is_converted(converted_dir_for(src, settings), src):
            pass  # the weights were deleted after their conversion (to save disk): the conversion is what is used
        else:
            return state  # no weights: said as such
    except (ConversionError, ModelLoadError) as exc:  # a config, tokenizer, weight index or file that cannot be used
        state["damaged"] = str(exc)
        return state
    if not state["internlm2_format"]:
        return state
    dst = converted_dir_for(src, settings)
    state["converted_dir"] = str(dst)
    state["converted"] = is_converted(dst, src)
    if not state["converted"] and (dst / MARKER).is_file():
        state["conversion"] = "out of date (the source changed since): converted again at the next start"
    elif state["converted"]:
        try:
            check_conversion(dst)
        except ConversionError as exc:
            state["conversion_damaged"] = str(exc)
    return state


def _remote_state(settings: ModelSettings, problems: list[Problem]) -> dict:
    """The remote model server's answer to `/v1/models` (INTERNLM_BACKEND=openai); what is wrong goes to `problems`."""
    import httpx2
    import openai

    from internlm_app.backends.remote import RemoteBackend, RemoteSetupError

    url = settings.openai_base_url
    state: dict = {"base_url": url, "model": settings.openai_model, "served_models": None}
    try:
        state["served_models"] = RemoteBackend(settings).served_models()
    except RemoteSetupError as exc:
        problems.append(Problem("remote_misconfigured", str(exc), {"url": url}))
    except openai.APIStatusError as exc:  # the key refused (401 / 403), or busy or failing (429, 5xx)
        if exc.status_code in (401, 403):
            text = f"the model server at {url} refused the key ({exc.status_code}): check INTERNLM_OPENAI_API_KEY"
            problems.append(Problem("remote_key_refused", text, {"url": url}))
        else:
            text = f"the model server at {url} answers {exc.status_code} for now (busy, starting or failing)"
            problems.append(Problem("remote_unreachable", text, {"url": url}))
    except (openai.APIConnectionError, httpx2.HTTPError) as exc:
        text = f"cannot reach the model server at {url} ({exc}): start it, or check INTERNLM_OPENAI_BASE_URL"
        problems.append(Problem("remote_unreachable", text, {"url": url}))
    served = state["served_models"]
    if served is not None and not served:
        problems.append(Problem("remote_no_models", f"the model server at {url} lists no model", {"url": url}))
    return state


def doctor_report(settings: ModelSettings) -> dict:
    """Facts and problems, as a dict (printed by the CLI, shown by the Status page). With a remote backend the model
    server is checked instead of the GPU, the model files and the disk."""
    problems: list[Problem] = []
    versions = {name: _version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    tf = versions.get("transformers")
    if tf and tuple(int(x) for x in tf.split(".")[:2]) < MIN_TRANSFORMERS:
        text = f"transformers {tf} is too old (needs >= 5.3, CVE-2026-4372): pip install -U transformers"
        problems.append(Problem("old_transformers", text, {"version": tf}))
    devices = [d.to_dict() for d in gpu.memory_report()]
    machine = {
        "versions": versions,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": devices,
        "ram_available_bytes": gpu.available_ram_bytes(),
    }
    if settings.backend == "openai":
        return {
            **machine,
            "remote": _remote_state(settings, problems),
            "decoding": f"on the model server at {settings.openai_base_url} (INTERNLM_BACKEND=openai)",
            "problems": problems,
        }
    if not devices and settings.device != "cpu":  # INTERNLM_DEVICE=cpu asks for the CPU: no GPU is no problem
        text = (
            "no CUDA GPU visible: the 7B model needs an NVIDIA GPU (24 GB for float16); check nvidia-smi and that "
            "torch is a CUDA build (python -c 'import torch; print(torch.version.cuda)')"
        )
        problems.append(Problem("no_gpu", text))
    model = _model_state(settings)
    source = Path(model["source"])
    if not model["present"] and settings.model_path is not None and not source.exists():
        text = f"the model path {source} does not exist: check --model-path / INTERNLM_MODEL_PATH"
        problems.append(Problem("path_missing", text, {"path": str(source)}))
    elif not model["present"] and settings.model_path is not None:
        text = f"{source} has no config.json: not a model directory (--model-path / INTERNLM_MODEL_PATH)"
        problems.append(Problem("not_a_model", text, {"path": str(source)}))
    elif not model["present"] and _file_in_the_way(Path(settings.cache_dir)):
        text = f"the cache directory {settings.cache_dir} is a file: move it, or set INTERNLM_CACHE_DIR to a folder"
        problems.append(Problem("cache_not_dir", text, {"path": str(settings.cache_dir)}))
    elif not model["present"]:
        text = f"model not downloaded yet: run `python -m internlm_app download` (into {settings.cache_dir})"
        problems.append(Problem("not_downloaded", text, {"path": str(settings.cache_dir)}))
    elif "damaged" in model:
        problems.append(Problem("damaged_model", model["damaged"], {"path": str(source), "detail": model["damaged"]}))
    elif "own_code" in model:
        text = (
            f"{source / 'config.json'} names the model type {model['own_code']!r}, which transformers has no built-in "
            "class for: it needs the folder's own Python code, which this app never runs"
        )
        problems.append(Problem("needs_own_code", text, {"path": str(source), "model_type": model["own_code"]}))
    elif "conversion_damaged" in model:
        values = {"path": model["converted_dir"]}
        problems.append(Problem("damaged_conversion", model["conversion_damaged"], values))
    elif not model.get("weights_bytes") and not model.get("converted"):
        text = f"{source} has a config.json but no weight files (*.safetensors / *.bin): download it again"
        problems.append(Problem("no_weights", text, {"path": str(source)}))
    disk_dir = Path(settings.cache_dir)
    while not disk_dir.exists() and disk_dir != disk_dir.parent:
        disk_dir = disk_dir.parent
    free = shutil.disk_usage(disk_dir).free
    need = 2 * model.get("weights_bytes", 15_500_000_000) if not model.get("converted") else 0
    if free < need:
        text = (
            f"only {gpu.format_bytes(free)} free under {disk_dir}; downloading and converting needs about "
            f"{gpu.format_bytes(need)}. On AutoDL point INTERNLM_CACHE_DIR at /root/autodl-tmp (the data disk)."
        )
        values = {"free": gpu.format_bytes(free), "path": str(disk_dir), "need": gpu.format_bytes(need)}
        problems.append(Problem("low_disk", text, values))
    decoding = "unknown until the model is downloaded"
    if model["present"] and "damaged" not in model:
        config = read_json(source / "config.json")
        gpu_free = int(torch.cuda.mem_get_info()[0]) if devices else None
        try:
            decoding = estimate_for_checkpoint(config, settings, gpu_free, model.get("weights_bytes", 0))
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:  # "hidden_size": "64", a zero ...
            text = f"{source / 'config.json'} holds a value of the wrong kind ({exc}): download the model again"
            problems.append(Problem("damaged_config", text, {"path": str(source)}))
    return {
        **machine,
        "model": model,
        "disk_free_bytes": free,
        "decoding": decoding,
        "problems": problems,
    }


def format_report(report: dict) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in report["versions"].items())]
    lines.append(f"CUDA: {report['cuda'] or 'none'} (available: {report['cuda_available']})")
    for d in report["gpus"]:
        used, total = gpu.format_bytes(d["allocated"]), gpu.format_bytes(d["total"])
        lines.append(f"GPU {d['index']}: {d['name']} — {used} allocated of {total}")
    if report["ram_available_bytes"]:
        lines.append(f"RAM available: {gpu.format_bytes(report['ram_available_bytes'])}")
    if "remote" in report:
        lines.append("remote: " + ", ".join(f"{k}={v}" for k, v in report["remote"].items()))
    else:
        lines.append("model: " + ", ".join(f"{k}={v}" for k, v in report["model"].items()))
        lines.append(f"disk free: {gpu.format_bytes(report['disk_free_bytes'])}")
    lines.append(f"decoding: {report['decoding']}")
    lines += [f"problem: {p}" for p in report["problems"]] or ["no problems found"]
    return "\n".join(lines)
