"""A scripted OpenAI-compatible server on loopback: streams the same reply, chunk by chunk, to every chat request.

The web app in remote-backend mode talks to it like to vLLM or LMDeploy, so a test controls exactly what a "model"
writes (hostile Markdown, say) while everything from the HTTP stream to the browser is the real code."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "scripted"}
    body.update({"choices": choices, "usage": usage})
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@contextmanager
def scripted_openai_server(chunks: list[str], delay: float = 0.2) -> Iterator[str]:
    """Serve until the block ends; yields the base URL (…/v1). Each chat request gets `chunks`, `delay` s apart."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self.path.endswith("/chat/completions"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(_chunk({"role": "assistant", "content": ""}))
            for text in chunks:
                time.sleep(delay)
                self.wfile.write(_chunk({"content": text}))
                self.wfile.flush()
            self.wfile.write(_chunk({}, finish="stop"))
            usage = {"prompt_tokens": 5, "completion_tokens": len(chunks), "total_tokens": 5 + len(chunks)}
            self.wfile.write(_chunk({}, usage=usage) + b"data: [DONE]\n\n")
            self.wfile.flush()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
