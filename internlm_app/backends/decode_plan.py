"""How the local engine decodes on this machine, and why: static or dynamic KV cache, batching, KV memory.

Decided once after the weights are loaded, from the free GPU memory; logged, and shown by the Status page, `/health`
and `doctor`. KV cache size per token (the source of every memory figure here) is
`2 (keys and values) × layers × KV heads × head dim × bytes per element`: 128 KiB for InternLM2-7B in float16
(32 layers, 8 KV heads, head dim 128).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from internlm_app.chat_types import DecodeReason, DecodingState
from internlm_app.runtime import gpu
from internlm_app.runtime.loader import context_cap
from internlm_app.settings import ModelSettings

log = logging.getLogger(__name__)

GIB = 2**30
# Kept free for activations, logits and the allocator's fragmentation: prefill of a long prompt and the logits of a
# full batch (vocab 92544 × batch tokens × 4 bytes) need a few hundred MiB each on InternLM2-7B.
_HEADROOM_BYTES = int(1.5 * GIB)
# Page size of the batch's paged KV cache on CUDA (transformers' default); smaller on the CPU, where prompts are short
# test prompts and a page is the unit of prefix sharing.
_PAGE_SIZE = {"cuda": 256, "cpu": 32}

# Why a path was chosen, in the English of the log, `doctor` and /health; the web app's Status page says the same
# in its language (web/i18n.py: `why_<id>`, with the same values).
REASONS = {
    "cpu": "on the CPU a compiled static cache would only be slower",
    "static_setting_off": "INTERNLM_STATIC_CACHE=false",
    "static_setting_on": "INTERNLM_STATIC_CACHE=true",
    "static_quantized": "bitsandbytes quantization does not compile",
    "static_fits": "the {window}-token window's cache ({need}) fits in three quarters of the {usable} free beside the "
    "weights",
    "static_too_big": "a static cache for the {window}-token window needs {need}, more than three quarters of the "
    "{usable} free beside the weights",
    "static_too_big_shorter": "a static cache for the {window}-token window needs {need}, more than three quarters of "
    "the {usable} free beside the weights; INTERNLM_MAX_LENGTH={fits} would fit",
    "static_warmup_failed": "the compiled static cache failed its warm-up: {error}",
    "batch_setting_off": "off (INTERNLM_MAX_BATCH_SIZE=1)",
    "batch_eager": "off: the batch needs sdpa attention (with eager, transformers switches the model to paged|eager)",
    "batch_quantized": "off: not tried with bitsandbytes quantization",
    "batch_split": "off: the model is split over several devices",
    "batch_no_memory": "off: only {left} left for its KV cache",
    "batch_start_failed": "off: it failed to start ({error}); INTERNLM_MAX_BATCH_SIZE=1 skips it",
    "batch_on": "up to {slots} replies at once over a paged KV cache of {tokens} tokens ({size})",
}


def reason(id: str, **values: object) -> DecodeReason:
    """The reason `id` of REASONS with its values (KeyError for an unknown id)."""
    texts = {name: str(value) for name, value in values.items()}
    return DecodeReason(id, REASONS[id].format(**texts), texts)


@dataclass(frozen=True)
class DecodePlan:
    """The decode paths chosen at load, with the reasons in words."""

    single_path: Literal["static", "dynamic"]  # one reply alone: static KV cache + compiled step, or dynamic cache
    single_reason: DecodeReason
    batch_slots: int  # most replies decoded at once; 1 means no batching
    batch_reason: DecodeReason
    kv_bytes_per_token: int
    batch_cache_tokens: int  # paged KV cache of the batch, in tokens (0 without batching)
    page_size: int  # tokens per page of the paged cache (the unit of prefix sharing)
    kv_reuse_tokens: int  # KV kept across turns on the one-reply path, in tokens (the static cache keeps one chat)

    @property
    def batching(self) -> bool:
        return self.batch_slots > 1

    def state(self, kept_tokens: int) -> DecodingState:
        """The plan as the backend seam reports it, with the KV cache kept across turns now."""
        return DecodingState(**{f.name: getattr(self, f.name) for f in fields(self)}, kept_tokens=kept_tokens)

    def without_batching(self, reason: DecodeReason) -> DecodePlan:
        return replace(self, batch_slots=1, batch_cache_tokens=0, batch_reason=reason)

    def with_dynamic_cache(self, reason: DecodeReason) -> DecodePlan:
        return replace(self, single_path="dynamic", single_reason=reason)

    def summary(self) -> str:
        """One line per decision, for the log, `doctor` and the Status page."""
        return f"one reply: {self.single_path} KV cache ({self.single_reason}); batching: {self.batch_reason}"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of KV cache one token takes in every layer: 2 × layers × KV heads × head dim × element size."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def _free_gpu_bytes(model: torch.nn.Module) -> int:
    free, _total = torch.cuda.mem_get_info(model.device)
    return int(free)


def _single_device(model: torch.nn.Module) -> bool:
    devices = set((getattr(model, "hf_device_map", None) or {"": str(model.device)}).values())
    return len(devices) == 1


def choose_single_path(
    *, cuda: bool, setting: bool | str, quantized: bool, window: int, per_token: int, usable: int
) -> tuple[Literal["static", "dynamic"], DecodeReason]:
    """The one-reply path and why: the static cache + torch.compile (CUDA graphs) when asked for or when it fits.

    `usable` is the GPU memory in bytes left beside the weights (less the headroom); auto takes the static cache when
    the window's cache needs at most three quarters of it, leaving a quarter or more to the batch. On an RTX 3090
    with InternLM2-7B in float16 about 7.7 GiB is usable, and the 32768-token window's cache takes 4 GiB.
    """
    static_bytes = window * per_token
    if not cuda:
        return "dynamic", reason("cpu")
    if setting is False:
        return "dynamic", reason("static_setting_off")
    if setting is True:
        return "static", reason("static_setting_on")
    if quantized:
        return "dynamic", reason("static_quantized")
    share = usable * 3 // 4
    sizes = {"window": window, "need": f"{static_bytes / GIB:.2f} GiB", "usable": f"{usable / GIB:.2f} GiB"}
    if static_bytes <= share:
        return "static", reason("static_fits", **sizes)
    fits = (share // per_token) // 1024 * 1024
    if fits:
        return "dynamic", reason("static_too_big_shorter", **sizes, fits=fits)
    return "dynamic", reason("static_too_big", **sizes)


def estimate_for_checkpoint(
    config: dict, settings: ModelSettings, free_gpu_bytes: int | None, weights_bytes: int
) -> str:
    """What the engine would choose for a checkpoint not loaded yet (`doctor`), from its config.json and free memory.

    float16 on CUDA is assumed, as the loader's auto dtype gives; the figure is an estimate, the log at load is final.
    """
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    per_token = 2 * config.get("num_hidden_layers", 0) * kv_heads * head_dim * 2
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    cap = context_cap(config.get("max_position_embeddings"), rope if isinstance(rope, dict) else None)
    window = settings.max_length if cap is None else min(settings.max_length, cap)  # (as the loader's context_window)
    usable = 0 if free_gpu_bytes is None else max(0, free_gpu_bytes - weights_bytes - _HEADROOM_BYTES)
    path, why = choose_single_path(
        cuda=free_gpu_bytes is not None,
        setting=settings.static_cache,
        quantized=settings.quantization != "none",
        window=window,
        per_token=max(per_token, 1),
        usable=usable,
    )
    batch = "off" if settings.max_batch_size == 1 else f"up to {settings.max_batch_size} replies at once"
    return f"one reply: {path} KV cache ({why}); batching: {batch} (estimated before loading)"


def plan_decoding(model: torch.nn.Module, settings: ModelSettings, context_window: int) -> DecodePlan:
    """Choose the one-reply path and the batch size from the settings and the memory left beside the weights."""
    per_token = kv_bytes_per_token(model)
    cuda = model.device.type == "cuda"
    quantized = getattr(model, "hf_quantizer", None) is not None
    page_size = _PAGE_SIZE["cuda" if cuda else "cpu"]
    slots = settings.max_batch_size
    # On the CPU there is no allocator to ask: a quarter of the free RAM at most, so a CPU run never swaps for a cache.
    usable = max(0, _free_gpu_bytes(model) - _HEADROOM_BYTES) if cuda else (gpu.available_ram_bytes() or 8 * GIB) // 4
    single, single_reason = choose_single_path(
        cuda=cuda,
        setting=settings.static_cache,
        quantized=quantized,
        window=context_window,
        per_token=per_token,
        usable=usable,
    )
    reuse_tokens = settings.kv_reuse_tokens
    # The static cache is the worker's reply's KV and the chat it keeps; on the dynamic path the worker's reply may
    # grow to the window, and up to reuse_tokens of KV are kept beside it.
    kept_bytes = context_window * per_token + (reuse_tokens * per_token if single == "dynamic" else 0)
    left = usable - kept_bytes

    # Concurrent replies: a continuous batch over a paged KV cache, sized from what is left.
    cache_tokens = int(max(0, left) * settings.kv_cache_memory_share) // per_token
    # Never more than every slot's whole window: a big GPU would otherwise hand the batch most of its memory.
    cache_tokens = min(cache_tokens, slots * context_window) // page_size * page_size
    off: DecodeReason | None = None
    if slots == 1:
        off = reason("batch_setting_off")
    elif settings.attn_implementation == "eager":
        off = reason("batch_eager")
    elif quantized:
        off = reason("batch_quantized")
    elif not _single_device(model):
        off = reason("batch_split")
    elif cache_tokens < 2 * page_size:
        off = reason("batch_no_memory", left=_size(max(0, left)))
    if off is not None:
        slots, cache_tokens, batch_reason = 1, 0, off
    else:
        batch_reason = reason("batch_on", slots=slots, tokens=cache_tokens, size=_size(cache_tokens * per_token))
    plan = DecodePlan(single, single_reason, slots, batch_reason, per_token, cache_tokens, page_size, reuse_tokens)
    log.info("decode plan: %s", plan.summary())
    return plan
