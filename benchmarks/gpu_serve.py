"""Serving speed through the engine on one GPU: one stream, concurrent streams, a long chat, memory. Prints
`gpu_serve=<aggregate tokens/s of 8 concurrent streams ÷ 1 stream>` last.

Runs only where CUDA exists (elsewhere it prints "skipped: no CUDA"); `--cpu-smoke` runs the same code with a tiny
shape on the CPU (figures meaningless). The model is a LlamaForCausalLM with InternLM2-7B's exact shape, random fp16
weights made on the GPU (as in gpu_decode); the tiny fixture's tokenizer turns text into ids. So that every reply
runs to its length and decodes, the lm_head rows of its stop ids and of every id beyond its vocabulary are zeroed
(their logit 0 stays below the greatest random logit; the matmul still covers all 92544 rows). Everything goes
through `ChatEngine` with the default settings (static cache + compiled step when it fits, batching up to 16).

Figures, each from medians of repeated runs:
1. One stream: decode tokens/s after the first token (the engine's stats) ÷ the bandwidth ceiling (bandwidth ÷ the
   weight bytes read per token, as in gpu_decode), and ÷ bare `model.generate` in the main thread on the same cache
   kind and length ((N - 1) ÷ (T_N - T_1)). Target ≥ 0.95 of bare; ≥ 0.40 of the ceiling on an H200.
2. 1 / 4 / 8 / 16 concurrent streams, all started together: aggregate tokens/s (all tokens ÷ wall time) ÷ 1 stream,
   per-stream tokens/s and time to first token (queue included). Target: 8 streams ≥ 5×.
3. A chat of 10 turns with about 4k tokens of history by turn 10: time to first token of turn 10 ÷ turn 1 (KV reuse
   makes the earlier turns free). Target ≤ 1.5.
4. Peak GPU memory (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import FIXTURE_DIR, headline, parser, run_together, set_threads
from gpu_decode import build_model, generate_seconds, gpu_or_smoke, sync, weight_bytes_per_token
from transformers import GenerationConfig

from internlm_app.backends.engine import ChatEngine
from internlm_app.chat_types import ModelInfo, ReplyEvents
from internlm_app.runtime.tokenizer import load_tokenizer, reply_stop_ids
from internlm_app.sampling import SamplingParams
from internlm_app.settings import Settings

WORDS = ["Shanghai", "river", "tea", "harbour", "morning", "market", "lantern", "garden", "bridge", "rain", "music"]


def user_text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 5) % len(WORDS)] for i in range(words))


def stream_once(engine: ChatEngine, messages: list[dict], tokens: int) -> object:
    events = ReplyEvents()
    sync(engine.model.device)
    for _ in engine.stream_reply(messages, SamplingParams.greedy_params(tokens), events=events):
        pass
    sync(engine.model.device)
    if events.stats.completion_tokens != tokens:
        raise RuntimeError(f"expected {tokens} tokens: {events.stats}")
    return events.stats


def concurrent(engine: ChatEngine, streams: int, tokens: int, round_: int) -> dict[str, float]:
    """`streams` replies started together; aggregate and per-stream tokens/s, time to first token incl. queue."""
    stats: list = [None] * streams

    def one(i: int) -> None:
        stats[i] = stream_once(engine, [{"role": "user", "content": user_text(round_ * 97 + i, 40)}], tokens)

    wall = run_together(one, streams)
    if any(s is None for s in stats):
        raise RuntimeError("a stream failed")
    return {
        "aggregate": streams * tokens / wall,
        "per_stream": statistics.median(tokens / s.total_seconds for s in stats),
        "ttft": statistics.median(s.queue_seconds + s.time_to_first_token for s in stats),
    }


def long_chat(engine: ChatEngine, turns: int, user_words: int, reply_tokens: int) -> tuple[float, float, int]:
    """Time to first token of turn 1 and of the last turn (medians of 3 tries each), and the last prompt's tokens."""
    messages: list[dict] = []
    first: list[float] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": user_text(turn, user_words)})
        if turn == 0:
            for _ in range(3):  # a cold prompt each time: the user text differs, only the template is shared
                tries = [{"role": "user", "content": user_text(1000 + len(first), user_words)}]
                first.append(stream_once(engine, tries, 1).time_to_first_token)
        if turn == turns - 1:
            last = [stream_once(engine, messages, 1) for _ in range(3)]  # regenerating: the reuse is the same
            return (
                statistics.median(first),
                statistics.median(s.time_to_first_token for s in last),
                last[0].prompt_tokens,
            )
        text = "".join(engine.stream_reply(messages, SamplingParams.greedy_params(reply_tokens)))
        messages.append({"role": "assistant", "content": text})
    raise AssertionError("unreachable")


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    args_parser.add_argument("--reps", type=int, default=3, help="repetitions per figure")
    args_parser.add_argument("--streams", default="1,4,8,16", help="concurrent stream counts")
    args_parser.add_argument("--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth in GB/s")
    args_parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: checks the code only")
    args = args_parser.parse_args()
    set_threads(args.threads)
    setup = gpu_or_smoke(args, "gpu_serve")
    if setup is None:
        return
    device, shape, dtype, name, bandwidth = setup
    counts = [int(x) for x in args.streams.split(",")]
    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    ceiling = bandwidth * 1e9 / weight_bytes_per_token(model)
    tokenizer = copy.copy(load_tokenizer(FIXTURE_DIR))
    with torch.no_grad():
        rows = model.get_output_embeddings().weight
        rows[tokenizer.vocab_size :] = 0.0
        rows[reply_stop_ids(tokenizer)] = 0.0  # every id that would end a reply
    window = 8192 if not args.cpu_smoke else 2048
    info = ModelInfo("random", "-", str(dtype), str(device), None, "none", "sdpa", context_window=window)
    settings = Settings(model_path=FIXTURE_DIR, device=device.type, max_batch_size=max(counts), max_length=window)
    engine = ChatEngine(model, tokenizer, info, settings)
    print(f"gpu_serve on {name}, torch {torch.__version__}; model built in {time.perf_counter() - started:.1f} s")
    print(f"  ceiling {ceiling:.1f} tokens/s ({bandwidth:.0f} GB/s); decode plan: {engine.plan.summary()}", flush=True)
    warm = time.perf_counter()
    engine.warm_up()
    print(f"  warm-up (compile, batch start) {time.perf_counter() - warm:.1f} s", flush=True)
    n = args.tokens

    # 1. One stream through the engine vs bare generate in the main thread, same cache kind and length.
    messages = [{"role": "user", "content": user_text(0, 40)}]
    stream_once(engine, messages, n)  # warm: the worker's thread and graphs
    rates = [stream_once(engine, messages, n).tokens_per_second for _ in range(args.reps)]
    prompt = torch.tensor([engine.prepare(messages, n).ids], device=device)
    static = {"cache_implementation": "static", "max_cache_len": window} if engine.static_cache else {}

    def bare(tokens: int) -> float:
        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **static)
        return generate_seconds(model, prompt, config)

    for _ in range(2):
        bare(1), bare(n)
    bare_rate = (n - 1) / (
        statistics.median(bare(n) for _ in range(args.reps)) - statistics.median(bare(1) for _ in range(args.reps))
    )
    single = statistics.median(rates)
    print(
        f"  one stream ({engine.plan.single_path} cache): {single:.1f} tok/s after the first token = "
        f"{single / ceiling:.3f} of the ceiling; bare generate (main thread) {bare_rate:.1f} tok/s; engine ÷ bare "
        f"{single / bare_rate:.3f}",
        flush=True,
    )

    # 2. Concurrent streams.
    results: dict[int, list[dict]] = {c: [] for c in counts}
    concurrent(engine, max(counts), 8, 0)  # warm: the batch at its widest
    for rep in range(args.reps):
        for c in counts if rep % 2 == 0 else reversed(counts):
            results[c].append(concurrent(engine, c, n, rep + 1))
    base = statistics.median(r["aggregate"] for r in results[1])
    gains = {}
    for c, runs in results.items():
        aggregate = statistics.median(r["aggregate"] for r in runs)
        gains[c] = aggregate / base
        print(
            f"  {c:>2} streams: aggregate {aggregate:7.1f} tok/s = x{gains[c]:.2f} of one, per stream "
            f"{statistics.median(r['per_stream'] for r in runs):6.1f} tok/s, time to first token "
            f"{statistics.median(r['ttft'] for r in runs) * 1e3:7.1f} ms",
            flush=True,
        )

    # 3. Turn 10 of a chat with ~4k tokens of history vs turn 1.
    words, reply = (80, 200) if not args.cpu_smoke else (20, 24)  # about 460 tokens a turn: 4k by turn 10
    ttft_1, ttft_10, prompt_10 = long_chat(engine, 10, words, reply)
    print(
        f"  chat: time to first token turn 1 {ttft_1 * 1e3:.1f} ms, turn 10 ({prompt_10} prompt tokens) "
        f"{ttft_10 * 1e3:.1f} ms, ratio {ttft_10 / ttft_1:.2f}",
        flush=True,
    )
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    engine.close()
    print(f"single_stream_vs_ceiling={single / ceiling:.3f}")
    print(f"single_stream_vs_bare={single / bare_rate:.3f}")
    print(f"ttft_turn10_vs_turn1={ttft_10 / ttft_1:.3f}")
    headline("gpu_serve", gains.get(8, gains[max(counts)]))


if __name__ == "__main__":
    main()
