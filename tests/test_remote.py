"""RemoteBackend over the official openai client, against this app's API served by uvicorn on loopback."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from internlm_app.api import create_app, running_server
from internlm_app.backends.factory import create_backend
from internlm_app.backends.remote import (
    PROCESS_ID,
    VIA_HEADER,
    RemoteBackend,
    RemoteSetupError,
    _openai_message,
    engine_error,
)
from internlm_app.chat_types import (
    ContextTooLongError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
    ReplyEvents,
    ReplyOptions,
)
from internlm_app.sampling import SamplingParams
from tests.api_helpers import (
    API_KEY,
    REPLY_TOKENS,
    api_settings,
    engine_copy,
    free_all_slots,
    greedy_reply,
    take_all_slots,
    wait_until,
    with_default_system,
)
from tests.fake_openai import FAULTS, faulty_openai_server, vllm_like_server

GREEDY = SamplingParams.greedy_params(REPLY_TOKENS)
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """This app's API on loopback, over a copy of the engine with queue_limit 0 (its own queue), with an API key."""
    settings = api_settings(tmp_path_factory.mktemp("served"), queue_limit=0, api_keys=[API_KEY])
    local = engine_copy(engine, settings)
    with running_server(create_app(settings, backend=local)) as url:
        yield url, local


def _remote(url: str, tmp_path, **overrides) -> RemoteBackend:
    values = {"backend": "openai", "openai_base_url": f"{url}/v1", "openai_model": "internlm2-tiny"}
    values["openai_api_key"] = API_KEY
    return create_backend(api_settings(tmp_path, **{**values, **overrides}))


@pytest.mark.parametrize("prompt", ["你好", "hello", "What is 1+1?"])
def test_greedy_reply_equals_the_engine(served, engine, tmp_path, prompt):
    remote = _remote(served[0], tmp_path)
    assert isinstance(remote, RemoteBackend)
    for messages in (with_default_system(prompt), [{"role": "user", "content": prompt}]):  # no system turn: none
        events = ReplyEvents()
        text = "".join(remote.stream_reply(messages, GREEDY, events=events))
        expected, stats = greedy_reply(engine, messages)
        assert text == expected
        got = events.stats
        assert (got.prompt_tokens, got.completion_tokens) == (stats.prompt_tokens, stats.completion_tokens)
        assert got.finish_reason == stats.finish_reason and got.time_to_first_token is not None
        assert got.tokens_per_second and got.total_seconds > 0 and got.error is None


def test_info_for_the_ui(served, tmp_path):
    remote = _remote(served[0], tmp_path, max_length=4096)
    assert remote.info.name == "internlm2-tiny" and remote.info.device == "remote"
    assert remote.info.extra == {
        "backend": "openai",
        "base_url": f"{served[0]}/v1",
        "served_models": ["internlm2-tiny"],
    }
    assert remote.context_window == 4096 and remote.queue is None


def test_the_model_shown_and_asked_for_is_what_the_server_serves(served, engine, tmp_path):
    remote = _remote(served[0], tmp_path, openai_model="internlm2-chat-7b")  # the default name; the server differs
    assert remote.info.name == remote.model == "internlm2-tiny"
    assert "".join(remote.stream_reply([{"role": "user", "content": "hi"}], GREEDY))
    unreachable = _remote("http://127.0.0.1:9", tmp_path, openai_model="configured")
    assert unreachable.info.name == "configured" and "served_models" not in unreachable.info.extra


def test_cancel_and_close_stop_the_remote_generation(engine, tmp_path):
    settings = api_settings(tmp_path)
    endless = engine_copy(engine, settings, endless=True)
    long = SamplingParams.greedy_params(450)
    with running_server(create_app(settings, backend=endless)) as url:
        remote = _remote(url, tmp_path, openai_api_key="EMPTY")
        cancel, events = threading.Event(), ReplyEvents()
        stream = remote.stream_reply([{"role": "user", "content": "hello"}], long, cancel=cancel, events=events)
        next(stream)
        cancel.set()
        list(stream)
        assert events.stats.finish_reason == "cancelled" and events.stats.completion_tokens < 450
        assert wait_until(lambda: endless.queue.active == 0, timeout=30)

        events = ReplyEvents()
        stream = remote.stream_reply([{"role": "user", "content": "hello"}], long, events=events)
        next(stream)
        assert endless.queue.active == 1
        stream.close()
        assert events.stats.finish_reason == "cancelled"
        assert wait_until(lambda: endless.queue.active == 0, timeout=30)
    assert wait_until(lambda: remote.active_requests == 0, timeout=30)


def _generated(url: str) -> float:
    """Tokens the server has generated so far (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith("internlm_completion_tokens_total"))
    )


@pytest.mark.parametrize("how", ["close", "collect"])
def test_a_reply_dropped_by_its_reader_stops_on_the_server(engine, tmp_path, how):
    # Closing the iterator (a page rerun, an API client gone) or dropping it must end the request, not leave the
    # server generating to max_tokens for nobody.
    import gc

    settings = api_settings(tmp_path)
    endless = engine_copy(engine, settings, endless=True)
    paced = SamplingParams.greedy_params(400)
    endless.model.register_forward_pre_hook(lambda *_: time.sleep(0.005))  # ~2 s for the whole reply
    with running_server(create_app(settings, backend=endless)) as url:
        remote = _remote(url, tmp_path, openai_api_key="EMPTY")
        stream = remote.stream_reply([{"role": "user", "content": "hello"}], paced, events=ReplyEvents())
        next(stream)
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
        assert wait_until(lambda: remote.active_requests == 0, timeout=30)
        assert wait_until(lambda: endless.queue.active == 0, timeout=30)
        assert _generated(url) < 200  # stopped early, not the 400 asked for


def test_cancel_while_the_server_queues_the_request(engine, tmp_path):
    # The server sends no response headers while the request waits for its GPU: the client blocks in its first read,
    # so a cancel has to end that read rather than wait for a chunk that would come when the GPU is free.
    settings = api_settings(tmp_path)  # queue_limit 16: a request waits while the GPU is busy
    local = engine_copy(engine, settings)
    with running_server(create_app(settings, backend=local)) as url:
        remote = _remote(url, tmp_path, openai_api_key="EMPTY")
        messages = [{"role": "user", "content": "hello"}]
        cancel, events, outcome = threading.Event(), ReplyEvents(), {}
        stream = remote.stream_reply(messages, GREEDY, cancel=cancel, events=events)

        def consume() -> None:
            try:
                outcome["chunks"] = list(stream)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome["error"] = exc

        take_all_slots(local)  # the GPU is busy with other replies
        try:
            consumer = threading.Thread(target=consume, daemon=True)
            consumer.start()
            assert wait_until(lambda: local.queue.waiting() == 1, timeout=30)  # the request waits on the server
            cancel.set()
            consumer.join(timeout=30)  # generous: only turns a read that is never woken into a failure
            assert not consumer.is_alive(), "the cancel was not noticed while the server queued the request"
            assert outcome == {"chunks": []}
            assert events.stats.finish_reason == "cancelled" and events.stats.completion_tokens == 0
            assert events.stats.error is None
            assert wait_until(lambda: remote.active_requests == 0, timeout=30)  # the reply's task ended too
            assert wait_until(lambda: local.queue.waiting() == 0, timeout=30)  # the server saw the client go
        finally:
            free_all_slots(local)
        events = ReplyEvents()
        assert "".join(remote.stream_reply(messages, GREEDY, events=events)) == greedy_reply(engine, messages)[0]
        assert events.stats.finish_reason in {"stop", "length"}


def test_bad_messages_fail_before_any_request(tmp_path):
    remote = _remote("http://127.0.0.1:9", tmp_path)  # nothing listens there; no request is made
    for messages in ([], [{"role": "assistant", "content": "hi"}], [{"role": "robot", "content": "hi"}]):
        with pytest.raises(InvalidRequestError):
            remote.stream_reply(messages, GREEDY)


def test_server_errors_map_to_engine_errors(served, tmp_path):
    url, local = served
    remote = _remote(url, tmp_path)
    with pytest.raises(ContextTooLongError) as info:
        list(remote.stream_reply([{"role": "user", "content": "你好 世界 " * 400}], GREEDY))
    assert info.value.limit == 512 and info.value.needed > 512 and info.value.status == 400
    take_all_slots(local)
    try:
        events = ReplyEvents()
        with pytest.raises(QueueFullError):
            list(remote.stream_reply([{"role": "user", "content": "hi"}], GREEDY, events=events))
        assert events.stats.finish_reason == "error" and "busy" in events.stats.error
    finally:
        free_all_slots(local)
    with pytest.raises(GenerationError, match="refused the key"):
        list(_remote(url, tmp_path, openai_api_key="wrong").stream_reply([{"role": "user", "content": "hi"}], GREEDY))


def test_unreachable_server_is_a_generation_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens on it
    remote = _remote(f"http://127.0.0.1:{port}", tmp_path)
    with pytest.raises(GenerationError, match="cannot reach"):
        list(remote.stream_reply([{"role": "user", "content": "hi"}], GREEDY))


@pytest.mark.parametrize(
    "message, prompt_fits",
    [
        (
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
            "messages).",
            True,
        ),
        (
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4500 in the "
            "messages).",
            False,
        ),
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 1024. This model's maximum context length is 2048 "
            "tokens and your request has 1500 input tokens (1024 > 2048 - 1500).",
            True,
        ),
        (
            "This model's maximum context length is 2048 tokens. However, you requested 1024 output tokens and your "
            "prompt contains 4000 input tokens, for a total of 5024 tokens.",
            False,
        ),
    ],
)
def test_vllm_style_context_errors_say_whether_the_prompt_or_max_tokens_is_too_big(message, prompt_fits):
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    exc = openai.BadRequestError(message, response=httpx.Response(400, request=request), body={"message": message})
    error = engine_error(exc, "http://x/v1")
    if prompt_fits:  # never "the prompt needs ... -548 tokens too many"
        assert not isinstance(error, ContextTooLongError) and error.param == "max_tokens"
    else:
        assert isinstance(error, ContextTooLongError) and error.needed > error.limit and "-" not in str(error)


def test_max_tokens_beyond_the_servers_room_is_capped_and_a_late_server_is_asked_what_it_serves(tmp_path):
    with vllm_like_server(window=2048, prompt_tokens=1500) as url:
        # Built directly: as when the server was not up at load, nothing was discovered (the configured name is
        # one the server refuses).
        remote = RemoteBackend(api_settings(tmp_path, backend="openai", openai_base_url=url))
        text = "".join(remote.stream_reply([{"role": "user", "content": "hi"}], SamplingParams.greedy_params(1024)))
        assert text == "max_tokens=548" and remote.model == "served-name"  # 2048 - 1500, as the engine caps it


def test_the_api_can_serve_a_remote_backend(served, engine, tmp_path):
    remote = _remote(served[0], tmp_path)
    with TestClient(create_app(api_settings(tmp_path), backend=remote)) as proxy:
        body = proxy.post("/", json={"prompt": "你好", "temperature": 0, "max_new_tokens": REPLY_TOKENS}).json()
        assert body["response"] == greedy_reply(engine, with_default_system("你好"))[0]
        health = proxy.get("/health").json()
        assert health["backend"] == "openai" and health["device"] == "remote" and health["queue"] is None


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_upstream_reply_is_a_generation_error_that_says_what_happened(tmp_path, fault):
    expected = {
        "not_json": "not an OpenAI-compatible chat stream",
        "not_a_chunk": "not an OpenAI-compatible chat stream",
        "html_page": "not an OpenAI-compatible chat stream",
        "plain_json": "not an OpenAI-compatible chat stream",
        "stalls": r"sent nothing for 0.5 s \(INTERNLM_OPENAI_TIMEOUT\)",
        "breaks_mid_reply": "stopped sending before the reply's end",
    }[fault]
    with faulty_openai_server(fault) as url:
        remote = RemoteBackend(api_settings(tmp_path, backend="openai", openai_base_url=url, openai_timeout=0.5))
        events = ReplyEvents()
        started = time.monotonic()
        with pytest.raises(GenerationError, match=expected):  # never an empty reply that "succeeded", never a 500
            list(remote.stream_reply([{"role": "user", "content": "hi"}], GREEDY, events=events))
        assert events.stats.finish_reason == "error" and time.monotonic() - started < 10
        with TestClient(create_app(api_settings(tmp_path), backend=remote)) as proxy:  # the API says it as JSON
            response = proxy.post(CHAT_PATH, json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code in (502, 503) and re.search(expected, response.json()["error"]["message"])


def test_a_base_url_that_is_not_an_openai_api_fails_the_load_with_what_to_set(tmp_path):
    with faulty_openai_server("html_page") as url, pytest.raises(RemoteSetupError, match="ends in /v1") as info:
        _remote(url.removesuffix("/v1"), tmp_path)
    assert info.value.reason == "remote_misconfigured"


def test_a_server_whose_backend_points_at_itself_refuses_its_own_requests(engine, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = api_settings(tmp_path, backend="openai", openai_base_url=f"http://127.0.0.1:{port}/v1")
    looping = RemoteBackend(settings)  # built directly: nothing listens on the port yet
    with running_server(create_app(settings, backend=looping), port=port):
        with pytest.raises(RemoteSetupError, match="points at this server itself"):
            looping.discover_model()
        with pytest.raises(GenerationError, match="points at this server itself"):
            list(looping.stream_reply([{"role": "user", "content": "hi"}], GREEDY))
    # A server that answers locally never refuses a remote backend of the same process (the tests' own setup).
    with TestClient(create_app(api_settings(tmp_path), backend=engine)) as client:
        response = client.get("/v1/models", headers={VIA_HEADER: PROCESS_ID})
        assert response.status_code == 200


def test_remote_refusals_name_the_field_and_messages_are_sent_in_openais_form(tmp_path):
    remote = _remote("http://127.0.0.1:9", tmp_path)  # nothing listens there; no request is made
    hi = [{"role": "user", "content": "hi"}]
    for options, param in [
        (ReplyOptions(tools=True), "tools"),
        (ReplyOptions(json_schema={"type": "object"}), "response_format"),
        (ReplyOptions(seed=1), "seed"),
        (ReplyOptions(logprobs=2), "logprobs"),
        (ReplyOptions(presence_penalty=0.5), "presence_penalty"),
        (ReplyOptions(frequency_penalty=0.5), "frequency_penalty"),
        (ReplyOptions(raw_prompt=True), "prompt"),
    ]:
        with pytest.raises(InvalidRequestError) as info:
            remote.stream_chunks(hi, GREEDY, options)
        assert info.value.param == param and str(info.value).startswith(f"{param}: ")
    with pytest.raises(InvalidRequestError, match="tool calls and tool results need the local model"):
        remote.stream_reply([*hi, {"role": "assistant", "content": "", "tool_calls": [{}]}, *hi], GREEDY)
    assert _openai_message({"role": "user", "content": "hi", "speaker": "alice"}) == {
        "role": "user",
        "content": "hi",
        "name": "alice",
    }


def test_doctor_checks_the_remote_model_server_instead_of_the_gpu_and_the_model_files(served, tmp_path):
    from internlm_app.doctor import doctor_report, format_report

    def problems(url: str, **overrides) -> dict:
        settings = api_settings(tmp_path, backend="openai", openai_base_url=url, **overrides)
        return {p.key: p for p in doctor_report(settings.model)["problems"]}

    url = f"{served[0]}/v1"
    report = doctor_report(api_settings(tmp_path, backend="openai", openai_base_url=url, openai_api_key=API_KEY))
    assert report["problems"] == [] and report["remote"]["served_models"] == ["internlm2-tiny"]
    assert "remote: base_url=" in format_report(report) and "model server" in report["decoding"]
    assert set(problems(url, openai_api_key="wrong")) == {"remote_key_refused"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    assert set(problems(closed)) == {"remote_unreachable"}  # no "no GPU", no "not downloaded"
    with faulty_openai_server("html_page") as page:
        assert set(problems(page)) == {"remote_misconfigured"}


def test_health_says_unavailable_while_the_model_server_is_down(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    remote = RemoteBackend(api_settings(tmp_path, backend="openai", openai_base_url=closed))
    with TestClient(create_app(api_settings(tmp_path, api_keys=[API_KEY]), backend=remote)) as proxy:
        health = proxy.get("/health", headers={"Authorization": f"Bearer {API_KEY}"})
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "cannot reach the model server" in health.json()["error"]
        assert proxy.get("/health").json() == {"status": "unavailable", "model_loaded": True}  # no key: no details
