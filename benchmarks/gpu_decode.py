"""GPU decode speed of a model with InternLM2-chat-7B's exact shape, against the memory-bandwidth ceiling.

Runs only where CUDA exists (elsewhere it prints "skipped: no CUDA"). A LlamaForCausalLM with InternLM2-7B's shape
(hidden 4096, 32 layers, 32 heads / 8 KV heads, FFN 14336, vocab 92544, rope_theta 1e6; what the converter produces)
is random-initialised in fp16 directly on the GPU (no 30 GB CPU copy); the weights' values do not change the speed.
For prompts of 128, 1k and 4k random tokens it times greedy `generate` with 1 new token (time to first token: the
prefill) and with N new tokens (end-of-sequence disabled, length checked); decode tokens/s = (N - 1) / (T_N - T_1),
medians over interleaved repetitions after warm-up, with CUDA synchronised around each call. Batch size 1, as the
app serves one reply at a time.

Decoding one token at batch 1 reads every weight once (all but the embedding table: 14.72 GB in fp16), so
bandwidth / 14.72 GB is the ceiling; the figure reported is tokens/s ÷ that ceiling (the KV cache read, growing with
the context, is printed beside it). Bandwidth comes from --bandwidth-gbs or a table by device name (printed).

Two paths are measured, one after the other: the dynamic KV cache (the engine's default), then a static KV cache
(the engine's INTERNLM_STATIC_CACHE setting), where transformers compiles the decode step with torch.compile (mode
reduce-overhead: CUDA graphs) by itself on CUDA (`cache_implementation="static"`). The static cache is sized once,
for the longest prompt plus N (`max_cache_len`), so every call reuses one compiled step instead of recompiling per
cache length; the compile time is spent in its first warm-up and reported. The static path runs last and a failure
there is printed, not raised, so the dynamic figures come back whatever the compiler does. The headline is the
dynamic-cache ratio at the shortest prompt. `--cpu-smoke` runs the code path with a tiny shape on the CPU (figures
meaningless).

After each path, the engine's own streaming path on the GPU (stream_efficiency's question where a token costs what
it costs in production): a ChatEngine around the same model and the tiny fixture's tokenizer streams a reply, timed
against a bare `generate` of the same prompt ids, length and cache, in the main thread and in a new thread
(alternating order, median of pair ratios). So that every generated id can be decoded by that tokenizer, the lm_head
rows of all ids beyond its vocabulary and of its stop ids are zeroed first: their logit 0 stays below the greatest of
the other random logits, so greedy does not pick them (every reply's length is checked), and the matmul (the whole
92544-row lm_head) costs the same.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
from common import FIXTURE_DIR, headline, interleaved, parser, set_threads
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

INTERNLM2_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 92544,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 160,
    "vocab_size": 1106,
}
# Peak memory bandwidth in GB/s by a piece of torch.cuda.get_device_name(); the first match wins.
BANDWIDTH_GBS = [
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 3350),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),  # 40 GB
    ("A800", 2039),
    ("L40S", 864),
    ("L40", 864),
    ("L4", 300),
    ("A10G", 600),
    ("A10", 600),
    ("RTX 4090", 1008),
    ("RTX 3090 Ti", 1008),
    ("RTX 3090", 936),
    ("RTX 3080", 760),
    ("A6000", 768),
    ("V100", 900),
    ("T4", 320),
]


def gpu_or_smoke(args, benchmark: str) -> tuple[torch.device, dict, torch.dtype, str, float] | None:
    """Device, shape, dtype, device name and bandwidth (GB/s) for a GPU run, or the tiny CPU smoke run; None (after
    printing the `skipped` headline) where there is no CUDA and no --cpu-smoke."""
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"{benchmark}: skipped: no CUDA (torch.cuda.is_available() is False); run it on a GPU machine")
        headline(benchmark, "skipped")
        return None
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    shape, dtype = (TINY, torch.float32) if args.cpu_smoke else (INTERNLM2_7B, torch.float16)
    name = "CPU (smoke run, tiny shape)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    bandwidth = args.bandwidth_gbs or (None if args.cpu_smoke else bandwidth_for(name)) or 100.0
    return device, shape, dtype, name, bandwidth


def bandwidth_for(name: str) -> float | None:
    return next((gbs for key, gbs in BANDWIDTH_GBS if key.lower() in name.lower()), None)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-initialised Llama of `shape`, created directly on `device` in `dtype`."""
    rope = {"rope_type": "default", "rope_theta": 1e6}
    config = LlamaConfig(**shape, max_position_embeddings=32768, rope_parameters=rope, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # exactly N tokens: no end-of-sequence to stop at
    return model


def weight_bytes_per_token(model: LlamaForCausalLM) -> int:
    """Bytes of weights one decode step reads: all parameters but the embedding table (one row of it is read)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def kv_bytes_per_token(model: LlamaForCausalLM, context: int) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize * context


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, prompt: torch.Tensor, new_tokens: int, static_cache_len: int | None) -> float:
    """Seconds for one greedy generate of exactly `new_tokens` tokens; a static cache of that length if given."""
    static = {"cache_implementation": "static", "max_cache_len": static_cache_len} if static_cache_len else {}
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **static)
    return generate_seconds(model, prompt, config)


def generate_seconds(model, prompt: torch.Tensor, config: GenerationConfig) -> float:
    """Seconds for one `generate`, CUDA synchronised on both ends; it must make exactly max_new_tokens tokens."""
    sync(prompt.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    sync(prompt.device)
    seconds = time.perf_counter() - started
    if out.shape[1] != prompt.shape[1] + config.max_new_tokens:
        raise RuntimeError(f"expected {config.max_new_tokens} new tokens, got {out.shape[1] - prompt.shape[1]}")
    return seconds


def measure_engine(model: LlamaForCausalLM, new_tokens: int, reps: int, static_cache_len: int | None) -> float:
    """Tokens/s through ChatEngine.stream_reply ÷ bare generate on `model`; prints and returns the ratio.

    The engine generates in a thread of its own, so bare `generate` is also timed in a new thread: on the H200 this
    was first run on, any thread but the main one took about three times the CPU per token on the dynamic path.
    """
    from internlm_app.backends.engine import ChatEngine
    from internlm_app.chat_types import ModelInfo, ReplyEvents
    from internlm_app.runtime.tokenizer import load_tokenizer, reply_stop_ids
    from internlm_app.sampling import SamplingParams
    from internlm_app.settings import Settings

    tokenizer = load_tokenizer(FIXTURE_DIR)
    with torch.no_grad():
        rows = model.get_output_embeddings().weight
        rows[tokenizer.vocab_size :] = 0.0
        rows[reply_stop_ids(tokenizer)] = 0.0  # every id that would end a reply
    window = static_cache_len or 4096  # the static cache's length is the context window: the one already compiled
    info = ModelInfo("random", "-", str(model.dtype), str(model.device), None, "none", "sdpa", context_window=window)
    # One reply at a time, nothing reused across calls: the same work as the bare generate it is compared with.
    engine = ChatEngine(model, tokenizer, info, Settings(model_path=FIXTURE_DIR, max_batch_size=1, kv_reuse_tokens=0))
    engine.static_cache = bool(static_cache_len)  # what INTERNLM_STATIC_CACHE gives on CUDA; also on --cpu-smoke
    messages = [{"role": "user", "content": "Tell me a long story about Shanghai and the people who live there."}]
    params = SamplingParams.greedy_params(new_tokens)
    prompt = torch.tensor([engine.prepare(messages, new_tokens).ids], device=model.device)
    config = engine.generation_config(params)
    if static_cache_len:  # the engine's worker brings its own static cache of the window's length
        config.cache_implementation, config.max_cache_len = "static", window

    def streamed() -> float:
        events = ReplyEvents()
        sync(model.device)
        started = time.perf_counter()
        "".join(engine.stream_reply(messages, params, events=events))
        seconds = time.perf_counter() - started
        if events.stats.completion_tokens != new_tokens:
            raise RuntimeError(f"expected {new_tokens} tokens from the engine: {events.stats}")
        return new_tokens / seconds

    def bare() -> float:
        return new_tokens / generate_seconds(model, prompt, config)

    def bare_in_thread() -> float:
        seconds: list[float] = []
        worker = threading.Thread(target=lambda: seconds.append(generate_seconds(model, prompt, config)))
        worker.start()
        worker.join()
        if not seconds:
            raise RuntimeError("generate failed in its thread")
        return new_tokens / seconds[0]

    rates = interleaved({"stream": streamed, "bare": bare, "thread": bare_in_thread}, max(reps, 5))
    engine.close()
    ratio = statistics.median([a / b for a, b in zip(rates["stream"], rates["bare"], strict=True)])
    label = "static cache + compile" if static_cache_len else "dynamic cache"
    print(
        f"  engine stream_reply, {label}, prompt {prompt.shape[1]}, {new_tokens} new tokens: "
        f"{statistics.median(rates['stream']):.1f} tok/s vs bare generate {statistics.median(rates['bare']):.1f} tok/s "
        f"in the main thread, {statistics.median(rates['thread']):.1f} tok/s in a new thread (prefill included "
        f"everywhere); ratio stream / main-thread bare (median of pairs) {ratio:.3f}",
        flush=True,
    )
    return ratio


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--prompt-lengths", default="128,1024,4096", help="prompt tokens, comma-separated")
    args_parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per timed decode")
    args_parser.add_argument("--reps", type=int, default=3, help="timed repetitions per figure")
    args_parser.add_argument("--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth in GB/s")
    args_parser.add_argument("--no-static", action="store_true", help="skip the static cache + torch.compile path")
    args_parser.add_argument("--no-engine", action="store_true", help="skip the engine's streaming path")
    args_parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: checks the code only")
    args = args_parser.parse_args()
    set_threads(args.threads)
    setup = gpu_or_smoke(args, "gpu_decode")
    if setup is None:
        return
    device, shape, dtype, name, bandwidth = setup
    source = "--bandwidth-gbs" if args.bandwidth_gbs else ("table" if bandwidth_for(name) else "placeholder 100")
    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    per_token = weight_bytes_per_token(model)
    ceiling = bandwidth * 1e9 / per_token
    print(f"gpu_decode on {name}, torch {torch.__version__}; model built in {time.perf_counter() - started:.1f} s")
    print(f"  shape {shape}, {dtype}; weights read per token {per_token / 1e9:.2f} GB")
    print(f"  bandwidth {bandwidth:.0f} GB/s ({source}); ceiling {ceiling:.1f} tokens/s (weights only)")
    n, lengths = args.new_tokens, [int(x) for x in args.prompt_lengths.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = {length: torch.randint(3, shape["vocab_size"], (1, length), generator=generator) for length in lengths}
    results: dict[tuple[str, int], float] = {}

    def measure(label: str, static_cache_len: int | None) -> None:
        for length, prompt in prompts.items():
            prompt = prompt.to(device)
            warm = time.perf_counter()
            for _ in range(2):  # for the static path, compile and CUDA-graph recording happen here
                timed_generate(model, prompt, 1, static_cache_len)
                timed_generate(model, prompt, n, static_cache_len)
            compiled = "compiled decode step" if hasattr(model, "_compiled_call") else "not compiled"
            print(f"  warm-up {label}, prompt {length}: {time.perf_counter() - warm:.1f} s ({compiled} so far)")
            firsts = [timed_generate(model, prompt, 1, static_cache_len) for _ in range(args.reps)]
            fulls = [timed_generate(model, prompt, n, static_cache_len) for _ in range(args.reps)]
            ttft, full = statistics.median(firsts), statistics.median(fulls)
            rate = (n - 1) / (full - ttft)
            kv = kv_bytes_per_token(model, static_cache_len or length + n // 2)
            with_kv = bandwidth * 1e9 / (per_token + kv)
            results[(label, length)] = rate / ceiling
            print(
                f"  {label:>22}, prompt {length:>5}: time to first token {ttft * 1e3:8.1f} ms, decode {rate:7.1f} "
                f"tok/s = {rate / ceiling:.3f} of the ceiling ({rate / with_kv:.3f} counting the KV cache read, "
                f"{kv / 1e9:.2f} GB)",
                flush=True,
            )

    measure("dynamic cache", None)
    if not args.no_engine:
        measure_engine(model, n, args.reps, None)
    if not args.no_static:
        try:
            static_len = max(*lengths, 64) + n  # one length for all: the engine's prompt (36 tokens) fits too
            measure("static cache + compile", static_len)
            if not args.no_engine:
                measure_engine(model, n, args.reps, static_len)
        except Exception as error:  # a compiler failure must not cost the figures above
            print(f"  static cache + compile failed: {type(error).__name__}: {error}")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    headline("gpu_decode", results[("dynamic cache", min(lengths))])


if __name__ == "__main__":
    main()
