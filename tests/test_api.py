"""The HTTP API in process (FastAPI TestClient) on the real tiny model: contracts, defaults, metrics, auth, logs."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest
from fastapi.testclient import TestClient

from internlm_app.api import create_app
from internlm_app.api.openai_common import ResponseIds, sse_data
from internlm_app.api.openai_requests import ChatCompletionRequest
from internlm_app.api.routes_openai import _chunk, _ContentChunks
from internlm_app.chat_types import InvalidRequestError
from internlm_app.runtime.stop_strings import StopFilter
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT
from tests.api_helpers import (
    API_KEY,
    REPLY_TOKENS,
    api_settings,
    engine_copy,
    free_all_slots,
    greedy_reply,
    sse_events,
    take_all_slots,
    with_default_system,
)
from tests.faults import FailOnForward

CHAT = "/v1/chat/completions"
TOKENS = "internlm_completion_tokens_total"


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    app = create_app(api_settings(tmp_path_factory.mktemp("api")), backend=engine)
    with TestClient(app) as client:
        yield client


def _chat(client, messages, **fields):
    response = client.post(CHAT, json={"model": "internlm2-tiny", "messages": messages, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_classic_contract_is_the_tutorials(client, engine):
    response = client.post("/", json={"prompt": "你好", "temperature": 0})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    expected, _ = greedy_reply(engine, with_default_system("你好"))  # the default system prompt, greedy
    assert body["response"] == expected
    assert body["history"] == [["你好", expected]]


def test_classic_history_and_system(client, engine):
    history = [["hello", "hi there"], ["what is AI", "artificial intelligence"]]
    body = client.post("/", json={"prompt": "tell me more", "history": history, "temperature": 0}).json()
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    expected, _ = greedy_reply(engine, [*messages, {"role": "user", "content": "tell me more"}])
    assert body["response"] == expected and body["history"] == [*history, ["tell me more", expected]]

    no_system = client.post("/", json={"prompt": "hello", "system": "", "temperature": 0}).json()
    assert no_system["response"] == greedy_reply(engine, [{"role": "user", "content": "hello"}])[0]
    custom = client.post("/", json={"prompt": "hello", "system": "be brief", "temperature": 0}).json()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert custom["response"] == greedy_reply(engine, messages)[0]


def test_classic_sampling_fields_and_lenient_content_type(client):
    body = {"prompt": "hi", "temperature": 1.2, "top_p": 0.9, "top_k": 20, "max_new_tokens": 5, "unknown": 1}
    before = client.get("/metrics").text
    response = client.post("/", json=body)
    tokens = _metric(client.get("/metrics").text, TOKENS) - _metric(before, TOKENS)  # recorded before the response
    assert response.status_code == 200 and response.json()["history"] == [["hi", response.json()["response"]]]
    assert 1 <= tokens <= 5  # sampled: its text is not known, its length is (max_new_tokens)
    form_typed = client.post(
        "/",
        content=b'{"prompt": "hi", "max_new_tokens": 3}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form_typed.status_code == 200  # curl -d without -H still works


def test_get_root_explains_how_to_call(client):
    response = client.get("/")
    assert response.status_code == 200
    body = response.json()
    assert body["example_request"]["prompt"] and "curl -X POST" in body["curl"]
    assert "/v1/chat/completions" in body["openai_compatible"] and "prompt" in body["fields"]


@pytest.mark.parametrize("prompt", ["hello", "你好", "What is 1+1?"])
def test_openai_greedy_equals_engine(client, engine, prompt):
    body = _chat(client, [{"role": "user", "content": prompt}], max_tokens=REPLY_TOKENS)
    text, stats = greedy_reply(engine, with_default_system(prompt))
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == "internlm2-tiny"
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == stats.finish_reason
    assert body["usage"] == {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": body["usage"]["prompt_tokens_details"]["cached_tokens"]},
    }
    assert 0 <= body["usage"]["prompt_tokens_details"]["cached_tokens"] < stats.prompt_tokens


def test_openai_system_handling(client, engine):
    user = {"role": "user", "content": "hello"}
    assert (
        _chat(client, [{"role": "system", "content": ""}, user])["choices"][0]["message"]["content"]
        == (greedy_reply(engine, [user])[0])
    )
    developer = _chat(client, [{"role": "developer", "content": "be brief"}, user])
    assert (
        developer["choices"][0]["message"]["content"]
        == greedy_reply(engine, [{"role": "system", "content": "be brief"}, user])[0]
    )
    parts = _chat(
        client, [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    )
    assert parts["choices"][0]["message"]["content"] == greedy_reply(engine, with_default_system("hello"))[0]


def test_max_completion_tokens_and_length(client, engine):
    body = _chat(client, [{"role": "user", "content": "你好"}], max_completion_tokens=3, max_tokens=50)
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_streaming_events(client, engine, include_usage):
    fields = {"stream": True, "max_tokens": REPLY_TOKENS}
    if include_usage:
        fields["stream_options"] = {"include_usage": True}
    request = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, **fields}
    with client.stream("POST", CHAT, json=request) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    text, stats = greedy_reply(engine, with_default_system("你好"))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == stats.finish_reason
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == stats.completion_tokens
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_content_chunk_is_the_validated_chunk_s_json(include_usage):
    """Plain content chunks skip the per-chunk validation: their JSON is still what the ChatCompletionChunk gives."""
    fields = {"stream_options": {"include_usage": True}} if include_usage else {}
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}
    )
    ids = ResponseIds("chatcmpl", "internlm2-tiny")
    content_chunk = _ContentChunks(1, ids, body)
    for text in ["hello", '你好\n"quoted" \\ \t\x01 é 🙂', " ", "\u2028"]:
        choice = {"index": 1, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        assert content_chunk(text) == json.dumps(_chunk(ids, [choice], body), ensure_ascii=False)
        assert sse_data(content_chunk(text)).count(b"\n") == 2  # one event, one line of data


def test_stop_strings_cut_the_reply(client, engine):
    text, _ = greedy_reply(engine, with_default_system("你好"))
    stop = text[5:8]
    expected = text[: text.index(stop)]
    body = _chat(client, [{"role": "user", "content": "你好"}], stop=[stop, "never-seen"])
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": expected},
        "logprobs": None,
        "finish_reason": "stop",
    }
    request = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "stream": True, "stop": stop}
    events = sse_events(client.post(CHAT, json=request).text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected


def test_stop_filter_holds_back_a_split_stop_string():
    stops = StopFilter(["END"])
    assert [stops.push(t) for t in ["abc E", "N", "xEN", "D tail"]] == ["abc ", "", "ENx", ""]
    assert stops.hit and stops.flush() == ""
    plain = StopFilter(["xyz"])
    assert plain.push("abx") + plain.push("y") + plain.flush() == "abxy" and not plain.hit


def _cut_at_first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: read the text a character at a time; stop where a stop string first ends, cut at its start."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_stop_filter_matches_the_reference_whatever_the_chunks():
    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        stop_filter = StopFilter(stops)
        out = "".join(stop_filter.push(chunk) for chunk in chunks) + stop_filter.flush()
        assert (out, stop_filter.hit) == _cut_at_first_stop(text, stops), (stops, chunks)


def test_stop_strings_are_bounded_in_number_and_length(client):
    for stop in (["a"] * 5, ["x" * 1001], "y" * 100_000):
        response = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stop": stop})
        assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    body = _chat(client, [{"role": "user", "content": "hi"}], stop=["z" * 1000] * 4, max_tokens=4)
    assert body["choices"][0]["finish_reason"] == "length"


def test_text_that_is_not_unicode_is_a_4xx_naming_the_field(client):
    lone = "\\udfff"  # a lone surrogate: valid JSON, not Unicode text
    bodies = {
        CHAT: (f'{{"messages": [{{"role": "user", "content": "ok"}}, {{"role": "user", "content": "bad {lone}"}}]}}'),
        "/": f'{{"prompt": "hi", "history": [["ok", "{lone}"]]}}',
    }
    for path, body in bodies.items():
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == (400 if path == CHAT else 422), response.text
        text = response.text
        assert "not valid Unicode text" in text and ("messages.1.content" in text or "history" in text)
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": "{lone}"}}'
    stop = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop"
    assert client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


def test_the_engine_refuses_text_that_is_not_unicode_naming_the_message(engine):
    with pytest.raises(InvalidRequestError, match="message 2 \\(user\\) is not valid Unicode"):
        engine.prepare([{"role": "system", "content": "s"}, {"role": "user", "content": "bad \udfff"}], 8)


def test_a_vanishing_temperature_is_greedy(client, engine):
    expected = greedy_reply(engine, with_default_system("hello"), 8)[0]
    body = _chat(client, [{"role": "user", "content": "hello"}], temperature=1e-45, max_tokens=8)
    assert body["choices"][0]["message"]["content"] == expected
    classic = client.post("/", json={"prompt": "hello", "temperature": 1e-45, "max_new_tokens": 8}).json()
    assert classic["status"] == 200 and classic["response"] == expected


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "internlm2-tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["device"] == "cpu" and health["gpu_memory"] == [] and health["context_window"] == 512
    assert health["queue"] == {"waiting": 0, "active": 0, "slots": 8, "busy": False, "limit": 16}
    assert health["decoding"]["single_path"] == "dynamic" and health["decoding"]["batch_slots"] == 8
    assert health["decoding"]["single_reason_id"] == "cpu" and "CPU" in health["decoding"]["single_reason"]
    head = client.head("/health")  # uptime monitors often ask with HEAD
    assert head.status_code == 200 and head.content == b""


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_count_requests_tokens_and_latency(client):
    before = client.get("/metrics").text
    body = _chat(client, [{"role": "user", "content": "hi"}], max_tokens=4)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    assert _metric(after, 'internlm_requests_total{endpoint="/v1/chat/completions",status="200"}') == (
        _metric(before, 'internlm_requests_total{endpoint="/v1/chat/completions",status="200"}') + 1
    )
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    client.get("/v1/models/internlm2-tiny")
    counted = client.get("/metrics").text  # each endpoint under its own label, never "other"
    assert 'endpoint="/v1/completions",status="200"' in counted and 'endpoint="/v1/models/{model}"' in counted
    assert 'endpoint="other"' not in counted
    tokens = body["usage"]["completion_tokens"]
    assert (
        _metric(after, "internlm_completion_tokens_total")
        == _metric(before, "internlm_completion_tokens_total") + tokens
    )
    for name in ("internlm_time_to_first_token_seconds_count", "internlm_queue_wait_seconds_count"):
        assert _metric(after, name) == _metric(before, name) + 1
    assert "internlm_tokens_per_second_bucket" in after and "internlm_queue_waiting 0.0" in after


def test_each_app_has_its_own_registry(engine, tmp_path):
    apps = [create_app(api_settings(tmp_path), backend=engine) for _ in range(2)]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        first.post("/", json={"prompt": "hi", "max_new_tokens": 2})
        assert 'endpoint="/",status="200"' in first.get("/metrics").text
        assert 'endpoint="/",status="200"' not in second.get("/metrics").text


def test_api_keys_guard_everything_but_health(engine, tmp_path):
    app = create_app(api_settings(tmp_path, api_keys=[API_KEY, "second-key"]), backend=engine)
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok", "model_loaded": True}  # liveness, nothing more
        full = client.get("/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert full["model"] == "internlm2-tiny" and "gpu_memory" in full and "queue" in full
        for method, path in [("GET", "/"), ("POST", "/"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", CHAT)]:
            response = client.request(method, path, json={"prompt": "hi"})
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            body = response.json()
            assert (body["error"]["code"] == "invalid_api_key") if path.startswith("/v1") else (body["status"] == 401)
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for key in (API_KEY, "second-key"):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_cors_is_closed_by_default_and_configurable(client, engine, tmp_path):
    preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options(CHAT, headers=preflight).headers
    app = create_app(api_settings(tmp_path, cors_origins=["http://example.com"]), backend=engine)
    with TestClient(app) as open_client:
        response = open_client.options(CHAT, headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://example.com"
        # A refused preflight says why in the API's JSON, for each family of routes.
        refused = open_client.options(CHAT, headers={**preflight, "Origin": "http://evil.example"})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["type"] == "invalid_request_error"
        assert "origin not allowed" in error["message"] and "INTERNLM_CORS_ORIGINS" in error["message"]
        refused = open_client.options("/", headers={**preflight, "Access-Control-Request-Method": "DELETE"})
        assert refused.status_code == 400 and "method not allowed" in refused.json()["error"]
        assert refused.headers["access-control-allow-origin"] == "http://example.com"


@pytest.mark.parametrize("log_prompts", [False, True])
def test_one_log_line_per_request(engine, tmp_path, caplog, log_prompts):
    app = create_app(api_settings(tmp_path, log_prompts=log_prompts), backend=engine)
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="internlm_app.api"):
        caplog.clear()
        client.post("/", json={"prompt": "secret words", "max_new_tokens": 3})
    lines = [r.getMessage() for r in caplog.records if r.name == "internlm_app.api"]
    assert len(lines) == 1
    assert re.match(r"POST / 200 \d+ms prompt_tokens=\d+ completion_tokens=3 ttft=", lines[0])
    assert ("secret words" in lines[0]) is log_prompts


def test_out_of_memory_is_503_and_the_server_keeps_working(client, engine):
    for path, body in [("/", {"prompt": "hi"}), (CHAT, {"messages": [{"role": "user", "content": "hi"}]})]:
        handle = engine.model.register_forward_hook(FailOnForward(1))
        try:
            response = client.post(path, json=body)
        finally:
            handle.remove()
        assert response.status_code == 503 and "out of memory" in response.text
        assert (
            (response.json()["error"]["code"] == "generation_failed")
            if path == CHAT
            else response.json()["status"] == 503
        )
        assert client.post(path, json=body).status_code == 200


def test_out_of_memory_mid_stream_ends_with_an_error_event(client, engine):
    handle = engine.model.register_forward_hook(FailOnForward(4))
    try:
        request = {"messages": [{"role": "user", "content": "hello"}], "stream": True, "temperature": 0}
        response = client.post(CHAT, json=request)
    finally:
        handle.remove()
    events = sse_events(response.text)
    assert response.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "generation_failed" and "out of memory" in events[-2]["error"]["message"]
    assert engine.queue.active == 0


def test_queue_full_is_503_with_retry_after(engine, tmp_path):
    settings = api_settings(tmp_path, queue_limit=0)
    busy = engine_copy(engine, settings)
    with TestClient(create_app(settings, backend=busy)) as client:
        take_all_slots(busy)
        try:
            classic = client.post("/", json={"prompt": "hi"})
            openai = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        finally:
            free_all_slots(busy)
        for response in (classic, openai):
            assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
        assert classic.json()["status"] == 503 and openai.json()["error"]["code"] == "model_busy"
        # A refused request is no reply: it adds no failed reply and no prompt tokens to the metrics.
        metrics = client.get("/metrics").text
        assert _metric(metrics, "internlm_replies_total") == 0 and _metric(metrics, "internlm_prompt_tokens_total") == 0
        assert client.post("/", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
        assert _metric(client.get("/metrics").text, "internlm_replies_total") == 1


def test_a_request_with_n_choices_is_let_in_or_refused_as_one(engine, tmp_path):
    """The queue limit counts a request's n choices once: on an idle server with room for 2 replies at once and 1
    waiting, n=4 (batched), n=3 seeded (one at a time on the worker) and 2 prompts x n=2 all complete, where each
    choice counted as a waiting request got 503 "busy" forever. With every slot taken and no room to wait, n=2 is
    still refused, as one 503."""
    settings = api_settings(tmp_path, queue_limit=1, max_batch_size=2)
    limited = engine_copy(engine, settings)
    user = [{"role": "user", "content": "hi"}]
    with TestClient(create_app(settings, backend=limited)) as client:
        plain = client.post(CHAT, json={"messages": user, "n": 4, "max_tokens": 4, "temperature": 0})
        seeded = client.post(CHAT, json={"messages": user, "n": 3, "max_tokens": 4, "seed": 7})
        prompts = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "seed": 1})
        for response, choices in ((plain, 4), (seeded, 3), (prompts, 4)):
            assert response.status_code == 200, response.text
            assert len(response.json()["choices"]) == choices
        assert limited.queue.active == 0 and limited.queue.waiting() == 0
    settings = api_settings(tmp_path, queue_limit=0, max_batch_size=2)
    full = engine_copy(engine, settings)
    with TestClient(create_app(settings, backend=full)) as client:
        take_all_slots(full)
        try:
            refused = client.post(CHAT, json={"messages": user, "n": 2, "max_tokens": 4})
        finally:
            free_all_slots(full)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_busy"
        assert full.queue.waiting() == 0


def test_openapi_documents_both_contracts(client):
    schema = client.get("/openapi.json").json()
    assert {"/", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    classic = schema["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in classic["properties"] and classic["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    assert client.get("/docs").status_code == 200
