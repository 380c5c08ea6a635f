"""The app's real load path on CUDA: the tiny fixture's greedy replies in float16 and float32, and GPU memory.

Runs only where CUDA exists (elsewhere it prints "skipped: no CUDA"). For each dtype, `ChatEngine.load` takes the
InternLM2 fixture through the same steps as the 7B model (convert to Llama, load with accelerate's device_map on
CUDA) and replies greedily to every chat case of the fixture's reference.json, recorded by the official remote code
on the CPU in float32. A reply counts as reproduced when its text is identical. float32 on CUDA should reproduce all
of them; float16 may part from a reference where two tokens' logits are closer than its rounding (the fixture lists
each case's smallest top-2 margin). Then, in float16: GPU memory after loading, after a reply, after a reply stopped
mid-decode (it must come back to where it was: no cache left behind) and after `gpu.clear_cache`. The headline is the
share of reference replies float16 reproduces.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import torch
from common import FIXTURE_DIR, headline, parser, set_threads, tiny_settings

MIB = 2**20


def reproduced(engine, cases: list[dict], default_system: str) -> int:
    """How many reference chat cases the engine's greedy reply reproduces exactly; prints the ones it does not."""
    from internlm_app.backends.engine import history_to_messages
    from internlm_app.sampling import SamplingParams

    same = 0
    for case in cases:
        system = case["meta_instruction"] if case["meta_instruction_passed"] else default_system
        messages = history_to_messages(case["query"], case["history"], system)
        text, _ = engine.reply(messages, SamplingParams.greedy_params(case["max_new_tokens"]))
        if text == case["response"]:
            same += 1
        else:
            print(f"    differs: {case['query']!r} (smallest top-2 margin {case['min_top2_margin']:.2e})")
    return same


def stopped_mid_decode(engine) -> tuple[int, str]:
    """Bytes allocated after a long greedy reply is cancelled at its fourth chunk, and how the reply ended."""
    from internlm_app.chat_types import ReplyEvents
    from internlm_app.sampling import SamplingParams

    cancel, events = threading.Event(), ReplyEvents()
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=2.0, max_new_tokens=400)
    hi = [{"role": "user", "content": "hi"}]
    for chunks, _ in enumerate(engine.stream_reply(hi, params, cancel=cancel, events=events)):
        if chunks == 3:
            cancel.set()
    torch.cuda.synchronize()
    stats = events.stats
    return torch.cuda.memory_allocated(), f"{stats.finish_reason} after {stats.completion_tokens} tokens"


def main() -> None:
    args = parser(__doc__).parse_args()
    set_threads(args.threads)
    if not torch.cuda.is_available():
        print("gpu_fp16: skipped: no CUDA (torch.cuda.is_available() is False); run it on a GPU machine")
        headline("gpu_fp16", "skipped")
        return
    from internlm_app.backends.engine import ChatEngine
    from internlm_app.runtime import gpu

    reference = json.loads((FIXTURE_DIR / "reference.json").read_text())
    cases, default_system = reference["chat"], reference["meta"]["default_meta_instruction"]
    print(f"gpu_fp16 on {torch.cuda.get_device_name()}, torch {torch.__version__}; {len(cases)} reference replies")
    shares = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-fp16-") as workdir:
        for dtype in ("float32", "float16"):
            base = torch.cuda.memory_allocated()
            # one chunk per token, so that the stop below lands a few tokens into the reply
            engine = ChatEngine.load(tiny_settings(Path(workdir), device="cuda", dtype=dtype, stream_interval_ms=0))
            info = engine.info
            print(f"  {dtype}: loaded as {info.dtype} on {info.device}, device_map {info.device_map}")
            loaded = torch.cuda.memory_allocated()
            shares[dtype] = reproduced(engine, cases, default_system) / len(cases)
            print(f"  {dtype}: {shares[dtype]:.0%} of the reference replies reproduced")
            if dtype == "float16":
                after_reply = torch.cuda.memory_allocated()
                after_stop, ended = stopped_mid_decode(engine)
                before, after = gpu.clear_cache()
                mib = [(n - base) / MIB for n in (loaded, after_reply, after_stop)]
                print(
                    f"  float16 memory allocated (MiB): loaded {mib[0]:.2f}, after replies {mib[1]:.2f}, after a reply "
                    f"stopped mid-decode {mib[2]:.2f}; clear_cache reserved {before[0].reserved / MIB:.1f} -> "
                    f"{after[0].reserved / MIB:.1f} MiB"
                )
                print(f"  stopped reply ({ended}) left memory where it was: {after_stop == after_reply}")
            del engine
    headline("gpu_fp16", shares["float16"])


if __name__ == "__main__":
    main()
