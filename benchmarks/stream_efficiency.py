"""Streaming efficiency: tokens/s through `engine.stream_reply` ÷ tokens/s of a bare `model.generate`.

Both sides use the same loaded model, the same prompt ids and the engine's own GenerationConfig (greedy, same eos ids),
so the only difference is the engine's streaming path: the GPU queue, the generation thread, the token streamer and its
stopping criterion, the queue handoff to the consuming thread and the incremental decoder. The engine runs with its
default settings: `stream_interval_ms` 20, so when tokens come faster than one per 20 ms (the tiny fixture: ~1.5 ms
each) the consumer wakes once per 20 ms and yields them together; `--stream-interval-ms 0` measures the
one-wake-up-per-token path instead. The lm_head rows of the stop ids are zeroed, so both sides produce exactly N tokens
(checked on every run). Runs are interleaved in alternating order (engine bare, bare engine ...) after a warm-up; the
ratio is the median of the per-pair ratios (each pair runs back to back, so slow drifts in machine load cancel); the
tokens/s shown are medians. Each timing covers the whole reply (prefill + N decode steps) on both sides. Models: the
tiny InternLM2 fixture (per-token model time is tiny, so overhead shows most) and a larger random Llama on the fixture's
tokenizer. The headline is the lowest ratio over all models and lengths. Target >= 0.95. CPU timings; only the ratio is
meaningful here. The engine keeps no KV across replies here (INTERNLM_KV_REUSE_TOKENS=0): the same prompt again
would otherwise come from its cache, work bare generate does. The process's CPU time per token (both threads) is
printed too: it hardly depends on what else the machine runs. (The tiny fixture has 512 positions; at 1024 new
tokens it runs past them, which does not change the timing: RoPE angles are computed.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import (
    build_random_llama,
    headline,
    interleaved,
    load_engine,
    make_stop_tokens_unreachable,
    median,
    parser,
    set_threads,
    timed,
    verdict,
    with_context_window,
    workdir,
)

from internlm_app.chat_types import ReplyEvents
from internlm_app.sampling import SamplingParams
from internlm_app.settings import Settings

TARGET = 0.95
PROMPT = [{"role": "user", "content": "Tell me a long story about Shanghai and the people who live there."}]


def measure(engine, new_tokens: int, reps: int) -> dict[str, float]:
    """Median tokens/s of the engine's stream and of bare generate, and their CPU ms per token (all threads)."""
    params = SamplingParams.greedy_params(new_tokens)
    engine = with_context_window(engine, len(engine.tokenizer.build_prompt_ids(PROMPT)) + new_tokens)
    prompt_ids = engine.prepare(PROMPT, new_tokens).ids
    config = engine.generation_config(params)

    cpu: dict[str, list[float]] = {"stream": [], "bare": []}

    def cpu_timed(side: str, fn) -> float:
        start = time.process_time()
        seconds = timed(fn)
        cpu[side].append((time.process_time() - start) * 1e3 / new_tokens)
        return seconds

    def streamed() -> float:
        events = ReplyEvents()
        seconds = cpu_timed("stream", lambda: "".join(engine.stream_reply(PROMPT, params, events=events)))
        if events.stats.completion_tokens != new_tokens:
            raise RuntimeError(f"expected {new_tokens} tokens from the stream: {events.stats}")
        return new_tokens / seconds

    def bare() -> float:
        out = []

        def run() -> None:
            with torch.inference_mode():
                ids = torch.tensor([prompt_ids])
                out.append(
                    engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                )

        seconds = cpu_timed("bare", run)
        if out[0].shape[1] - len(prompt_ids) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} tokens from generate, got {out[0].shape[1] - len(prompt_ids)}")
        return new_tokens / seconds

    rates = interleaved({"stream": streamed, "bare": bare}, reps)
    pairs = [s / b for s, b in zip(rates["stream"], rates["bare"], strict=True)]
    return {
        "stream": median(rates["stream"]),
        "bare": median(rates["bare"]),
        "ratio": median(pairs),
        "stream_cpu": median(cpu["stream"][-reps:]),  # the warm-up round is left out
        "bare_cpu": median(cpu["bare"][-reps:]),
    }


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--lengths", default="256,1024", help="new-token counts, comma-separated")
    args_parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per side")
    args_parser.add_argument("--models", default="tiny,llama", help="tiny (fixture) and/or llama (random, larger)")
    args_parser.add_argument("--stream-interval-ms", type=int, default=None, help="override the engine's setting")
    args_parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random Llama")
    args_parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    args = args_parser.parse_args()
    set_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    # No KV reuse: every engine reply prefills its whole prompt, as the bare generate it is compared with does.
    overrides = {"kv_reuse_tokens": 0}
    if args.stream_interval_ms is not None:
        overrides["stream_interval_ms"] = args.stream_interval_ms
    interval = args.stream_interval_ms
    if interval is None:
        interval = Settings.model_fields["stream_interval_ms"].default
    print(f"stream_efficiency: torch threads {args.threads}, {args.reps} reps, stream interval {interval} ms")
    ratios = []
    with workdir("stream") as tmp:
        tmp = Path(tmp)
        for model_name in args.models.split(","):
            if model_name == "tiny":
                engine = load_engine(tmp / "tiny", **overrides)
                label = "tiny InternLM2 fixture (hidden 64, 2 layers)"
            else:
                path = build_random_llama(
                    tmp / "llama-src",
                    hidden=args.hidden,
                    layers=args.layers,
                )
                engine = load_engine(tmp / "llama", model_path=path, **overrides)
                label = (
                    f"random Llama (hidden {args.hidden}, {args.layers} layers, {engine.info.parameters / 1e6:.0f}M)"
                )
            print(make_stop_tokens_unreachable(engine.model, engine.stop_ids))
            for n in lengths:
                rates = measure(engine, n, args.reps)
                ratio = rates["ratio"]
                ratios.append(ratio)
                print(
                    f"  {label}, {n} new tokens: stream {rates['stream']:.1f} tok/s, bare generate "
                    f"{rates['bare']:.1f} tok/s, ratio (median of pairs) {ratio:.3f}; CPU per token (all threads) "
                    f"stream {rates['stream_cpu']:.3f} ms, bare {rates['bare_cpu']:.3f} ms"
                )
    worst = min(ratios)
    print(f"lowest ratio {worst:.3f} ({verdict(worst, TARGET, higher_is_better=True)})")
    headline("stream_efficiency", worst)


if __name__ == "__main__":
    main()
