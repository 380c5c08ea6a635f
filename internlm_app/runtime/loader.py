"""Load a model directory with transformers' native classes (never remote code) and its chat tokenizer."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from internlm_app.chat_types import ModelInfo
from internlm_app.errors import UserFacingError
from internlm_app.load_progress import LoadStep, Progress
from internlm_app.runtime import gpu
from internlm_app.runtime.convert import read_json
from internlm_app.runtime.model_source import resolve_model_dir
from internlm_app.runtime.tokenizer import ChatTokenizer, load_tokenizer
from internlm_app.settings import ModelSettings

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelLoadError(UserFacingError):
    """The model cannot be loaded here; the message says why and what to do."""


def choose_device(settings: ModelSettings) -> str:
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "INTERNLM_DEVICE=cuda but no CUDA GPU is visible (torch.cuda.is_available() is False). Check nvidia-smi "
            "and that torch is a CUDA build, or set INTERNLM_DEVICE=cpu for a (slow) CPU run.",
            "no_gpu",
        )
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def choose_dtype(settings: ModelSettings, device: str) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return _DTYPES[settings.dtype]


def checkpoint_bytes(model_dir: Path) -> int:
    """Size of the weights on disk (from the index when there is one)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).is_file():
            size = read_json(model_dir / index).get("metadata", {}).get("total_size")
            if size:
                return int(size)
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) + sum(
        p.stat().st_size for p in model_dir.glob("*.bin")
    )


def _check_fits(model_dir: Path, device: str, dtype: torch.dtype, settings: ModelSettings) -> None:
    """Refuse plainly, before loading, a model that cannot fit this machine."""
    disk_bytes = checkpoint_bytes(model_dir)
    stored = read_json(model_dir / "config.json").get("dtype") or "float16"
    stored_size = 4 if "32" in str(stored) else 2
    needed = disk_bytes * torch.finfo(dtype).bits // 8 // stored_size
    gib = needed / 2**30
    if device == "cpu":
        available = gpu.available_ram_bytes()
        if available and needed > available * 0.9:
            raise ModelLoadError(
                f"this model needs about {gib:.1f} GiB of RAM in {str(dtype).removeprefix('torch.')} on the CPU, but "
                f"only {available / 2**30:.1f} GiB is available and no CUDA GPU was found. Run on a machine with an "
                "NVIDIA GPU (24 GB is enough for InternLM2-chat-7B in float16), or serve the model elsewhere and set "
                "INTERNLM_BACKEND=openai.",
                "out_of_memory",
            )
    elif settings.quantization == "none":
        total = gpu.total_gpu_bytes()
        if total and needed > total:
            log.warning(
                "model needs %.1f GiB but the GPUs hold %.1f GiB: accelerate will offload to CPU (slow); "
                "consider INTERNLM_QUANTIZATION=8bit or 4bit",
                gib,
                total / 2**30,
            )


def _quantization_config(settings: ModelSettings, dtype: torch.dtype):
    if settings.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            "INTERNLM_QUANTIZATION needs bitsandbytes: pip install bitsandbytes", "missing_package"
        ) from exc
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def context_window(config, settings: ModelSettings) -> int:
    """The context budget: the setting, capped by the model's positions unless RoPE scaling extends them."""
    limit = settings.max_length
    positions = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", "default") != "default"
    if positions and not scaled:
        limit = min(limit, positions)
    return limit


def _check_complete(model_dir: Path, loading: dict) -> None:
    """Refuse weights that are absent or of the wrong shape: transformers would start them at random, silently."""
    for kind, what in (("missing_keys", "lacks"), ("mismatched_keys", "has wrongly shaped")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in loading.get(kind) or ())
        if names:
            raise ModelLoadError(
                f"the checkpoint in {model_dir} {what} {len(names)} weights ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}): a weights file is missing, incomplete or from another model; "
                "download the model again (python -m internlm_app download)",
                "damaged_files",
            )


def load_model(
    settings: ModelSettings, progress: Progress | None = None
) -> tuple[torch.nn.Module, ChatTokenizer, ModelInfo]:
    """Resolve, convert if needed, and load the model and tokenizer described by `settings`."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    device = choose_device(settings)
    dtype = choose_dtype(settings, device)
    if device == "cpu" and settings.quantization != "none":
        raise ModelLoadError(
            "8-bit/4-bit quantization needs a CUDA GPU; unset INTERNLM_QUANTIZATION on CPU.", "needs_gpu"
        )
    model_dir = resolve_model_dir(settings, progress=progress)
    _check_fits(model_dir, device, dtype, settings)
    if progress:
        progress(LoadStep("load", detail=f"{device}, {str(dtype).removeprefix('torch.')}"))
    kwargs: dict = {"dtype": dtype, "attn_implementation": settings.attn_implementation}
    if device == "cuda":
        kwargs["device_map"] = settings.device_map
        kwargs["quantization_config"] = _quantization_config(settings, dtype)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    except torch.OutOfMemoryError as exc:
        gpu.clear_cache()
        raise ModelLoadError(
            f"out of GPU memory while loading ({exc}). Try INTERNLM_QUANTIZATION=8bit or 4bit, or free the GPU.",
            "out_of_memory",
        ) from exc
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(
            f"could not load the model from {model_dir}: {exc}. If a weights file is incomplete or corrupt, download "
            "the model again (python -m internlm_app download).",
            "damaged_files",
        ) from exc
    _check_complete(model_dir, loading)
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    info = ModelInfo(
        name=settings.model_id if settings.model_path is None else Path(settings.model_path).name,
        path=str(model_dir),
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        device_map=getattr(model, "hf_device_map", None),
        quantization=settings.quantization,
        attn_implementation=settings.attn_implementation,
        context_window=context_window(model.config, settings),
        parameters=sum(p.numel() for p in model.parameters()),
        load_seconds=time.perf_counter() - start,
    )
    log.info("loaded %s on %s (%s) in %.1fs", info.name, device, info.dtype, info.load_seconds)
    return model, tokenizer, info


def freeze_long_lived_objects() -> None:
    """Move what is alive once the model is loaded out of the cyclic garbage collector's sight.

    torch, transformers and the web or API stack leave some 300-400k tracked objects; a full collection scans them all
    while holding the GIL (0.2-0.3 s on this project's 2-core test VM), a stall in the middle of a streamed reply.
    Frozen, a collection scans only the objects made since. Frozen objects stay out of every collection until
    `gc.unfreeze()`: nothing unloads a model today; a feature that does must unfreeze first.
    """
    gc.collect()
    gc.freeze()
