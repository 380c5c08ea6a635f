"""Convert an InternLM2 checkpoint to transformers' native Llama layout, one shard at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from internlm_app.errors import UserFacingError
from internlm_app.load_progress import LoadStep, Progress

log = logging.getLogger(__name__)

MARKER = "internlm_app_conversion.json"
PARTIAL_MARKER = "internlm_app_conversion.partial"  # in the folder a conversion is written to, until it is done
CONVERSION_VERSION = 2  # 2: the marker lists the source's files (size, mtime): a changed source is converted again;
# a version-1 conversion of the same folder is kept, its marker upgraded in place (`is_converted`)
POSITIVE_INTS = (
    *("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "max_position_embeddings",
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# InternLM2 name (after "model.layers.N.") -> Llama name
_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class ConversionError(UserFacingError):
    """The source directory is not an InternLM2 checkpoint this converter understands, or the result cannot be
    written."""

    reason = "damaged_files"


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; one that cannot be read or parsed is a ConversionError saying what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConversionError(
            f"{path} is not a readable JSON file ({exc}); the download is incomplete or damaged: download the model "
            "again (python -m internlm_app download) or point INTERNLM_MODEL_PATH at a good copy"
        ) from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds no JSON object; download the model again")
    return data


def is_internlm2_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and read_json(config).get("model_type") == "internlm2"


def is_converted(dst: Path, src: Path | None = None) -> bool:
    """True when `dst` holds a finished conversion (of `src` as it is now, when given: the same folder, and each of
    its files of the same size and modification time); a damaged marker means it is not."""
    marker = dst / MARKER
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or cut short: convert again
        return False
    if not isinstance(meta, dict) or meta.get("version") not in (1, CONVERSION_VERSION):
        return False
    if src is None:
        return True
    if meta.get("source") != str(src.resolve()):
        return False
    try:
        files = source_files(src, source_shards(src))
    except (ConversionError, OSError):  # the source's weights are gone (deleted to save disk?): the copy is all
        log.warning("the weights of %s cannot be read now; using its conversion in %s as it is", src, dst)
        return True
    if meta.get("version") == 1:  # made before the marker listed the source's files: taken as of the source now,
        if any(mtime > marker.stat().st_mtime_ns for _, mtime in files.values()):  # unless one changed since
            return False
        _upgrade_marker(marker, meta, files)
        return True
    return meta.get("source_files") == files


def _upgrade_marker(marker: Path, meta: dict, files: dict[str, list[int]]) -> None:
    """A version-1 marker gets the source's files (what a conversion made now would list), so that a later change of
    the source is noticed; not converting again a checkpoint of 15.5 GB for an upgrade of this app. Best effort: a
    marker that cannot be written stays as it was."""
    upgraded = {**meta, "version": CONVERSION_VERSION, "source_files": files}
    try:
        partial = marker.with_name(marker.name + ".tmp")
        partial.write_text(json.dumps(upgraded, indent=2))
        partial.replace(marker)
    except OSError as exc:
        log.warning("could not update %s (%s); it is used as it is", marker, exc)


def source_files(src: Path, shards: list[Path]) -> dict[str, list[int]]:
    """[size, mtime in ns] of each file a conversion of `src` is made from (config, tokenizer, index, weights): a
    file replaced or edited afterwards (a new download, a fixed config) shows here."""
    names = ["config.json", "generation_config.json", *TOKENIZER_FILES, *_INDEXES]
    files = [src / name for name in names if (src / name).is_file()] + shards
    return {str(path.relative_to(src)): [path.stat().st_size, path.stat().st_mtime_ns] for path in files}


def check_config(cfg: dict, path: Path) -> None:
    """Refuse an InternLM2 config.json that no model can be built from (ConversionError naming the value): a missing
    or non-positive size, heads that do not divide the hidden size, RoPE scaling transformers does not know or
    that lacks its parameters. Checked before anything is converted."""

    def refuse(what: str) -> NoReturn:
        raise ConversionError(
            f"{path}: {what}. The file is damaged or was edited: download the model again "
            "(python -m internlm_app download) or fix that value"
        )

    for key in POSITIVE_INTS:
        value = cfg.get(key)
        if key not in cfg:
            refuse(f"{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            refuse(f"{key} is {value!r}, not a positive whole number")
    for key in ("rms_norm_eps", "rope_theta"):
        value = cfg.get(key, 1.0 if key == "rope_theta" else None)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            refuse(f"{key} is {value!r}, not a positive number")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        refuse(f"num_key_value_heads is {kv_heads!r}, not a positive whole number that divides {heads} heads")
    if cfg["hidden_size"] % heads:
        refuse(f"hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads {heads}")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        refuse(f'rope_scaling is {scaling!r}, not an object such as {{"type": "dynamic", "factor": 2.0}}')
    if scaling:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ROPE_INIT_FUNCTIONS:
            refuse(f"rope_scaling's type is {kind!r}; transformers knows {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        factor = scaling.get("factor")
        if "factor" in scaling and (isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1):
            refuse(f"rope_scaling's factor is {factor!r}, not a number of at least 1")
    for key in ("rms_norm_eps", "rope_theta", "initializer_range"):
        if key in cfg and isinstance(cfg[key], float) and not math.isfinite(cfg[key]):
            refuse(f"{key} is {cfg[key]!r}, not a finite number")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = cfg.get(key, 0)
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg["vocab_size"] for i in ids):
            refuse(f"{key} is {value!r}, not a token id below vocab_size {cfg['vocab_size']}")
    expected_shapes(cfg, path)  # transformers' own checks: the Llama config, and a model of it (on no device)


def expected_shapes(cfg: dict, path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every weight a Llama model of InternLM2 config `cfg` has, from transformers' own model
    built on the meta device (no memory): what a conversion must write, no more. ConversionError naming `path` when
    transformers refuses the config (a RoPE scaling without its parameters, a value of the wrong kind ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        config = LlamaConfig(**llama_config(cfg))
        config.validate_rope()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    except Exception as exc:  # transformers' errors for a config it cannot build: KeyError, ValueError, strict ...
        raise ConversionError(
            f"{path}: transformers cannot build a model from it ({type(exc).__name__}: "
            f"{str(exc).strip(chr(34)).splitlines()[0] if str(exc) else ''}). The file is damaged or was edited: "
            "download the model again (python -m internlm_app download) or fix that value"
        ) from exc
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_tokenizer(src: Path) -> None:
    """Refuse an InternLM2 checkpoint without a readable tokenizer.model (its sentencepiece vocabulary), or whose
    tokenizer_config.json (its special tokens) or generation_config.json is missing or damaged."""
    import sentencepiece

    if not (src / "tokenizer_config.json").is_file():
        raise ConversionError(
            f"{src} has no tokenizer_config.json (InternLM2's special tokens): the download is incomplete; download "
            "the model again (python -m internlm_app download)"
        )
    decoder = read_json(src / "tokenizer_config.json").get("added_tokens_decoder", {})
    if not isinstance(decoder, dict) or not all(isinstance(token, dict) for token in decoder.values()):
        raise ConversionError(
            f"{src / 'tokenizer_config.json'}: added_tokens_decoder is not an object of tokens; the file is damaged "
            "or was edited: download the model again"
        )
    if (src / "generation_config.json").is_file():
        read_json(src / "generation_config.json")  # (read before the shards, not after minutes of them)

    model = src / "tokenizer.model"
    if not model.is_file():
        raise ConversionError(
            f"{src} has no tokenizer.model (InternLM2's vocabulary): the download is incomplete; download the model "
            "again (python -m internlm_app download)"
        )
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(model))
    except (RuntimeError, OSError) as exc:
        raise ConversionError(
            f"{model} cannot be read as a sentencepiece model ({str(exc).splitlines()[0] if str(exc) else exc}): it "
            "is incomplete or damaged; download the model again (python -m internlm_app download)"
        ) from exc


def check_source(src: Path) -> tuple[dict, list[Path]]:
    """The config and weight files of InternLM2 checkpoint `src`, checked before a conversion (and by `doctor`):
    ConversionError saying what to fix for a config value (`check_config`), the tokenizer (`check_tokenizer`), a
    weight index naming files that are not there."""
    if not is_internlm2_checkpoint(src):
        raise ConversionError(f"{src} has no InternLM2 config.json (model_type 'internlm2')", reason="not_a_model")
    cfg = read_json(src / "config.json")
    check_config(cfg, src / "config.json")
    check_tokenizer(src)
    return cfg, source_shards(src)


def llama_config(internlm: dict) -> dict:
    """The LlamaConfig dict equivalent to an InternLM2 config dict."""
    heads = internlm["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(internlm.get("rope_theta", 10000))}
    scaling = internlm.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        rope = {**rope, **{k: v for k, v in scaling.items() if k != "type"}, "rope_type": kind}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": internlm["vocab_size"],
        "hidden_size": internlm["hidden_size"],
        "intermediate_size": internlm["intermediate_size"],
        "num_hidden_layers": internlm["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": internlm.get("num_key_value_heads", heads),
        "head_dim": internlm["hidden_size"] // heads,
        "hidden_act": internlm.get("hidden_act", "silu"),
        "max_position_embeddings": internlm["max_position_embeddings"],
        "initializer_range": internlm.get("initializer_range", 0.02),
        "rms_norm_eps": internlm["rms_norm_eps"],
        "rope_parameters": rope,
        "attention_bias": bool(internlm.get("bias", False)),
        "mlp_bias": False,
        "tie_word_embeddings": bool(internlm.get("tie_word_embeddings", False)),
        "bos_token_id": internlm.get("bos_token_id", 1),
        "eos_token_id": internlm.get("eos_token_id", 2),
        "pad_token_id": internlm.get("pad_token_id", 2),
        "dtype": internlm.get("torch_dtype", "float16"),
        "use_cache": True,
    }


def split_wqkv(
    wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, name: str = "wqkv"
) -> tuple[torch.Tensor, ...]:
    """Split InternLM2's fused wqkv, laid out per kv head as [q * (heads/kv_heads), k, v] rows of head_dim."""
    rows = (heads + 2 * kv_heads) * head_dim
    if wqkv.shape[0] != rows or heads % kv_heads:
        raise ConversionError(
            f"{name} has shape {tuple(wqkv.shape)}, but config.json ({heads} heads, {kv_heads} key/value heads "
            f"of {head_dim}) needs {rows} rows: the weights do not belong to this config.json"
        )
    groups = heads // kv_heads
    grouped = wqkv.reshape(kv_heads, groups + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :groups].reshape(heads * head_dim, *wqkv.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_tensor(name: str, tensor: torch.Tensor, cfg: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the Llama (name, tensor) pairs for one InternLM2 tensor."""
    if name in _TOP_RENAMES:
        yield _TOP_RENAMES[name], tensor
        return
    match = _LAYER_RE.match(name)
    if not match:
        if "rotary_emb" in name:  # buffers recomputed by transformers
            return
        raise ConversionError(f"unexpected tensor {name!r}")
    prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest.startswith("attention.wqkv."):
        suffix = rest.rsplit(".", 1)[1]
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        q, k, v = split_wqkv(tensor, heads, kv, cfg["hidden_size"] // heads, name)
        for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            yield f"{prefix}self_attn.{proj}.{suffix}", part
    elif rest in _LAYER_RENAMES:
        yield prefix + _LAYER_RENAMES[rest], tensor
    elif "rotary_emb" in rest:
        return
    else:
        raise ConversionError(f"unexpected tensor {name!r}")


def source_shards(src: Path) -> list[Path]:
    """The weight files of `src` (by its index when it has one); ConversionError when the index names files that are
    not there or there are none."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map; download the model again")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ConversionError(
                    f"{index} names weight files that are not in {src}: {', '.join(missing[:3])}"
                    f"{' ...' if len(missing) > 3 else ''}; download the model again (python -m internlm_app download)"
                )
            return [src / f for f in files]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(src.glob(pattern))
        if found:
            return found
    raise ConversionError(f"no safetensors or .bin weights in {src}")


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors of one shard; safetensors are read lazily, .bin files are memory-mapped."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:  # a legacy (non-zip) torch.save file cannot be memory-mapped: read it whole
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        yield from state.items()
        del state


def check_headers(shards: list[Path]) -> None:
    """ConversionError for a safetensors weight file whose header cannot be read (cut short, not safetensors)."""
    for shard in shards:
        if shard.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ConversionError(
                f"the weights file {shard} is incomplete or corrupt ({exc}); download it again"
            ) from exc


def check_conversion(dst: Path) -> None:
    """Refuse a finished conversion whose files were damaged since (a shard deleted or cut short): ConversionError
    saying to delete it, so that the next start converts it again. Reads the shards' headers only."""
    try:
        check_headers(source_shards(dst))
    except ConversionError as exc:
        raise ConversionError(
            f"the converted copy in {dst} is damaged ({str(exc).split(';')[0]}): delete that folder and start again "
            "to convert it anew from the download"
        ) from exc


def convert_checkpoint(src: Path, dst: Path, progress: Progress | None = None) -> Path:
    """Write a Llama checkpoint for InternLM2 checkpoint `src` into `dst` and return `dst`."""
    # The real place: "." or "~/x" has a name to put ".partial" beside, and a symlinked output is replaced where it
    # points (its target is checked like any folder).
    src, dst = Path(src).expanduser(), Path(dst).expanduser().resolve()
    cfg, shards = check_source(src)
    if not dst.name:
        raise ConversionError(f"{dst} is no place for a conversion: name a directory for it", reason="not_writable")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(
            f"{dst} exists and is not a directory: remove it or choose another output directory", reason="not_writable"
        )
    # One conversion into `dst` at a time, across processes (serve's web app and API, two `convert` runs): a second
    # waits, then reuses the first's result; never two writing one `.partial`.
    with _conversion_lock(dst):
        if is_converted(dst, src):
            return dst
        return _convert_locked(src, dst, cfg, shards, progress)


@contextlib.contextmanager
def _conversion_lock(dst: Path) -> Iterator[None]:
    """An exclusive lock on the folder that holds `dst` (flock on the directory itself: no lock file is left behind,
    and it is released when the process ends, however it ends). Conversions into one folder take turns."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(dst.parent, os.O_RDONLY)
    except OSError as exc:
        raise ConversionError(
            f"cannot write the converted checkpoint under {dst.parent}: {exc.strerror or exc}. Point "
            "INTERNLM_CONVERTED_DIR (or INTERNLM_CACHE_DIR) at a writable directory.",
            reason="not_writable",
        ) from exc
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process converts into this folder: say so, then wait for it
            log.info("waiting for another conversion into %s to finish (another process is converting)", dst.parent)
            fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def _convert_locked(src: Path, dst: Path, cfg: dict, shards: list[Path], progress: Progress | None) -> Path:
    tmp = dst.with_name(dst.name + ".partial")
    _refuse_foreign_folder(dst, (MARKER,))
    _refuse_foreign_folder(tmp, (PARTIAL_MARKER, MARKER))  # (MARKER: killed between its last write and the rename)
    try:
        return _convert_into(src, dst, tmp, cfg, shards, progress)
    except ConversionError:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left to look like a conversion
        raise
    except OSError as exc:  # a full disk, a read-only directory, a file where a directory should be ...
        shutil.rmtree(tmp, ignore_errors=True)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = (
            "It needs about the checkpoint's size in free space there"
            if full
            else f"Check {exc.filename or dst} and what is in the way"
        )
        raise ConversionError(
            f"could not write the conversion to {dst}: {exc.strerror or exc}. {hint} (INTERNLM_CONVERTED_DIR or "
            "INTERNLM_CACHE_DIR choose where).",
            reason="not_writable",
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_shard_checked(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The shard's tensors; a file that cannot be read as weights is a ConversionError that says what to do."""
    try:
        yield from _read_shard(shard)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        raise ConversionError(
            f"the weights file {shard} is incomplete or corrupt ({exc}); download the model again "
            "(python -m internlm_app download) or point INTERNLM_MODEL_PATH at a good copy"
        ) from exc


def _refuse_foreign_folder(folder: Path, marks: tuple[str, ...]) -> None:
    """The conversion replaces `folder`: only when it is absent, empty, or ours (it holds one of `marks`). Anything
    else (a data disk's root, the download, a user's files, a non-empty file of that name) is never deleted: a
    ConversionError says to choose another."""
    try:
        if not folder.exists() and not folder.is_symlink():
            return
        if folder.is_file() and not folder.is_symlink() and folder.stat().st_size == 0:
            return  # an empty file: nothing to lose
        ours = folder.is_dir() and not folder.is_symlink() and any((folder / mark).is_file() for mark in marks)
        if ours or (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
            return
    except OSError:
        return  # unreadable: writing there fails with its own clear error, and nothing is deleted unread
    raise ConversionError(
        f"{folder} already exists and is not a conversion by this app ({' or '.join(marks)} is missing): the "
        "conversion would replace it, so it stops here. Choose a new or empty directory (convert's output, or "
        "INTERNLM_CONVERTED_DIR), or move it away",
        reason="not_writable",
    )


def _convert_into(src: Path, dst: Path, tmp: Path, cfg: dict, shards: list[Path], progress: Progress | None) -> Path:
    before = source_files(src, shards)  # the source as it is read: one edited meanwhile is not recorded as this one
    cfg = read_json(src / "config.json")  # (read again under the lock: another process may have waited on it)
    check_config(cfg, src / "config.json")
    shapes = expected_shapes(cfg, src / "config.json")
    if tmp.is_file() or tmp.is_symlink():
        tmp.unlink()  # an empty file (_refuse_foreign_folder): the directory is made afresh
    shutil.rmtree(tmp, ignore_errors=True)  # (ours or empty: _refuse_foreign_folder)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).touch()  # an interrupted conversion leaves a folder the next one knows as its own
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(shards, start=1):
        if progress:
            progress(LoadStep("convert", i - 1, len(shards), detail=shard.name))
        out: dict[str, torch.Tensor] = {}
        for name, tensor in _read_shard_checked(shard):
            if not tensor.is_floating_point():
                raise ConversionError(
                    f"{shard} holds {name} as {str(tensor.dtype).removeprefix('torch.')}, not as floating-point "
                    "weights: a quantized checkpoint (AWQ, GPTQ, ...) cannot be converted. Use the original "
                    "float16/bfloat16 model; INTERNLM_QUANTIZATION=8bit or 4bit quantizes it when it loads",
                    reason="quantized_checkpoint",
                )
            for new_name, new_tensor in convert_tensor(name, tensor, cfg):
                _check_shape(new_name, tuple(new_tensor.shape), shapes, src, shard)
                out[new_name] = new_tensor
        out_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(out, tmp / out_name)
        for name, tensor in out.items():
            weight_map[name] = out_name
            total_size += tensor.numel() * tensor.element_size()
        del out  # (freed at once: tensors are reference-counted)
        log.info("converted shard %d/%d (%s)", i, len(shards), shard.name)
    tied = {"lm_head.weight"} if cfg.get("tie_word_embeddings", False) else set()  # (the embeddings serve)
    missing = sorted(shapes.keys() - weight_map.keys() - tied)
    if missing:  # a shard was missing or cut short: transformers would fill the gaps with random weights
        raise ConversionError(
            f"{src} lacks {len(missing)} weights that its config.json needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): a weights file is missing or incomplete; download the model "
            "again (python -m internlm_app download)"
        )
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(cfg), indent=2))
    _write_generation_config(src, tmp, cfg)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if source_files(src, shards) != before:
        raise ConversionError(
            f"{src} changed while it was being converted (a file was replaced or edited): start again to convert it "
            "as it is now"
        )
    meta = {
        "version": CONVERSION_VERSION,
        "source": str(src.resolve()),
        "source_model_type": "internlm2",
        "source_files": before,
    }
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))  # (before the partial marker goes: always one of the two)
    (tmp / PARTIAL_MARKER).unlink()
    mode = (tmp / MARKER).stat().st_mode & 0o777  # the shards as readable as the other files (the umask's mode)
    for shard in tmp.glob("*.safetensors"):
        shard.chmod(mode)
    _refuse_foreign_folder(dst, (MARKER,))  # again: something may have been put there while the shards converted
    shutil.rmtree(dst, ignore_errors=True)  # (ours or empty: _refuse_foreign_folder)
    tmp.rename(dst)  # the marker appears atomically with the finished directory
    if progress:
        progress(LoadStep("convert", len(shards), len(shards)))
    return dst


def _check_shape(name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]], src: Path, shard: Path) -> None:
    """A converted weight the config describes, of the shape it gives; else ConversionError naming config.json."""
    if name not in shapes:
        raise ConversionError(
            f"{shard} holds {name}, which {src / 'config.json'} does not describe (num_hidden_layers, "
            "tie_word_embeddings ...): the config and the weights are of different models; download the model again"
        )
    if shapes[name] != shape:
        raise ConversionError(
            f"{shard}: {name} has shape {shape}, but {src / 'config.json'} gives {shapes[name]} (hidden_size, "
            "intermediate_size, vocab_size ...): the config and the weights are of different models; download the "
            "model again"
        )


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, its I/O failures as the OSError they are (safetensors reports a full disk as a SafetensorError)."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise ConversionError(f"could not write {path}: {exc}", reason="not_writable") from exc
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def _write_generation_config(src: Path, dst: Path, cfg: dict) -> None:
    """Keep the source generation config, making sure <|im_end|> ends a reply as it does in `model.chat`."""
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id", 2))
    eos = list(eos) if isinstance(eos, list) else [eos]
    im_end = _im_end_id(src)
    if im_end is not None and im_end not in eos:
        eos.append(im_end)
    gen.update(
        {"eos_token_id": eos, "bos_token_id": cfg.get("bos_token_id", 1), "pad_token_id": cfg.get("pad_token_id", 2)}
    )
    gen.pop("transformers_version", None)
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _im_end_id(src: Path) -> int | None:
    tok_cfg = src / "tokenizer_config.json"
    if not tok_cfg.is_file():
        return None
    decoder = read_json(tok_cfg).get("added_tokens_decoder", {})
    return next((int(i) for i, tok in decoder.items() if tok.get("content") == "<|im_end|>"), None)
