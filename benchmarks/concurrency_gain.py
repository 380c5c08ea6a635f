"""Aggregate tokens/s of 4 concurrent greedy streams ÷ 1 stream, through the engine on the tiny fixture (CPU).

The question of the GPU benchmark (`gpu_serve`), asked where tests run: does a reply that arrives while others
generate join them in one batch, so that throughput grows with the number of streams? Each stream is one
`ChatEngine.stream_reply` in its own thread, all started together; every reply runs to exactly N tokens (the engine
is given a copy of the tokenizer whose only stop id, <unk>, the fixture never generates). Aggregate tokens/s =
all tokens ÷ wall time from the first start to the last end. 1, 4 and 8 streams are timed in interleaved rounds
(1, 4, 8, then 8, 4, 1, ...); the headline is the median over rounds of (4-stream aggregate ÷ 1-stream) in the same
round. The same rounds with batching off (INTERNLM_MAX_BATCH_SIZE=1: one reply at a time) are printed as the control.
Per-stream tokens/s and time to first token are printed beside each figure. Target: concurrency_gain >= 3.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

from common import headline, load_engine, parser, run_together, set_threads, verdict, workdir

from internlm_app.backends.engine import ChatEngine
from internlm_app.chat_types import ReplyEvents
from internlm_app.sampling import SamplingParams

TARGET = 3.0
PROMPTS = ["hello", "你好", "What is 2+2?", "介绍一下上海", "abc", "hi", "why", "Tell me a story"]


def endless(engine: ChatEngine, **settings) -> ChatEngine:
    """The engine's weights with a tokenizer whose stop id is never generated: every reply runs to max tokens."""
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.stop_ids, tokenizer.header_ids, tokenizer.tool_ids = [0], [], {}
    return ChatEngine(engine.model, tokenizer, engine.info, engine.settings.model_copy(update=settings))


def run_streams(engine: ChatEngine, streams: int, tokens: int) -> dict[str, float]:
    """`streams` replies at once; aggregate tokens/s, median per-stream tokens/s and median time to first token."""
    params = SamplingParams.greedy_params(tokens)
    stats: list = [None] * streams

    def one(i: int) -> None:
        events = ReplyEvents()
        for _ in engine.stream_reply([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], params, events=events):
            pass
        stats[i] = events.stats

    wall = run_together(one, streams)
    if any(s is None or s.completion_tokens != tokens for s in stats):
        raise RuntimeError(f"a stream did not make {tokens} tokens: {stats}")
    return {
        "aggregate": streams * tokens / wall,
        "per_stream": statistics.median(tokens / (s.total_seconds or wall) for s in stats),
        "ttft": statistics.median((s.queue_seconds + (s.time_to_first_token or 0)) for s in stats),
        "batched": sum(s.batched for s in stats),
    }


def rounds(engine: ChatEngine, counts: list[int], tokens: int, reps: int) -> dict[int, list[dict]]:
    results: dict[int, list[dict]] = {n: [] for n in counts}
    run_streams(engine, max(counts), 8)  # warm-up: every path and thread has run once
    for rep in range(reps):
        for n in counts if rep % 2 == 0 else reversed(counts):
            results[n].append(run_streams(engine, n, tokens))
    return results


def report(label: str, results: dict[int, list[dict]]) -> float:
    base = results[1]
    print(f"  {label}:")
    gain = 0.0
    for n, runs in results.items():
        gains = [r["aggregate"] / b["aggregate"] for r, b in zip(runs, base, strict=True)]
        aggregate = statistics.median(r["aggregate"] for r in runs)
        per_stream = statistics.median(r["per_stream"] for r in runs)
        ttft = statistics.median(r["ttft"] for r in runs)
        print(
            f"    {n} stream(s): aggregate {aggregate:7.1f} tok/s (x{statistics.median(gains):.2f} of 1), per stream "
            f"{per_stream:6.1f} tok/s, time to first token {ttft * 1e3:6.1f} ms, {runs[-1]['batched']} of {n} in the "
            "batch"
        )
        if n == 4:
            gain = statistics.median(gains)
    return gain


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    args_parser.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    args = args_parser.parse_args()
    set_threads(args.threads)
    with workdir("concurrency-gain") as tmp:
        loaded = load_engine(Path(tmp))
        batched = endless(loaded)
        serial = endless(loaded, max_batch_size=1)
        print(f"concurrency_gain: tiny fixture on the CPU, {args.tokens} greedy tokens per stream, {args.reps} rounds")
        print(f"  decode plan: {batched.plan.summary()}")
        gain = report("continuous batch (default)", rounds(batched, [1, 4, 8], args.tokens, args.reps))
        report("control, batching off (one reply at a time)", rounds(serial, [1, 4], args.tokens, args.reps))
        for engine in (batched, serial, loaded):
            engine.close()
    print(f"4 streams ÷ 1: {gain:.3f} ({verdict(gain, TARGET, higher_is_better=True)})")
    headline("concurrency_gain", gain)


if __name__ == "__main__":
    main()
