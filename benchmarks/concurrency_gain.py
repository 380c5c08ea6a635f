"""Aggregate tokens/s of 4 concurrent greedy streams ÷ 1 stream, through the engine on the tiny fixture (CPU).

The question of the GPU benchmark (`gpu_serve`), asked where tests run: does a reply that arrives while others
generate join them in one batch, so that throughput grows with the number of streams? Each stream is one
`ChatEngine.stream_reply` in its own thread, all started together; every reply runs to exactly N tokens (the engine
is given a copy of the tokenizer whose only stop id, <unk>, the fixture never generates). Aggregate tokens/s =
all tokens ÷ wall time from the first start to the last end. 1, 4 and 8 streams are timed in interleaved rounds
(1, 4, 8, then 8, 4, 1, ...); the headline is the median over rounds of (4-stream aggregate ÷ 1-stream) in the same
round. The same rounds with batching off (INTERNLM_MAX_BATCH_SIZE=1: one reply at a time) are printed as the control.
Per-stream tokens/s and time to first token are printed beside each figure.

The library's own ceiling is timed too: a second ContinuousBatchingManager, configured as the engine's
(`batching.manager_configs`), on the same model and prompt ids, given the requests straight and read in the calling
thread: no engine, no text, no reply threads. Its 4-stream aggregate ÷ the engine's 1 stream bounds what any engine
on this manager can reach here; the engine's 4 streams ÷ the manager alone is the engine's own cost.
Target: concurrency_gain >= 3.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from pathlib import Path

import torch
from common import headline, load_engine, parser, run_together, set_threads, verdict, workdir

from internlm_app.backends.batching import manager_configs, request_sampling
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


def manager_alone(engine: ChatEngine, counts: list[int], tokens: int, reps: int) -> dict[int, list[float]]:
    """Aggregate tokens/s of n greedy requests given straight to a manager configured as `engine`'s (see above)."""
    plan, params = engine.plan, SamplingParams.greedy_params(tokens)
    config, cb_config = manager_configs(
        engine.model,
        stop_ids=engine.stop_ids,
        pad_token_id=engine.model.generation_config.pad_token_id or 0,
        slots=plan.batch_slots,
        cache_tokens=plan.batch_cache_tokens,
        page_size=plan.page_size,
    )
    sampling = request_sampling(params, engine.model.config.vocab_size)
    prompts = [engine.prepare([{"role": "user", "content": p}], tokens).ids for p in PROMPTS]
    manager = engine.model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
    ids = itertools.count()

    def run(n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            manager.add_request(
                list(prompts[i % len(prompts)]), request_id=f"alone-{next(ids)}", max_new_tokens=tokens, **sampling
            )
        made = 0
        for _ in range(n):
            output = manager.get_result(timeout=60)
            if output is None or output.error is not None or len(output.generated_tokens) != tokens:
                raise RuntimeError(f"the manager alone did not make {tokens} tokens: {output}")
            made += len(output.generated_tokens)
        return made / (time.perf_counter() - started)

    with torch.inference_mode():
        manager.start()
    try:
        run(max(counts))  # warm-up
        results: dict[int, list[float]] = {n: [] for n in counts}
        for rep in range(reps):
            for n in counts if rep % 2 == 0 else reversed(counts):
                results[n].append(run(n))
        return results
    finally:
        manager.stop(block=True)


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
        engine_runs = rounds(batched, [1, 4, 8], args.tokens, args.reps)
        gain = report("continuous batch (default)", engine_runs)
        report("control, batching off (one reply at a time)", rounds(serial, [1, 4], args.tokens, args.reps))
        alone = manager_alone(batched, [1, 4], args.tokens, args.reps)
        single = statistics.median(r["aggregate"] for r in engine_runs[1])
        four = statistics.median(r["aggregate"] for r in engine_runs[4])
        print("  transformers' manager alone (same config, model and prompts; no engine):")
        for n, figures in alone.items():
            print(
                f"    {n} stream(s): aggregate {statistics.median(figures):7.1f} tok/s "
                f"(x{statistics.median(figures) / single:.2f} of the engine's 1 stream)"
            )
        ceiling = statistics.median(alone[4])
        print(
            f"  the library's ceiling here, manager alone at 4 ÷ engine at 1: {ceiling / single:.2f}; "
            f"the engine keeps {four / ceiling:.2f} of the manager's 4-stream aggregate"
        )
        for engine in (batched, serial, loaded):
            engine.close()
    print(f"4 streams ÷ 1: {gain:.3f} ({verdict(gain, TARGET, higher_is_better=True)})")
    headline("concurrency_gain", gain)


if __name__ == "__main__":
    main()
