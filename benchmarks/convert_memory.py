"""Peak RAM of converting an InternLM2 checkpoint to Llama, relative to its largest shard.

A synthetic multi-shard InternLM2 checkpoint is written first: the fixture's config scaled up (hidden 2048, 16 heads
/ 4 KV heads, FFN 8192, one layer per shard; embeddings in the first shard, output and final norm in the last),
random fp16 weights under the real InternLM2 names, safetensors shards plus model.safetensors.index.json, and the
fixture's tokenizer files. `internlm_app.runtime.convert.convert_checkpoint` then runs in a fresh subprocess: after its
imports it records its RSS (the baseline) and resets the kernel's peak-RSS mark (/proc/self/clear_refs; where that
is unavailable the lifetime peak ru_maxrss is used and says so), converts, and reads the peak (VmHWM). A sampler
thread also records the largest anonymous and file-backed RSS seen (every 5 ms), since mmap-ed safetensors pages
count in RSS but are page cache the kernel can drop. Headline: (peak RSS - baseline) / largest shard. A converter that
works one shard at a time stays at a small constant here however many shards there are; one that loads the whole
checkpoint grows with the shard count. The same is measured for the tiny fixture (one ~0.9 MB file), where fixed
costs dominate. No target is set in the issue; the figure shows memory is bounded by a shard, not the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from common import FIXTURE_DIR, ROOT, TOKENIZER_FILES, headline, parser, set_threads, workdir
from safetensors.torch import save_file

MB = 1e6


def write_checkpoint(dst: Path, hidden: int, heads: int, kv_heads: int, intermediate: int, shards: int) -> list[int]:
    """A random fp16 InternLM2 checkpoint with one layer per shard; returns the shard sizes in bytes."""
    cfg = json.loads((FIXTURE_DIR / "config.json").read_text())
    cfg.update(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        num_hidden_layers=shards,
        torch_dtype="float16",
    )
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        shutil.copy2(FIXTURE_DIR / name, dst / name)
    head_dim, vocab = hidden // heads, cfg["vocab_size"]
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(torch.float16)

    weight_map, sizes = {}, []
    for layer in range(shards):
        p = f"model.layers.{layer}."
        tensors = {
            p + "attention.wqkv.weight": randn((heads + 2 * kv_heads) * head_dim, hidden),
            p + "attention.wo.weight": randn(hidden, hidden),
            p + "feed_forward.w1.weight": randn(intermediate, hidden),
            p + "feed_forward.w3.weight": randn(intermediate, hidden),
            p + "feed_forward.w2.weight": randn(hidden, intermediate),
            p + "attention_norm.weight": randn(hidden),
            p + "ffn_norm.weight": randn(hidden),
        }
        if layer == 0:
            tensors["model.tok_embeddings.weight"] = randn(vocab, hidden)
        if layer == shards - 1:
            tensors["model.norm.weight"] = randn(hidden)
            tensors["output.weight"] = randn(vocab, hidden)
        name = f"pytorch_model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        sizes.append((dst / name).stat().st_size)
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(src: Path, dst: Path) -> None:
    """Run in the fresh subprocess: convert and print the memory figures as JSON."""
    import gc

    import sentencepiece  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from internlm_app.runtime.convert import convert_checkpoint

    # The conversion checks the config by building transformers' model of it on the meta device, and reads the
    # tokenizer with sentencepiece: their modules are imported before the baseline, as `serve` and `chat` have them
    # already (a fixed cost of the process, not of the conversion).
    gc.collect()
    baseline = _status("VmRSS")
    at_start = {f"{key}_baseline": _status(key) for key in ("RssAnon", "RssFile")}
    reset = _reset_peak()
    most = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key in most:
                most[key] = max(most[key], _status(key))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    convert_checkpoint(src, dst)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "peak_reset": reset, "seconds": seconds, **most, **at_start}))


def measure(src: Path, dst: Path) -> dict:
    """Convert `src` in a fresh interpreter; its memory figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(dst)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"conversion subprocess failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(label: str, figures: dict, largest: int, total: int) -> float:
    over = figures["peak"] - figures["baseline"]
    ratio = over / largest
    how = "VmHWM after a reset" if figures["peak_reset"] else "ru_maxrss (lifetime peak, includes imports)"
    print(f"  {label}: largest shard {largest / MB:.1f} MB, checkpoint {total / MB:.1f} MB")
    print(
        f"    RSS after imports {figures['baseline'] / MB:.1f} MB, peak {figures['peak'] / MB:.1f} MB ({how}), "
        f"{figures['seconds']:.2f} s"
    )
    print(f"    peak over baseline {over / MB:.1f} MB = {ratio:.2f} x largest shard = {over / total:.2f} x checkpoint")
    anon, file = (figures[k] - figures[f"{k}_baseline"] for k in ("RssAnon", "RssFile"))
    print(
        f"    largest growth seen by the 5 ms sampler: anonymous +{anon / MB:.1f} MB, "
        f"file-backed (mmap-ed shards: page cache) +{file / MB:.1f} MB"
    )
    return ratio


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the synthetic checkpoint")
    args_parser.add_argument("--heads", type=int, default=16, help="attention heads")
    args_parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    args_parser.add_argument("--intermediate", type=int, default=8192, help="FFN size")
    args_parser.add_argument("--shards", type=int, default=4, help="shards (one layer each)")
    args_parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = args_parser.parse_args()
    set_threads(args.threads)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    print("convert_memory: peak RSS of convert_checkpoint in a fresh subprocess, over its RSS after imports")
    with workdir("convert") as tmp:
        tmp = Path(tmp)
        sizes = write_checkpoint(tmp / "src", args.hidden, args.heads, args.kv_heads, args.intermediate, args.shards)
        label = (
            f"synthetic InternLM2, {args.shards} fp16 shards (hidden {args.hidden}, {args.heads}/{args.kv_heads} "
            f"heads, FFN {args.intermediate})"
        )
        ratio = report(label, measure(tmp / "src", tmp / "dst"), max(sizes), sum(sizes))
        tiny = sum(p.stat().st_size for p in FIXTURE_DIR.glob("*.safetensors"))
        report("tiny fixture (float32, one file)", measure(FIXTURE_DIR, tmp / "tiny"), tiny, tiny)
    headline("convert_memory", ratio)


if __name__ == "__main__":
    main()
