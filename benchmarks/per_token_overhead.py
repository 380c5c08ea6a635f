"""Per-token engine overhead near token 1000 ÷ near token 100: is the engine's own work per token O(1)?

What is measured is only the engine's code on each token's path, with the model taken out: a stub stands behind the
engine's seam (`ChatEngine(model, ...)`; the stub implements `generate` as transformers calls the streamer and the
stopping criteria) and emits ordinary text tokens. For every token the stub notes the time, hands the token to the
engine's streamer (`put` -> queue), and the benchmark's consumer notes when `engine.stream_reply` yields its text (queue
handoff to the consuming thread + stream decoder push + yield). The stub then runs the engine's stopping criterion
(timed on its own and added: it runs after `put`, as in generate) and waits until the consumer has the token before
sending the next one. This lockstep is what a real model gives, which is far slower than the consumer: each token
arrives at an empty queue and wakes a waiting thread, so the handoff latency is included, not hidden in a backlog (the
engine's `stream_interval_ms` is 0 here, so no tokens are coalesced either). The headline is the engine's CPU time per
token (thread CPU clocks: put + criterion on the generation thread, queue get + decoder push + yield on the consumer's;
blocking costs none), median over tokens 75..124 vs 975..1024 pooled over the replies (target <= 1.2). Wall-clock
overhead including the thread wake-up is printed too, but a VM's wake-up latency wanders too much for a ratio.

Not included, on purpose: the model's forward pass and transformers' own generate loop (logits processors, KV cache
growth, attention over a longer context), which grow with position whatever the engine does. A control run swaps in
a stream decoder that re-decodes the whole reply at every token (the O(n^2) mistake the target guards against) to
show that this benchmark does catch growing per-token work. Absolute microseconds are of this CPU and only indicative.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch
from common import FIXTURE_DIR, headline, parser, set_threads, tiny_settings, verdict, workdir
from transformers import GenerationConfig, LlamaConfig

from internlm_app.backends.decode_plan import DecodePlan
from internlm_app.backends.engine import ChatEngine
from internlm_app.chat_types import ModelInfo
from internlm_app.runtime.tokenizer import load_tokenizer
from internlm_app.sampling import SamplingParams

TARGET = 1.2
TEXT = "The quick brown fox jumps over the lazy dog while the city of Shanghai sleeps under a quiet management sky "


class LockstepModel(torch.nn.Module):
    """A model stub behind the engine's seam: emits a token cycle, each one only after the consumer got the last."""

    def __init__(self, token_cycle: list[int], vocab_size: int):
        super().__init__()
        self.device = torch.device("cpu")
        self.config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, vocab_size=vocab_size)
        self.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=2)
        self.token_cycle, self.vocab_size = token_cycle, vocab_size
        self.received = threading.Event()
        self.sent: list[float] = []
        self.criterion_seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # CPU time of put + criterion on the generation thread

    def generate(self, input_ids, attention_mask, generation_config, streamer, stopping_criteria, cache=None):
        """Like transformers' greedy loop, minus the model: put the prompt, then one token per step."""
        prompt = input_ids.shape[1]
        ids = torch.zeros((1, prompt + generation_config.max_new_tokens), dtype=torch.long)
        ids[:, :prompt] = input_ids
        scores = torch.zeros((1, self.vocab_size))
        streamer.put(input_ids)
        for step in range(generation_config.max_new_tokens):
            token = self.token_cycle[step % len(self.token_cycle)]
            ids[0, prompt + step] = token
            next_tokens = torch.tensor([token])
            self.received.clear()
            cpu = time.thread_time()
            self.sent.append(time.perf_counter())
            streamer.put(next_tokens)
            started = time.perf_counter()
            done = stopping_criteria(ids[:, : prompt + step + 1], scores)
            self.criterion_seconds.append(time.perf_counter() - started)
            self.cpu_seconds.append(time.thread_time() - cpu)
            if done.all() or not self.received.wait(10):
                break
        streamer.end()
        return ids


class RedecodingTokenizer:
    """The control: the fixture tokenizer with a stream decoder that re-decodes the whole reply at every token."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def stream_decoder(self):
        return _RedecodingDecoder(self._tokenizer)


class _RedecodingDecoder:
    """O(n) per token: decode every id so far and return the new suffix."""

    def __init__(self, tokenizer):
        self._tokenizer, self._ids, self._shown = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, clean_up=False)
        new, self._shown = text[self._shown :], len(text)
        return new

    def flush(self) -> str:
        return ""


def text_tokens(tokenizer) -> list[int]:
    """Ids of TEXT that each decode to visible text on their own (no byte pieces, no special ids)."""
    return [i for i in tokenizer.encode_plain(TEXT) if tokenizer.stream_decoder().push(i)]


def run_once(engine: ChatEngine, stub: LockstepModel, new_tokens: int) -> tuple[list[float], list[float]]:
    """One reply through the engine: per token, the wall-clock overhead (handoff + criterion) and the engine's CPU
    time (put + criterion on the generation thread, queue get + decoder push + yield on the consumer's)."""
    stub.sent.clear()
    stub.criterion_seconds.clear()
    stub.cpu_seconds.clear()
    arrived, consumer_cpu = [], []
    params = SamplingParams.greedy_params(new_tokens)
    stream = engine.stream_reply([{"role": "user", "content": "hello"}], params)
    while True:
        cpu = time.thread_time()
        if next(stream, None) is None:
            break
        consumer_cpu.append(time.thread_time() - cpu)  # blocking in the queue costs no CPU: this is engine work
        arrived.append(time.perf_counter())
        stub.received.set()
    if not (len(arrived) == len(stub.sent) == new_tokens):
        raise RuntimeError(f"expected one chunk per token: {len(arrived)} chunks, {len(stub.sent)} tokens")
    wall = [a - s + c for a, s, c in zip(arrived, stub.sent, stub.criterion_seconds, strict=True)]
    return wall, [a + b for a, b in zip(consumer_cpu, stub.cpu_seconds, strict=True)]


def near(samples: list[list[float]], center: int, half: int = 25) -> float:
    """Median overhead over tokens center-half .. center+half-1 (1-based positions), pooled over repetitions."""
    return statistics.median(x for run in samples for x in run[center - half - 1 : center + half - 1])


def measure(engine: ChatEngine, stub: LockstepModel, new_tokens: int, reps: int) -> dict[str, tuple[float, float]]:
    """Pooled medians near token 100 and near token 1000, of wall-clock overhead and of engine CPU time."""
    run_once(engine, stub, new_tokens)  # warm-up
    runs = [run_once(engine, stub, new_tokens) for _ in range(reps)]
    walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
    return {"wall": (near(walls, 100), near(walls, 1000)), "cpu": (near(cpus, 100), near(cpus, 1000))}


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--reps", type=int, default=15, help="replies measured (after one warm-up)")
    args_parser.add_argument("--no-control", action="store_true", help="skip the re-decoding control run")
    args = args_parser.parse_args()
    set_threads(args.threads)
    new_tokens = 1025
    tokenizer = load_tokenizer(FIXTURE_DIR)
    stub = LockstepModel(text_tokens(tokenizer), tokenizer.vocab_size)
    with workdir("overhead") as tmp:
        settings = tiny_settings(Path(tmp), stream_interval_ms=0)  # every token on its own: no coalescing to hide in
        info = ModelInfo("stub", "-", "float32", "cpu", None, "none", "sdpa", context_window=4096)
        plan = DecodePlan("dynamic", "a stub", 1, "off: a stub", 0, 0, 32, 0)  # the worker alone, nothing kept
        figures = measure(ChatEngine(stub, tokenizer, info, settings, plan), stub, new_tokens, args.reps)
        (cpu_100, cpu_1000), (wall_100, wall_1000) = figures["cpu"], figures["wall"]
        ratio = cpu_1000 / cpu_100
        print(
            f"per_token_overhead: model stub in lockstep behind the engine's seam, {args.reps} replies of "
            f"{new_tokens} tokens"
        )
        print("  engine CPU time per token (put + stop criterion + queue get + decoder push + yield), medians:")
        print(f"  near token 100: {cpu_100 * 1e6:.1f} us; near token 1000: {cpu_1000 * 1e6:.1f} us; ratio {ratio:.3f}")
        print(
            f"  wall clock incl. thread wake-up (noisy on a VM): {wall_100 * 1e6:.1f} us -> {wall_1000 * 1e6:.1f} us, "
            f"ratio {wall_1000 / wall_100:.3f}"
        )
        if not args.no_control:
            control = ChatEngine(stub, RedecodingTokenizer(tokenizer), info, settings, plan)
            c100, c1000 = measure(control, stub, new_tokens, max(args.reps // 2, 1))["cpu"]
            print(
                f"  control, decoder re-decoding the whole reply per token: CPU {c100 * 1e6:.1f} us -> "
                f"{c1000 * 1e6:.1f} us, ratio {c1000 / c100:.3f} (the benchmark sees O(n) per-token work)"
            )
    print(f"ratio {ratio:.3f} ({verdict(ratio, TARGET, higher_is_better=False)})")
    headline("per_token_overhead", ratio)


if __name__ == "__main__":
    main()
