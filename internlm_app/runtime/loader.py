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
from internlm_app.runtime.convert import MARKER, ConversionError, read_json, source_shards
from internlm_app.runtime.model_source import resolve_model_dir
from internlm_app.runtime.tokenizer import ChatTokenizer, load_tokenizer
from internlm_app.settings import ModelSettings

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them: a tokenizer


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


def context_cap(positions: int | None, rope: dict | None) -> int | None:
    """The most tokens a model's positions take: `max_position_embeddings`, times the RoPE scaling's factor for a
    fixed scaling (linear, yarn, llama3, ...); none for dynamic NTK, which extends as the text grows, or when unknown.
    `rope`: the config's rope_parameters (or InternLM2's rope_scaling)."""
    kind = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
    if not positions or kind == "dynamic":
        return None
    if kind == "default":
        return positions
    factor = (rope or {}).get("factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1:
        return None
    return int(positions * factor)


def context_window(config, settings: ModelSettings) -> int:
    """The context budget: the setting, capped by what the model's positions take (`context_cap`; a yarn ×4 model of
    512 positions takes 2,048 tokens, whatever the setting says). A cap is logged."""
    rope = getattr(config, "rope_parameters", None)
    cap = context_cap(getattr(config, "max_position_embeddings", None), rope if isinstance(rope, dict) else None)
    if cap is not None and settings.max_length > cap:
        log.info(
            "context budget %d tokens: the model's positions take no more (INTERNLM_MAX_LENGTH asks for %d)",
            cap,
            settings.max_length,
        )
        return cap
    return settings.max_length


def _refuse_remote_code(model_dir: Path) -> None:
    """A folder whose model_type transformers has no class for (it brings its own Python, `auto_map`) is refused here,
    before transformers would ask to run that code: this app never runs a model folder's code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = read_json(model_dir / "config.json")
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    own_code = (
        " (the folder brings its own Python code, auto_map, which this app never runs)" if "auto_map" in config else ""
    )
    raise ModelLoadError(
        f"{model_dir / 'config.json'} names the model type {model_type!r}, which transformers has no built-in class "
        f"for{own_code}. Use a model transformers supports (Llama, Qwen2, ...) or an InternLM2 checkpoint, which is "
        "converted to Llama once.",
        "not_a_model",
    )


def _repair_hint(model_dir: Path, settings: ModelSettings) -> str:
    """What to do when the files in `model_dir` cannot be loaded: the app's own conversion of the model the settings
    name is made again once deleted (its source passed the checks); anything else is downloaded again."""
    given = settings.model_path is not None and Path(settings.model_path).expanduser().resolve() == model_dir.resolve()
    if (model_dir / MARKER).is_file() and not given and _source_is_there(model_dir):
        return f"The converted copy in {model_dir} is damaged: delete that folder and start again to convert it anew"
    return "If a file is incomplete or corrupt, download the model again (python -m internlm_app download)"


def _source_is_there(converted: Path) -> bool:
    """Whether the checkpoint a conversion was made from still has its weights (to convert it again from)."""
    try:
        source = read_json(converted / MARKER).get("source")
        return isinstance(source, str) and bool(source_shards(Path(source)))
    except (ConversionError, OSError):
        return False


def check_tokenizer_files(model_dir: Path) -> None:
    """ModelLoadError for a native model folder without a tokenizer (the download is incomplete)."""
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{model_dir} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): the download is incomplete; download "
            "the model again or point INTERNLM_MODEL_PATH at a complete copy",
            "damaged_files",
        )


def _check_complete(model_dir: Path, loading: dict, settings: ModelSettings) -> None:
    """Refuse weights that are absent or of the wrong shape (transformers would start them at random, silently), and
    weights the config does not describe (a config with fewer layers than the weights: they would be dropped)."""
    for kind, what in (
        ("missing_keys", "lacks"),
        ("mismatched_keys", "has wrongly shaped"),
        ("unexpected_keys", "has, beyond what its config.json describes,"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in loading.get(kind) or ())
        if names:
            raise ModelLoadError(
                f"the checkpoint in {model_dir} {what} {len(names)} weights ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}): a weights file is missing, incomplete or from another model, "
                f"or config.json does not match the weights. {_repair_hint(model_dir, settings)}.",
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
    # Before the download and the conversion (minutes, 31 GB): a missing bitsandbytes is said at once.
    quantization = _quantization_config(settings, dtype) if device == "cuda" else None
    model_dir = resolve_model_dir(settings, progress=progress)
    _refuse_remote_code(model_dir)
    check_tokenizer_files(model_dir)
    _check_fits(model_dir, device, dtype, settings)
    if progress:
        progress(LoadStep("load", detail=f"{device}, {str(dtype).removeprefix('torch.')}"))
    kwargs: dict = {"dtype": dtype, "attn_implementation": settings.attn_implementation, "trust_remote_code": False}
    if device == "cuda":
        kwargs["device_map"] = settings.device_map
        kwargs["quantization_config"] = quantization
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    except torch.OutOfMemoryError as exc:
        gpu.clear_cache()
        raise ModelLoadError(
            f"out of GPU memory while loading ({exc}). Try INTERNLM_QUANTIZATION=8bit or 4bit, or free the GPU.",
            "out_of_memory",
        ) from exc
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(
            f"could not load the model from {model_dir}: {exc}. {_repair_hint(model_dir, settings)}.", "damaged_files"
        ) from exc
    except RuntimeError as exc:  # weights of other shapes than config.json says ("size mismatch for ...")
        if "mismatch" not in str(exc):
            raise
        raise ModelLoadError(
            f"the weights in {model_dir} do not have the shapes its config.json gives ({str(exc).splitlines()[0]}): "
            f"the config or a weights file belongs to another model. {_repair_hint(model_dir, settings)}.",
            "damaged_files",
        ) from exc
    _check_complete(model_dir, loading, settings)
    model.eval()
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError, RuntimeError) as exc:  # a damaged tokenizer.model, tokenizer.json ...
        raise ModelLoadError(
            f"could not read the tokenizer in {model_dir} ({str(exc).splitlines()[0] if str(exc) else exc}). "
            f"{_repair_hint(model_dir, settings)}.",
            "damaged_files",
        ) from exc
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
