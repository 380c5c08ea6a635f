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

    class Handler(_QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self.path.endswith("/models"):
                self.send_error(404)
                return
            body = json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
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

    with _serving(Handler) as url:
        yield url


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no line on stderr per request
        pass


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port from a thread until the block ends; yields the base URL (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


FAULTS = ("not_json", "not_a_chunk", "html_page", "plain_json", "stalls", "breaks_mid_reply")


@contextmanager
def faulty_openai_server(fault: str) -> Iterator[str]:
    """A server that answers chat requests the way a broken or wrong upstream does (one of FAULTS), and `/models`
    with an HTML page; yields the base URL (…/v1). `stalls` sends one chunk, then nothing for 30 s."""
    assert fault in FAULTS

    class Handler(_QuietHandler):
        def _send(self, content_type: str, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._send("text/html", b"<html><body>a web page, not an API</body></html>")

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if fault == "html_page":
                self._send("text/html", b"<html><body>a web page, not an API</body></html>")
                return
            if fault == "plain_json":
                reply = {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}
                self._send("application/json", json.dumps(reply).encode())
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if fault == "not_json":
                self.wfile.write(b"data: this is not JSON\n\n")
            elif fault == "not_a_chunk":
                self.wfile.write(b'data: {"choices": 5}\n\n')
            else:
                self.wfile.write(_chunk({"role": "assistant", "content": "part"}))
                self.wfile.flush()
                if fault == "stalls":
                    time.sleep(30)
                else:  # breaks_mid_reply: the connection closes in the middle of the reply (no finish reason)
                    self.connection.shutdown(2)
                    return
            self.wfile.flush()

    with _serving(Handler) as url:
        yield url


@contextmanager
def vllm_like_server(window: int, prompt_tokens: int, served: str = "served-name") -> Iterator[str]:
    """A server that serves only `served` and, as vLLM does, refuses a request whose max_tokens exceeds the room
    its prompt (`prompt_tokens`, whatever is sent) leaves in `window`; an accepted reply says the max_tokens it got."""

    class Handler(_QuietHandler):
        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._json(200, {"object": "list", "data": [{"id": served, "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if request["model"] != served:
                self._json(404, {"object": "error", "message": f"The model `{request['model']}` does not exist."})
                return
            if request["max_tokens"] > window - prompt_tokens:
                message = (
                    f"'max_tokens' or 'max_completion_tokens' is too large: {request['max_tokens']}. This model's "
                    f"maximum context length is {window} tokens and your request has {prompt_tokens} input tokens "
                    f"({request['max_tokens']} > {window} - {prompt_tokens})."
                )
                self._json(400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(_chunk({"role": "assistant", "content": f"max_tokens={request['max_tokens']}"}))
            self.wfile.write(_chunk({}, finish="stop") + b"data: [DONE]\n\n")
            self.wfile.flush()

    with _serving(Handler) as url:
        yield url
