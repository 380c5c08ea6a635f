"""Shared benchmark setup: repo path, engines on the tiny fixture or a random Llama, interleaved timing, output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

FIXTURE_DIR = ROOT / "tests" / "fixtures" / "internlm2-tiny"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares."""
    p = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: compute on one core, as a GPU would)")
    return p


def set_threads(threads: int) -> None:
    """Set torch's CPU threads and silence transformers' progress bars (they would clutter the figures)."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # e.g. the reminder that the tiny fixture's 512 positions are exceeded


def tiny_settings(workdir: Path, model_path: Path = FIXTURE_DIR, **overrides):
    """Settings that load `model_path` on the CPU and keep every file under `workdir`."""
    from internlm_app.settings import Settings

    values = {
        "model_path": model_path,
        "cache_dir": workdir / "cache",
        "db_path": workdir / "conversations.db",
        "device": "cpu",
        "queue_limit": 64,
        **overrides,
    }
    return Settings(**values)


def load_engine(workdir: Path, model_path: Path = FIXTURE_DIR, context_window: int | None = None, **overrides):
    """A ChatEngine loaded through the real path (resolve, convert if InternLM2, load), optionally a wider context."""
    from internlm_app.backends.engine import ChatEngine

    engine = ChatEngine.load(tiny_settings(workdir, model_path, **overrides))
    return with_context_window(engine, context_window) if context_window else engine


def with_context_window(engine, context_window: int):
    """A second engine over the same weights with another context window (as tests/test_engine.py's _engine_with)."""
    from internlm_app.backends.engine import ChatEngine

    info = dataclasses.replace(engine.info, context_window=context_window)
    return ChatEngine(engine.model, engine.tokenizer, info, engine.settings)


def build_random_llama(
    dst: Path,
    *,
    hidden: int = 1024,
    layers: int = 4,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Save a random-initialised LlamaForCausalLM with the fixture's tokenizer files, loadable by the engine.

    The rest of the shape follows from `hidden`: head dim 64, 4 query heads per KV head (as in InternLM2-7B), FFN
    2.75 x hidden.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = hidden // 64
    kv_heads, intermediate = max(heads // 4, 1), hidden * 11 // 4

    vocab = json.loads((FIXTURE_DIR / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        shutil.copy2(FIXTURE_DIR / name, dst / name)  # eos [2, <|im_end|>] as in the fixture
    return dst


def make_stop_tokens_unreachable(model, stop_ids: list[int]) -> str:
    """Zero the lm_head rows of the stop ids so greedy decoding never picks them; returns a note to print."""
    with torch.no_grad():
        model.get_output_embeddings().weight[list(stop_ids)] = 0.0
    return (
        f"note: lm_head rows of stop ids {list(stop_ids)} zeroed (their logit is 0, below the greedy maximum of "
        f"{model.config.vocab_size} random logits), so every reply runs to exactly max_new_tokens"
    )


def interleaved(runs: dict[str, Callable[[], float]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable in turn `reps` times after `warmup` rounds; their returned figures by name.

    The order alternates (A B, B A, A B ...), so neither side is always the one that runs right after the other.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    results: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        order = list(runs.items())
        for name, run in order if rep % 2 == 0 else reversed(order):
            results[name].append(run())
    return results


def run_together(one: Callable[[int], None], count: int) -> float:
    """Call `one(i)` for i in 0..count-1, each in its own thread, all released together; the wall time in seconds."""
    import threading

    barrier = threading.Barrier(count + 1)

    def run(i: int) -> None:
        barrier.wait()
        one(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-")


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"target {sign} {target}: {'met' if met else 'NOT met'}"


def headline(name: str, value: float | str) -> None:
    """The last line of every benchmark: `<name>=<value>`."""
    print(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}", flush=True)
