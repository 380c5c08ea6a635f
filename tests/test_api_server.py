"""The API under a real uvicorn server on 127.0.0.1: tutorial clients, the openai client, concurrency, disconnects."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest
import requests

from internlm_app.api import create_app, running_server
from tests.api_helpers import (
    REPLY_TOKENS,
    api_settings,
    engine_copy,
    free_all_slots,
    greedy_reply,
    raw_request,
    read_until,
    sse_events,
    take_all_slots,
    wait_until,
    with_default_system,
)

CHAT = "/v1/chat/completions"
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # the classic reply's "time"
T = TypeVar("T")
PROMPTS = ["hello", "你好", "What is 1+1?", "tell me a story", "hi", "abc", "书生浦语", "Write a poem"]


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    with running_server(create_app(api_settings(tmp_path_factory.mktemp("server")), backend=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def endless(engine, tmp_path_factory):
    """A server whose replies never stop early (always max tokens): long enough to disconnect in the middle."""
    settings = api_settings(tmp_path_factory.mktemp("endless"))
    slow = engine_copy(engine, settings, endless=True)
    with running_server(create_app(settings, backend=slow)) as url:
        yield url, slow


def test_tutorial_requests_snippet(server, engine):
    # The tutorial's client, unchanged apart from the URL.
    def get_completion(prompt):
        headers = {"Content-Type": "application/json"}
        data = {"prompt": prompt}
        response = requests.post(url=server, headers=headers, data=json.dumps(data))
        return response.json()["response"]

    reply = _one_sampled_reply(server, lambda: get_completion("你好"), REPLY_TOKENS)  # with the server's defaults
    assert isinstance(reply, str)  # sampled: its text is not known, its tokens and its end are (above)
    body = requests.post(server, json={"prompt": "你好", "temperature": 0}).json()
    assert body["status"] == 200 and body["response"] == greedy_reply(engine, with_default_system("你好"))[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_tutorial_curl_command(server):
    command = ["curl", "-s", "-X", "POST", server, "-H", "Content-Type: application/json", "-d", '{"prompt": "你好"}']
    run = partial(subprocess.run, command, capture_output=True, check=True, timeout=30)
    body = _one_sampled_reply(server, lambda: json.loads(run().stdout), REPLY_TOKENS)  # with the server's defaults
    assert body["status"] == 200 and body["history"] == [["你好", body["response"]]] and TIME.fullmatch(body["time"])


def test_official_openai_client(server, engine):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0)
    assert [m.id for m in client.models.list()] == ["internlm2-tiny"]
    messages = [{"role": "user", "content": "你好"}]
    expected, stats = greedy_reply(engine, with_default_system("你好"))
    completion = client.chat.completions.create(
        model="internlm2-tiny", messages=messages, temperature=0, max_tokens=REPLY_TOKENS
    )
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == stats.finish_reason
    assert completion.usage.prompt_tokens == stats.prompt_tokens
    stream = client.chat.completions.create(
        model="internlm2-tiny",
        messages=messages,
        temperature=0,
        max_tokens=REPLY_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == stats.completion_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "system", "content": "hi"}])
    assert "must end with a user message" in info.value.message


def _stream_text(url: str, prompt: str) -> str:
    request = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}{CHAT}", json={**request, "max_tokens": 48}, timeout=60) as response:
        assert response.status_code == 200
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])


def test_eight_concurrent_streaming_clients(server, engine):
    expected = {p: greedy_reply(engine, with_default_system(p), 48)[0] for p in PROMPTS}
    barrier = threading.Barrier(len(PROMPTS))

    def run(prompt: str) -> str:
        barrier.wait()
        return _stream_text(server, prompt)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = dict(zip(PROMPTS, pool.map(run, PROMPTS), strict=True))
    assert results == expected
    assert engine.queue.active == 0 and engine.queue.waiting() == 0


CANCELLED = 'internlm_replies_total{finish_reason="cancelled"}'
LENGTH = 'internlm_replies_total{finish_reason="length"}'
TOKENS = "internlm_completion_tokens_total"
REPLIES = "internlm_replies_total"
FINISH_REASONS = ("stop", "length", "cancelled", "error")


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def _finished(text: str) -> dict[str, float]:
    """Replies by how they ended, from a /metrics text."""
    return {reason: _metric(text, f'{REPLIES}{{finish_reason="{reason}"}}') for reason in FINISH_REASONS}


def _one_sampled_reply(url: str, send: Callable[[], T], max_tokens: int) -> T:
    """What `send()` returns, once /metrics of the server at `url` shows what is known of the one sampled classic
    reply it asked for (recorded before its response is sent): 1 to `max_tokens` tokens, ended by a stop token or at
    `max_tokens`."""
    before = _metrics(url)
    result = send()
    after = _metrics(url)
    ended = [reason for reason, n in _finished(after).items() if n != _finished(before)[reason]]
    tokens = _metric(after, TOKENS) - _metric(before, TOKENS)
    assert sum(_finished(after).values()) == sum(_finished(before).values()) + 1, ended  # one reply
    assert (ended == ["stop"] and 1 <= tokens <= max_tokens) or (ended == ["length"] and tokens == max_tokens), tokens
    return result


def test_health_and_metrics_answer_while_a_reply_streams(endless):
    url, slow = endless
    request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 400, "stream": True}
    with raw_request(url, CHAT, request) as sock:
        read_until(sock, b"data: ")
        assert slow.queue.active == 1
        health = httpx.get(f"{url}/health", timeout=30).json()
        metrics = httpx.get(f"{url}/metrics", timeout=30)
        # Both were answered while the reply was still being generated, i.e. before its last chunk (not queued
        # behind it): each saw the generation running.
        assert health["queue"]["active"] == 1 and health["queue"]["slots"] == slow.queue.slots
        assert metrics.status_code == 200 and _metric(metrics.text, "internlm_generation_busy") == 1
        rest = read_until(sock, b"data: [DONE]")  # and the reply went on to its end, undisturbed
        assert b"[DONE]" in rest and b'"finish_reason":"length"' in rest.replace(b" ", b"")
    assert wait_until(lambda: slow.queue.active == 0, timeout=30)
    done = _metric(metrics.text, LENGTH) + 1  # recorded once the response ended: wait, so that no later test sees it
    assert wait_until(lambda: _metric(_metrics(url), LENGTH) == done, timeout=30)


@pytest.mark.parametrize("path", [CHAT, "/"])
def test_disconnect_mid_reply_frees_the_lock(endless, path):
    url, slow = endless
    before = _metrics(url)
    request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 450, "stream": True}
    if path == "/":  # not streamed: the server notices the closed connection while it generates
        request = {"prompt": "hello", "max_new_tokens": 450}
    with raw_request(url, path, request) as sock:
        if path == CHAT:
            assert b"data: " in read_until(sock, b"data: ")
        assert wait_until(lambda: slow.queue.active == 1, timeout=30)
    # The deadlines only turn a hang into a failure; that the disconnect, not the reply's end, freed the GPU shows
    # in the reply: recorded as cancelled, with fewer tokens than the 450 it would have run to.
    assert wait_until(lambda: slow.queue.active == 0, timeout=30)
    assert wait_until(lambda: _metric(_metrics(url), CANCELLED) == _metric(before, CANCELLED) + 1, timeout=30)
    assert _metric(_metrics(url), TOKENS) - _metric(before, TOKENS) < 450
    gone = f'internlm_requests_total{{endpoint="{path}",status="499"}}'  # not 200: nobody read the answer
    assert wait_until(lambda: _metric(_metrics(url), gone) == _metric(before, gone) + 1, timeout=30)
    response = httpx.post(url, json={"prompt": "hi", "max_new_tokens": 2}, timeout=30)
    assert response.status_code == 200 and response.json()["status"] == 200


@pytest.mark.parametrize("path", ["/", CHAT])
def test_disconnect_while_queued_leaves_the_queue(endless, path):
    url, slow = endless
    body = {"prompt": "hi"} if path == "/" else {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    before = _metric(_metrics(url), CANCELLED)
    take_all_slots(slow)
    try:
        with raw_request(url, path, body):
            assert wait_until(lambda: slow.queue.waiting() == 1, timeout=30)
        assert wait_until(lambda: slow.queue.waiting() == 0, timeout=30)  # left the line while the GPU was still held
    finally:
        free_all_slots(slow)
    assert wait_until(lambda: _metric(_metrics(url), CANCELLED) == before + 1, timeout=30)
    assert httpx.post(url, json={"prompt": "hi", "max_new_tokens": 2}, timeout=30).status_code == 200


def test_cli_defaults_to_all_interfaces_on_6006(monkeypatch):
    from pydantic_settings import get_subcommand

    from internlm_app.cli import _settings, parse

    monkeypatch.delenv("INTERNLM_HOST", raising=False)
    monkeypatch.delenv("INTERNLM_PORT", raising=False)
    settings = _settings(get_subcommand(parse(["api"])))
    assert (settings.host, settings.port) == ("0.0.0.0", 6006)


@pytest.mark.parametrize("subcommand", ["api", "serve"])
def test_python_m_internlm_app_serves(subcommand, fixture_dir, tmp_path):
    """The README's commands as users type them: `api` (the API alone) and `serve` (the web app and the API on one
    port), flags read by the real CLI, the model loaded by the default loader."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "internlm_app", subcommand, "--model-path", str(fixture_dir), "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    try:
        url = f"http://127.0.0.1:{port}"

        def loaded() -> bool:  # `serve` answers /health at once, with the load's progress until the model is in
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                return health.status_code == 200 and health.json()["model_loaded"]
            except httpx.HTTPError:
                return process.poll() is not None  # stop waiting if it died

        assert wait_until(loaded, timeout=90, interval=0.2) and process.poll() is None, log_path.read_text()
        send = partial(httpx.post, url, json={"prompt": "你好", "max_new_tokens": 4}, timeout=30)
        body = _one_sampled_reply(url, lambda: send().json(), 4)
        assert body["status"] == 200 and body["history"] == [["你好", body["response"]]]
        if subcommand == "serve":  # the web app on the same port
            page = httpx.get(url, timeout=30)
            assert page.status_code == 200 and "<title>Streamlit</title>" in page.text, page.text[:300]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert re.search(r"POST / 200 \d+ms prompt_tokens=\d+ completion_tokens=\d+", log_path.read_text())


def test_a_short_or_stalled_body_is_a_4xx_without_a_traceback(engine, tmp_path, caplog, monkeypatch):
    from internlm_app.api import middleware

    monkeypatch.setattr(middleware, "BODY_READ_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="internlm_app.api")
    settings = api_settings(tmp_path)
    with running_server(create_app(settings, backend=engine)) as url:
        host, port = url.removeprefix("http://").split(":")
        head = f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=30) as sock:  # stalls after 10 of 100 bytes
            sock.sendall(head.encode() + b'{"message')
            assert b" 408 " in read_until(sock, b"\r\n\r\n").split(b"\r\n")[0] + b" "
        with socket.create_connection((host, int(port)), timeout=30) as sock:  # goes away after 10 of 100 bytes
            sock.sendall(head.encode() + b'{"message')
        assert wait_until(lambda: "POST /v1/chat/completions 400" in caplog.text, timeout=30), caplog.text
    assert "POST /v1/chat/completions 408" in caplog.text
    assert "Traceback" not in caplog.text and " 500 " not in caplog.text


@pytest.mark.parametrize("page_path", ["/docs", "/redoc"])
def test_api_docs_render_without_internet(server, page_path):
    """Swagger UI and ReDoc load every asset from this server: with every other host blocked, the docs render."""
    from tests.browser_helpers import chromium

    outside: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with chromium() as browser:
        page = browser.new_page()
        page.route("**/*", only_this_server)
        page.goto(f"{server}{page_path}")
        title = ".swagger-ui .info .title" if page_path == "/docs" else "h1"
        page.wait_for_selector(title, timeout=30_000)
        assert "InternLM2 Chat API" in page.locator(title).first.inner_text()
        page.close()
    # Only ReDoc's "powered by" badge image points outside (blocked here, the page does not need it).
    assert not [url for url in outside if not url.startswith("https://cdn.redoc.ly/redoc/logo")], outside


def test_a_stream_open_at_shutdown_ends_with_an_error_event_and_done(tmp_path):
    """SIGTERM while a reply streams: the stream used to be cut after about a second, mid-reply, with no error and
    no [DONE] (the client saw a broken connection). Now the reply stops at its next token and the stream says why,
    then [DONE], before the server exits."""
    from tests.browser_helpers import free_port, tiny_model_env

    port = free_port()
    env = tiny_model_env(tmp_path, BROWSER_TEST_TOKEN_DELAY="0.05", INTERNLM_HOST="127.0.0.1", INTERNLM_PORT=str(port))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "tests/one_port_server.py"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1],
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def loaded() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).json().get("model_loaded") is True
            except (httpx.HTTPError, ValueError):
                return process.poll() is not None

        assert wait_until(loaded, timeout=90, interval=0.2) and process.poll() is None, log_path.read_text()
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 400, "temperature": 0, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{url}{CHAT}", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:  # streaming (at 20 tokens a second, 20 s to go): stop the server
                        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # (uvicorn re-raises the signal once it is done)
    finally:
        if process.poll() is None:
            process.kill()
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
    finishes = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert set(finishes) == {None}  # the cut reply never claims to have ended
    assert len(events) < 100  # it did not run to its end first
