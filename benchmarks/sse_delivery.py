"""SSE delivery: tokens/s an HTTP client receives from the API's stream ÷ tokens/s in-process; /health under load.

The API runs as it is deployed: `internlm_app.api.create_app` under uvicorn in its own process, on 127.0.0.1 and a free
port, over a ChatEngine. Two models: the tiny fixture (~500 tok/s on a CPU, where generation is mostly Python, so every
bit of per-chunk server work competes with it for the GIL: the worst case) and a larger random Llama on the fixture's
tokenizer (~60 tok/s, most time inside torch ops, closer to a GPU serving a 7B model). The in-process side runs inside
the server process too, on the engine object the API serves (asked over the server's stdin): on this VM, separate
processes running the same engine code measured 1.49 to 2.12 ms per token on the tiny fixture, a gap between processes
that pairing runs cannot cancel. Stop tokens are made unreachable on both sides, so every reply is exactly N tokens
(checked against the usage chunk) and the texts must be equal. Interleaved runs in alternating order (HTTP in-process,
in-process HTTP ...): the HTTP side is a streaming POST /v1/chat/completions (stream true, temperature 0) read with
httpx until `data: [DONE]`, each event's JSON parsed, timed from sending the request; the in-process side is
`engine.stream_reply` consumed to the end in the server process, timed there from the call. Both include prefill; the
ratio is the median of the per-pair ratios (each pair runs back to back, so slow drifts in machine load cancel; target
>= 0.95). The server process's CPU seconds per token (all threads) while serving HTTP and while running in-process are
printed too.

/health latency: GET /health one after another (5 ms apart) on a second connection, while the server is idle and
while a stream is in flight (only requests that both start and end during a stream count), in alternating blocks;
the ratio of the two 95th percentiles is reported (target <= 2). Headline: the lowest delivery ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from common import (
    FIXTURE_DIR,
    ROOT,
    build_random_llama,
    free_port,
    headline,
    interleaved,
    load_engine,
    make_stop_tokens_unreachable,
    median,
    parser,
    set_threads,
    timed,
    tiny_settings,
    verdict,
    workdir,
)

from internlm_app.sampling import SamplingParams

DELIVERY_TARGET, HEALTH_TARGET = 0.95, 2.0
PROMPT = "Tell me a long story about Shanghai and the people who live there."


def serve(port: int, model_path: Path, context_window: int, threads: int) -> None:
    """The server process: the API over an engine on `model_path`, stop tokens unreachable, on 127.0.0.1:port.

    It also runs the in-process side: for each line `N` on stdin it streams N tokens through `engine.stream_reply`
    (the same engine object the API serves, so the same weights, heap and GPU queue) and answers with one JSON line
    on stdout: the text, the wall seconds and the process CPU seconds it took.
    """
    import uvicorn

    from internlm_app.api import create_app

    set_threads(threads)
    parent = os.getppid()

    def exit_with_parent() -> None:  # never outlive a benchmark that was killed (e.g. by a test timeout)
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    def answer_local_runs(engine) -> None:
        messages = [{"role": "user", "content": PROMPT}]
        for line in sys.stdin:
            try:
                params = SamplingParams.greedy_params(int(line))
                cpu, started = time.process_time(), time.perf_counter()
                text = "".join(engine.stream_reply(messages, params))
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                answer = {"text": text, "seconds": seconds, "cpu": cpu}
            except Exception as exc:  # answered, so the benchmark fails instead of waiting for a line forever
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    with workdir("sse-server") as tmp:
        engine = load_engine(Path(tmp), model_path, context_window=context_window)
        make_stop_tokens_unreachable(engine.model, engine.stop_ids)
        threading.Thread(target=answer_local_runs, args=(engine,), daemon=True).start()
        # The engine keeps only the model settings; the API's (and its empty system prompt) are the app's.
        app = create_app(tiny_settings(Path(tmp), model_path, system_prompt=""), backend=engine)
        uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_config=None, log_level="warning")


def start_server(model_path: Path, context_window: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), "--model-path", str(model_path)]
    command += ["--context-window", str(context_window), "--threads", str(threads)]
    server = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the API server exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("model_loaded"):
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the API server did not become ready in 180 s")


def stream_over_http(client: httpx.Client, url: str, tokens: int, on_first=None) -> tuple[str, int]:
    """One streamed chat completion; its text and the completion tokens from the usage chunk."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    parts, completion_tokens = [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            if event.get("usage"):
                completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if content := choice["delta"].get("content"):
                    parts.append(content)
                    if on_first is not None:
                        on_first()
                        on_first = None
    return "".join(parts), completion_tokens


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


class BackgroundStreams:
    """Keeps one streamed reply in flight on its own thread; `active` is set while its text is arriving."""

    def __init__(self, client: httpx.Client, url: str, tokens: int):
        self.client, self.url, self.tokens = client, url, tokens
        self.active = threading.Event()
        self.thread: threading.Thread | None = None

    def ensure(self) -> bool:
        """Start a stream unless one runs; True once its first text has arrived."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        self.active.wait(timeout=0.05)
        return self.active.is_set()

    def _run(self) -> None:
        try:
            stream_over_http(self.client, self.url, self.tokens, on_first=self.active.set)
        finally:
            self.active.clear()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=300)


def health_latencies(url: str, samples: int, streams: BackgroundStreams | None) -> list[float]:
    """Seconds per GET /health; with `streams`, only requests that start and end during a stream count."""
    found: list[float] = []
    with httpx.Client(timeout=10) as probe:
        while len(found) < samples:
            if streams is not None and not streams.ensure():
                continue
            started = time.perf_counter()
            probe.get(url + "/health").raise_for_status()
            seconds = time.perf_counter() - started
            if streams is None or streams.active.is_set():
                found.append(seconds)
            time.sleep(0.005)
    return found


def measure(label: str, model_path: Path, args: argparse.Namespace, context_window: int) -> tuple[float, float]:
    """Delivery ratio and /health p95 ratio for one model."""
    server, url = start_server(model_path, context_window, args.threads)
    try:
        with httpx.Client(timeout=300) as client:
            texts: dict[str, str] = {}
            cpu: dict[str, list[float]] = {"http": [], "client": [], "local": []}

            def over_http() -> float:
                result: list = []
                server_cpu, client_cpu = process_cpu_seconds(server.pid), time.process_time()
                seconds = timed(lambda: result.append(stream_over_http(client, url, args.tokens)))
                cpu["http"].append((process_cpu_seconds(server.pid) - server_cpu) / args.tokens)
                cpu["client"].append((time.process_time() - client_cpu) / args.tokens)
                texts["http"], count = result[0]
                if count != args.tokens:
                    raise RuntimeError(f"expected {args.tokens} tokens over HTTP, the usage says {count}")
                return args.tokens / seconds

            def in_process() -> float:
                server.stdin.write(f"{args.tokens}\n")
                server.stdin.flush()
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError(f"the API server exited with {server.wait(timeout=30)}")
                run = json.loads(line)
                if "error" in run:
                    raise RuntimeError(f"the in-process run in the server failed: {run['error']}")
                texts["local"] = run["text"]
                cpu["local"].append(run["cpu"] / args.tokens)
                return args.tokens / run["seconds"]

            rates = interleaved({"http": over_http, "local": in_process}, args.reps)
            for values in cpu.values():
                del values[: len(values) - args.reps]  # drop the warm-up round
            if texts["http"] != texts["local"]:
                raise RuntimeError("the HTTP stream and the in-process stream gave different texts")
            http, local = median(rates["http"]), median(rates["local"])
            delivery = median([h / loc for h, loc in zip(rates["http"], rates["local"], strict=True)])
            print(f"  {label}, server {url}; texts identical")
            print(
                f"    HTTP client (SSE over loopback) {http:.1f} tok/s, in-process stream_reply {local:.1f} tok/s, "
                f"ratio (median of pairs) {delivery:.3f} ({verdict(delivery, DELIVERY_TARGET, higher_is_better=True)})"
            )
            http_ms, client_ms, local_ms = (median(cpu[k]) * 1e3 for k in ("http", "client", "local"))
            print(
                f"    server process CPU per token (all threads, medians): {http_ms:.2f} ms serving HTTP vs "
                f"{local_ms:.2f} ms in-process: the HTTP path adds {http_ms - local_ms:.2f} ms (+ HTTP client "
                f"{client_ms:.2f} ms in the benchmark process)"
            )
            idle, busy = [], []
            streams = BackgroundStreams(client, url, args.tokens)
            block = max(args.health_samples // 4, 1)
            for _ in range(4):
                idle += health_latencies(url, block, None)
                busy += health_latencies(url, block, streams)
            streams.join()
            health = p95(busy) / p95(idle)
            print(
                f"    /health p95 idle {p95(idle) * 1e3:.2f} ms (median {median(idle) * 1e3:.2f}), during a stream "
                f"{p95(busy) * 1e3:.2f} ms (median {median(busy) * 1e3:.2f}), {len(idle)}+{len(busy)} requests: "
                f"ratio {health:.3f} ({verdict(health, HEALTH_TARGET, higher_is_better=False)})"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    return delivery, health


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--tokens", type=int, default=512, help="tokens per timed reply")
    args_parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per side")
    args_parser.add_argument("--health-samples", type=int, default=200, help="/health requests per condition")
    args_parser.add_argument("--models", default="tiny,llama", help="tiny (fixture) and/or llama (random, larger)")
    args_parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random Llama")
    args_parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    args_parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args_parser.add_argument("--model-path", type=Path, default=FIXTURE_DIR, help=argparse.SUPPRESS)
    args_parser.add_argument("--context-window", type=int, default=0, help=argparse.SUPPRESS)
    args = args_parser.parse_args()
    if args.serve:
        serve(args.serve, args.model_path, args.context_window, args.threads)
        return
    set_threads(args.threads)
    context_window = args.tokens + 64
    print(
        f"sse_delivery: uvicorn in its own process, {args.tokens} tokens per reply, {args.reps} interleaved reps, "
        f"medians, torch threads {args.threads}"
    )
    results = []
    with workdir("sse-models") as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                path, label = FIXTURE_DIR, "tiny InternLM2 fixture"
            else:
                path = build_random_llama(
                    Path(tmp) / "llama",
                    hidden=args.hidden,
                    layers=args.layers,
                )
                label = f"random Llama (hidden {args.hidden}, {args.layers} layers)"
            results.append(measure(label, path, args, context_window))
    delivery, health = min(r[0] for r in results), max(r[1] for r in results)
    print(f"lowest delivery ratio {delivery:.3f} ({verdict(delivery, DELIVERY_TARGET, higher_is_better=True)})")
    print(f"highest /health p95 ratio {health:.3f} ({verdict(health, HEALTH_TARGET, higher_is_better=False)})")
    headline("sse_delivery", delivery)


if __name__ == "__main__":
    main()
