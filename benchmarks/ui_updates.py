"""Web UI updates per second while a reply streams, at token rates from 50/s to as fast as Python can yield.

The web app's own reply path is driven: `internlm_app.web.reply.WebReply` (the reply object the chat page runs) with
its `throttled_text` helper, a real SQLite ConversationStore (periodic saves included), and a `show` callback that
does what the page's does apart from the Streamlit call: `to_markdown(text) + CURSOR`, noting the time. Token sources,
each behind the ChatBackend seam: a paced source yielding one word per token at a set rate (sleep or spin until
each deadline; "max" yields without pausing), and the real engine on the tiny fixture (its stop tokens made
unreachable, so it streams at the model's full rate for the whole reply). For each: the updates per second over the
stream, and the busiest second (most updates in any 1 s window); the one extra update that shows the complete text
after the stream ends is counted apart. Headline: the busiest second over all sources. Target <= 20 per second.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import headline, load_engine, make_stop_tokens_unreachable, parser, set_threads, verdict, workdir

from internlm_app.chat_types import ReplyEvents
from internlm_app.sampling import SamplingParams
from internlm_app.store.db import ConversationStore
from internlm_app.web.render import CURSOR, to_markdown
from internlm_app.web.reply import ReplyView, WebReply

TARGET = 20
WORDS = ["Shang", "hai ", "is ", "a ", "city ", "by ", "the ", "sea", ", ", "and ", "its ", "\\(x^2\\) ", "view ", "\n"]


class PacedBackend:
    """A ChatBackend that yields one word per token at `rate` tokens/s (None: no pause) for `seconds`."""

    def __init__(self, rate: float | None, seconds: float):
        self.rate, self.seconds = rate, seconds
        self.ended = 0.0

    def stream_reply(self, messages, params, *, cancel=None, events: ReplyEvents | None = None, max_length=None):
        return self._stream(events or ReplyEvents())

    def _stream(self, events: ReplyEvents):
        start = time.perf_counter()
        count = 0
        while (now := time.perf_counter()) - start < self.seconds:
            if self.rate is not None:
                deadline = start + count / self.rate
                if deadline - now > 0.002:
                    time.sleep(deadline - now - 0.001)
                while time.perf_counter() < deadline:
                    pass
            yield WORDS[count % len(WORDS)]
            count += 1
        self.ended = time.perf_counter()
        events.stats.completion_tokens, events.stats.finish_reason = count, "length"


class TimedBackend:
    """Wraps a backend to note when its stream ends (so the final complete-text update can be told apart)."""

    def __init__(self, backend):
        self.backend, self.ended = backend, 0.0

    def stream_reply(self, messages, params, *, cancel=None, events: ReplyEvents | None = None, max_length=None):
        chunks = self.backend.stream_reply(messages, params, cancel=cancel, events=events, max_length=max_length)
        return self._stream(chunks)

    def _stream(self, chunks):
        yield from chunks
        self.ended = time.perf_counter()


def busiest_second(stamps: list[float]) -> int:
    """Most timestamps in any half-open window of one second."""
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def measure(backend, store: ConversationStore, max_new_tokens: int) -> dict:
    """Stream one reply through WebReply.run; update figures."""
    cid = store.create_conversation("")
    store.add_message(cid, "user", "Tell me about Shanghai.")
    stamps: list[float] = []

    def show(text: str) -> None:
        _ = to_markdown(text) + CURSOR  # the page's own work per update; Streamlit would draw this string
        stamps.append(time.perf_counter())

    started = time.perf_counter()
    outcome = WebReply(backend, store, cid, SamplingParams.greedy_params(max_new_tokens)).run(ReplyView(show=show))
    if outcome.status != "complete":  # WebReply keeps an error in the store: here it must end the benchmark
        raise RuntimeError(f"the reply did not complete ({outcome.status}): {outcome.stats.error}")
    streaming = [t for t in stamps if t <= backend.ended]
    seconds = backend.ended - started
    return {
        "tokens": outcome.stats.completion_tokens,
        "seconds": seconds,
        "updates": len(streaming),
        "final": len(stamps) - len(streaming),
        "per_second": len(streaming) / seconds,
        "busiest": busiest_second(streaming),
    }


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--rates", default="50,200,1000,10000,max", help="paced token rates (max: no pause)")
    args_parser.add_argument("--seconds", type=float, default=3.0, help="length of each paced reply")
    args_parser.add_argument(
        "--engine-tokens", type=int, default=2048, help="tokens of the real-engine reply (0: skip)"
    )
    args = args_parser.parse_args()
    set_threads(args.threads)
    print("ui_updates: web.reply.WebReply + throttled_text, real store, show = to_markdown + cursor")
    worst = 0
    with workdir("ui") as tmp:
        store = ConversationStore(Path(tmp) / "conversations.db")
        sources: list[tuple[str, object, int]] = []
        for rate in args.rates.split(","):
            paced = PacedBackend(None if rate == "max" else float(rate), args.seconds)
            sources.append((f"paced {rate} tok/s", paced, 8192))
        if args.engine_tokens:
            engine = load_engine(Path(tmp), context_window=args.engine_tokens + 64)
            print("  " + make_stop_tokens_unreachable(engine.model, engine.stop_ids))
            sources.append(("real engine, tiny fixture", TimedBackend(engine), args.engine_tokens))
        for label, backend, max_new_tokens in sources:
            m = measure(backend, store, max_new_tokens)
            worst = max(worst, m["busiest"])
            print(
                f"  {label:>26}: {m['tokens'] / m['seconds']:9.0f} tok/s delivered, {m['updates']} updates in "
                f"{m['seconds']:.2f} s = {m['per_second']:.1f}/s, busiest second {m['busiest']} "
                f"(+{m['final']} final update with the complete text)"
            )
        store.close()
    print(f"busiest second over all sources: {worst} updates ({verdict(worst, TARGET, higher_is_better=False)})")
    headline("ui_updates", float(worst))


if __name__ == "__main__":
    main()
