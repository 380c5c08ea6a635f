"""What agents and SDKs build on, through real clients against a real server on loopback: tool calls in InternLM2's
format, structured output, n, logprobs, seed, completions, prefill, capped max_tokens, history that is never
dropped silently. The tiny model's free text is gibberish, so valid JSON from it shows the constraint at work."""

from __future__ import annotations

import json
import math

import httpx
import jsonschema
import openai
import pytest

from internlm_app.api import create_app, running_server
from internlm_app.chat_types import ReplyEvents, ReplyOptions
from internlm_app.sampling import SamplingParams
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT
from tests.api_helpers import REPLY_TOKENS, api_settings, engine_copy

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
NO_SYSTEM = {"role": "system", "content": ""}  # the tiny model's window is 512 tokens: no default system prompt
USER = [NO_SYSTEM, {"role": "user", "content": "What is the weather in Shanghai?"}]
SAMPLED = {"temperature": 1.0, "top_p": 0.95, "seed": 7}


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    with running_server(create_app(api_settings(tmp_path_factory.mktemp("agents")), backend=engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)


def _check_weather_call(call) -> dict:
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_is_valid_json_for_its_schema(client, choice):
    completion = client.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120, **SAMPLED
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    if choice == "required":
        assert message.tool_calls[0].function.name in {"get_weather", "get_time"}
        if message.tool_calls[0].function.name == "get_time":
            return
    _check_weather_call(message.tool_calls[0])


def test_tool_call_round_trip_streamed_and_not(client, engine):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER], tool_choice=named, max_tokens=120, stream=True, temperature=0
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    arguments = _check_weather_call(calls[0])
    plain = client.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER], tool_choice=named, max_tokens=120, temperature=0
    )
    assert json.loads(plain.choices[0].message.tool_calls[0].function.arguments) == arguments  # greedy: the same

    # The tool's result goes back as a `tool` message, rendered as InternLM2's environment turn; the follow-up
    # reply is text, and the whole history is in the prompt.
    call = plain.choices[0].message.tool_calls[0]
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 22})},
    ]
    follow = client.chat.completions.create(
        model="m", messages=history, tools=[WEATHER], tool_choice="auto", max_tokens=16, temperature=0
    )
    assert follow.choices[0].finish_reason in {"stop", "length"} and follow.choices[0].message.tool_calls is None
    ids = engine.prepare(
        [
            *USER[:1],
            {"role": "system", "name": "plugin", "content": json.dumps([WEATHER["function"]])},
            *USER[1:],
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, **call.function.model_dump()}]},
            {"role": "environment", "name": "plugin", "content": '{"temperature": 22}'},
        ],
        16,
    ).ids
    assert follow.usage.prompt_tokens == len(ids)
    tools = engine.tokenizer.tool_ids
    marks = ("<|plugin|>", "<|action_start|>", "<|plugin|>", "<|action_end|>", "<|plugin|>")
    assert [i for i in ids if i in tools.values()] == [tools[t] for t in marks]  # offer, call, result


def test_auto_tool_choice_parses_a_call_the_model_writes(engine):
    """With tools offered, <|action_start|><|plugin|> JSON <|action_end|> from the model becomes tool_calls. The
    tiny model does not write calls by itself, so a model whose next tokens are fixed writes one."""
    from internlm_app.chat.reply_reader import ChoiceBuilder
    from internlm_app.chat_types import ReplyChunk

    builder = ChoiceBuilder(None)
    pieces = [
        ReplyChunk(text="Let me check."),
        ReplyChunk(control="<|action_start|>"),
        ReplyChunk(control="<|plugin|>"),
        ReplyChunk(text='\n{"name": "get_weather", "parameters": {"city": "Shanghai"}}'),
        ReplyChunk(control="<|action_end|>"),
    ]
    content = "".join(builder.push(piece).content for piece in pieces)
    _, finish = builder.finish("stop")
    assert content == "Let me check." and finish == "tool_calls"
    assert builder.tool_call["name"] == "get_weather" and json.loads(builder.tool_call["arguments"]) == {
        "city": "Shanghai"
    }
    broken = ChoiceBuilder(None)
    for piece in [*pieces[:3], ReplyChunk(text="not json"), pieces[4]]:
        broken.push(piece)
    assert broken.finish("stop")[1] == "stop" and broken.tool_call is None  # shown as content, never lost


def test_action_start_ends_a_reply_without_tools_and_im_start_always(engine):
    stops = set(engine.scheduler._stop_ids)
    tools = engine.tokenizer.tool_ids
    assert engine.tokenizer.im_start_id in stops and tools["<|action_start|>"] in stops
    assert tools["<|action_end|>"] in engine._tool_stop_ids and tools["<|action_start|>"] not in engine._tool_stop_ids


def test_response_format_json_schema_and_json_object(client, engine):
    completion = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=200,
        **SAMPLED,
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content), PERSON)
    plain = client.chat.completions.create(
        model="m",
        messages=[NO_SYSTEM, {"role": "user", "content": "hi"}],
        response_format={"type": "json_object"},
        temperature=0,
    )
    # Greedy: the engine's own reply under the JSON-object grammar, as many tokens as the server's default
    messages = [NO_SYSTEM, {"role": "user", "content": "hi"}]
    params = SamplingParams.greedy_params(REPLY_TOKENS)
    expected = "".join(
        c.text for c in engine.stream_chunks(messages, params, ReplyOptions(json_schema={"type": "object"}))
    )
    assert plain.choices[0].message.content == expected and isinstance(json.loads(expected), dict)


def test_unconstrained_output_is_not_json(client):
    """The control for the test above: the same request without response_format is not JSON."""
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=60, temperature=0
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.choices[0].message.content)


def test_n_choices_and_seed_repeatability(client):
    ask = dict(model="m", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=12, temperature=1.0)
    first = client.chat.completions.create(n=2, seed=1234, **ask)
    again = client.chat.completions.create(n=2, seed=1234, **ask)
    other = client.chat.completions.create(n=2, seed=99, **ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and len(texts) == 2
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert first.usage.completion_tokens == sum(1 for _ in texts) * 0 + first.usage.completion_tokens > 0
    streamed = client.chat.completions.create(n=2, seed=1234, stream=True, **ask)
    by_index = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert [by_index[0], by_index[1]] == texts


def test_logprobs_are_the_models_distribution(client, engine):
    completion = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    entries = choice.logprobs.content
    # Every generated token has an entry; a special token (no text in the reply) shows its name and no bytes.
    assert entries and "".join(e.token for e in entries if e.bytes) == choice.message.content
    for entry in entries:
        # Greedy: the chosen token is the most likely one, and the alternatives come in descending order.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-4
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or not entry.bytes
    # The engine's own logprob of the first token, from the raw logits, agrees.
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "hi"}]
    ids = engine.prepare(messages, 6).ids
    import torch

    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0, -1].float()
    assert entries[0].logprob == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-3)


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_apply_to_tokens_already_generated(engine, penalty):
    messages = [{"role": "user", "content": "tell me a long story about cats"}]
    params = SamplingParams.greedy_params(120)
    plain = [i for c in engine.stream_chunks(messages, params, ReplyOptions(seed=0)) for i in c.token_ids]
    assert len(set(plain)) < len(plain)  # greedy repeats itself here: what the penalties act on
    penalized = [i for c in engine.stream_chunks(messages, params, ReplyOptions(**{penalty: 2.0})) for i in c.token_ids]
    first_repeat = next(n for n, token in enumerate(plain) if token in plain[:n])
    assert penalized[:first_repeat] == plain[:first_repeat]  # same until the first repeat ...
    assert penalized != plain and len(set(penalized)) / len(penalized) > len(set(plain)) / len(plain)  # ... fewer


def test_completions_raw_prompt(client, engine):
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    completion = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    messages = [{"role": "user", "content": "hi"}]
    expected = "".join(c.text for c in engine.stream_chunks(messages, SamplingParams.greedy_params(8)))
    choice = completion.choices[0]
    assert choice.text == expected  # the raw prompt, special tokens read as tokens, is the chat prompt without system
    assert completion.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs)
    streamed = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    default = client.completions.create(model="m", prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_prefill_continues_the_assistant_message(client, engine):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, here"}]
    completion = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    system = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    ids = engine.prepare(system + messages, 8).ids
    assert ids[-len(engine.tokenizer.encode_plain("assistant\nSure, here")) :] == engine.tokenizer.encode_plain(
        "assistant\nSure, here"
    )  # no <|im_end|>, no new header
    events = ReplyEvents()
    expected = "".join(engine.stream_reply(system + messages, SamplingParams.greedy_params(8), events=events))
    assert completion.choices[0].message.content == expected


def test_models_by_id(client):
    assert client.models.retrieve("internlm2-tiny").id == "internlm2-tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_top_p_zero_is_greedy_and_top_k_minus_one_is_off(client):
    ask = dict(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=10)
    greedy = client.chat.completions.create(temperature=0, **ask).choices[0].message.content
    assert client.chat.completions.create(temperature=1.0, top_p=0, **ask).choices[0].message.content == greedy
    off = client.chat.completions.create(temperature=0, extra_body={"top_k": -1}, **ask)
    assert off.choices[0].message.content == greedy


def test_huge_max_tokens_is_capped_to_the_room_left(client):
    for field in ("max_tokens", "max_completion_tokens"):
        completion = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, **{field: 65536}
        )
        assert completion.usage.prompt_tokens + completion.usage.completion_tokens <= 512


def test_history_is_kept_and_the_reply_capped_while_the_prompt_fits(engine, tmp_path):
    settings = api_settings(tmp_path)
    long_turn = "书生浦语 " * 25
    messages = [
        {"role": "user", "content": long_turn},
        {"role": "assistant", "content": long_turn},
        {"role": "user", "content": long_turn},
        {"role": "assistant", "content": long_turn},
        {"role": "user", "content": "and now?"},
    ]
    with running_server(create_app(settings, backend=engine)) as base:
        body = {"messages": messages, "max_tokens": 360, "temperature": 0}
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        data = response.json()
        full = engine.prepare([{"role": "system", "content": settings.system_prompt}, *messages], 1).ids
        assert data["usage"]["prompt_tokens"] == len(full)  # every turn is in the prompt
        assert data["usage"]["completion_tokens"] <= 512 - len(full) and "X-Dropped-Messages" not in response.headers
        too_long = [{"role": "user", "content": "书生浦语 " * 120}, {"role": "assistant", "content": "ok"}] * 2
        response = httpx.post(
            f"{base}/v1/chat/completions", json={"messages": [*too_long, messages[-1]], "max_tokens": 8}, timeout=60
        )
        assert response.status_code == 200 and int(response.headers["X-Dropped-Messages"]) >= 2
        assert response.json()["dropped_messages"] == int(response.headers["X-Dropped-Messages"])
        # Once turns must go, enough go for the reply asked for (up to a quarter of the window), not for one token.
        usage = response.json()["usage"]
        assert 512 - usage["prompt_tokens"] >= 8
        # The classic route keeps the same rule and says so the same way.
        pairs = [[long_turn, long_turn]] * 2
        fits = httpx.post(base, json={"prompt": "and now?", "history": pairs, "max_new_tokens": 360}, timeout=60)
        assert fits.status_code == 200 and "dropped_messages" not in fits.json()
        assert "X-Dropped-Messages" not in fits.headers
        pairs = [["书生浦语 " * 120, "ok"]] * 2
        cut = httpx.post(base, json={"prompt": "and now?", "history": pairs, "max_new_tokens": 8}, timeout=60)
        assert cut.json()["dropped_messages"] == int(cut.headers["X-Dropped-Messages"]) >= 2


def test_remote_backend_refuses_what_it_cannot_honour(url, tmp_path):
    """Through the remote backend (this API served over this API), asking for logprobs is a 400, never ignored."""
    from internlm_app.backends.remote import RemoteBackend

    remote = RemoteBackend(api_settings(tmp_path, backend="openai", openai_base_url=f"{url}/v1"))
    with running_server(create_app(api_settings(tmp_path), backend=remote)) as base:
        body = {"messages": USER, "max_tokens": 4, "logprobs": True}
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and "local model" in response.json()["error"]["message"]
        plain = httpx.post(f"{base}/v1/chat/completions", json={**body, "logprobs": False}, timeout=60)
        assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"]


def test_langchain_bind_tools_and_structured_output(url):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{url}/v1", api_key="EMPTY", model="internlm2-tiny", max_retries=0, temperature=0, max_tokens=120
    )
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    reply = bound.invoke([HumanMessage("Weather in Shanghai?")])
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(reply.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    structured = llm.with_structured_output(
        {"title": "person", "description": "A person.", **PERSON}, method="json_schema"
    )
    person = structured.invoke("Describe a person.")
    jsonschema.validate(person, PERSON)


def test_stray_turn_header_ends_the_reply(engine):
    """A model that opens a new turn (<|im_start|>) without closing its own has ended: nothing after it is kept."""
    endless = engine_copy(engine)
    header = endless.tokenizer.im_start_id
    forced = _ForceToken(header, after=3)
    chunks = list(
        endless.stream_chunks(
            [{"role": "user", "content": "hi"}],
            SamplingParams.greedy_params(30),
            ReplyOptions(seed=0),
            events=(events := ReplyEvents()),
        )
        if forced.install(endless)
        else []
    )
    assert events.stats.completion_tokens == 4 and events.stats.finish_reason == "stop"
    assert header not in [i for c in chunks for i in c.token_ids]
    endless.close()


class _ForceToken:
    """Makes the engine's sampler choose `token` at step `after + 1` (the tiny model never writes it itself)."""

    def __init__(self, token: int, after: int):
        self.token, self.after = token, after

    def install(self, engine) -> bool:
        original = engine._reply_plan

        def plan(params, options):
            reply_plan = original(params, options)
            sampler, steps = reply_plan.sampler, {"n": 0}
            choose = sampler._choose

            def forced(row):
                steps["n"] += 1
                return self.token if steps["n"] == self.after + 1 else choose(row)

            sampler._choose = forced
            return reply_plan

        engine._reply_plan = plan
        return True


NESTED = {  # what openai.pydantic_function_tool and langchain generate for nested models: $defs and $ref
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "$defs": {
                "Place": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {
                "origin": {"$ref": "#/$defs/Place"},
                "nights": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["origin", "nights"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "book"}}])
def test_forced_call_with_refs_in_the_parameters(client, choice):
    completion = client.chat.completions.create(
        model="m", messages=USER, tools=[NESTED], tool_choice=choice, max_tokens=120, **SAMPLED
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "book"
    jsonschema.validate(json.loads(call.function.arguments), NESTED["function"]["parameters"])


def test_logprobs_stay_in_step_with_text_cut_at_a_stop_string(client):
    ask = dict(model="m", messages=[NO_SYSTEM, {"role": "user", "content": "hello there"}], temperature=0)
    full = client.chat.completions.create(max_tokens=30, logprobs=True, **ask)
    tokens = [e.token for e in full.choices[0].logprobs.content if e.bytes]
    stop = "".join(tokens)[6:10]  # a stop string that starts inside the reply
    assert stop and stop in full.choices[0].message.content
    for stream in (False, True):
        result = client.chat.completions.create(max_tokens=30, logprobs=True, stop=[stop], stream=stream, **ask)
        if stream:
            chunks = [c.choices[0] for c in result if c.choices]
            content = "".join(c.delta.content or "" for c in chunks)
            entries = [e for c in chunks if c.logprobs for e in c.logprobs.content]
        else:
            content, entries = result.choices[0].message.content, result.choices[0].logprobs.content
        joined = "".join(e.token for e in entries if e.bytes)
        assert content == full.choices[0].message.content.split(stop)[0]
        assert joined.startswith(content) and len(joined) - len(content) < len(entries[-1].token) + 1  # no token past
    completion = client.completions.create(
        model="m", prompt="hello there", max_tokens=30, temperature=0, logprobs=1, stop=stop[:2]
    )
    choice = completion.choices[0]
    joined = "".join(choice.logprobs.tokens)
    assert joined.startswith(choice.text) and len(joined) - len(choice.text) < len(choice.logprobs.tokens[-1]) + 1


@pytest.mark.parametrize(
    "arguments",
    ["[" * 100_000 + "]" * 100_000, '{"\\udfff": 1}', '{"x": NaN}', "null", "[1, 2]", "{oops"],
    ids=["nested-too-deeply", "escaped-surrogate", "nan", "null", "not-an-object", "not-json"],
)
def test_bad_tool_call_arguments_in_the_history_are_a_400(url, arguments):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "1"}
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, result]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": history, "max_tokens": 4}, timeout=60)
    assert response.status_code == 400, response.text
    assert "arguments" in response.json()["error"]["message"]


def test_seed_range_and_wrap(url):
    body = {"messages": USER, "max_tokens": 2, "temperature": 1.0}
    for seed in (2**64, -(2**63) - 1):
        response = httpx.post(f"{url}/v1/chat/completions", json={**body, "seed": seed}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    edge = httpx.post(f"{url}/v1/chat/completions", json={**body, "seed": 2**63 - 1, "n": 2}, timeout=60)
    assert edge.status_code == 200 and len(edge.json()["choices"]) == 2


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "contains": {"const": 1}}, "contains"),
        ({"type": "object", "properties": {"when": {"type": "string", "format": "date", "maxLength": 4}}}, "format"),
        # Strict decoding never writes a property the schema does not define: {} came back.
        ({"type": "object", "required": ["name"]}, "required"),
        ({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a", "b"]}, "'b'"),
        # oneOf decoded as anyOf: 3 matched both branches.
        ({"oneOf": [{"type": "integer", "enum": [3]}, {"type": "number", "enum": [3]}]}, "oneOf"),
        # Object keywords that let one key repeat: {"a": false, "a": true}.
        ({"type": "object", "propertyNames": {"pattern": "^a$"}}, "propertyNames"),
        ({"type": "object", "patternProperties": {"^a": {"type": "boolean"}}}, "patternProperties"),
        ({"type": "object", "minProperties": 2}, "minProperties"),
        # A reference the grammar cannot follow (it matched anything), or keywords beside one (dropped).
        ({"type": "object", "properties": {"u": {"$ref": "https://example.com/p.json#/definitions/U"}}}, "$ref"),
        ({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a", "type": "null"}, "type beside it"),
        # A definition named like a keyword is a name: its `not` is found, not skipped as a "title".
        ({"$defs": {"title": {"not": {"type": "string"}}}, "$ref": "#/$defs/title"}, "$defs.title.not"),
        # Repeats that unroll to 25,000 steps: 15 s of compiling on the request's thread, now refused at once.
        ({"type": "string", "pattern": "^(([a-z]{1,50}){1,50}){1,10}$"}, "pattern"),
        ({"type": "string", "pattern": "^[a-z]{1,6000}$"}, "maxLength costs nothing"),
    ],
)
def test_schema_keywords_the_grammar_cannot_enforce_are_a_400(url, schema, keyword):
    body = {
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    assert keyword in response.json()["error"]["message"]


def test_prefill_with_json_output_is_a_400(url):
    messages = [*USER, {"role": "assistant", "content": '{"answer": '}]
    body = {"messages": messages, "response_format": {"type": "json_object"}}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_usage_counts_each_prompt_once(client):
    chat = client.chat.completions.create(model="m", messages=USER, n=3, max_tokens=4, temperature=1.0)
    one = client.chat.completions.create(model="m", messages=USER, max_tokens=4, temperature=1.0)
    assert chat.usage.prompt_tokens == one.usage.prompt_tokens
    assert chat.usage.prompt_tokens_details.cached_tokens <= chat.usage.prompt_tokens
    texts = client.completions.create(model="m", prompt=["hello", "书生浦语 你好"], n=2, max_tokens=3)
    singles = [client.completions.create(model="m", prompt=p, max_tokens=3) for p in ("hello", "书生浦语 你好")]
    assert texts.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]


def test_a_forced_call_cut_short_is_content_with_its_logprobs(client):
    completion = client.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=6, logprobs=True, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith('{"name": "get_weather"'[: len(choice.message.content)])
    assert "".join(e.token for e in choice.logprobs.content if e.bytes) == choice.message.content


def test_a_call_to_a_tool_not_offered_is_content():
    from internlm_app.chat.reply_reader import ChoiceBuilder
    from internlm_app.chat_types import ReplyChunk

    builder = ChoiceBuilder(None, tools=["get_weather"])
    for piece in [
        ReplyChunk(control="<|action_start|>"),
        ReplyChunk(control="<|plugin|>"),
        ReplyChunk(text='\n{"name": "rm_rf", "parameters": {}}'),
    ]:
        builder.push(piece)
    delta = builder.push(ReplyChunk(control="<|action_end|>"))
    assert builder.tool_call is None and "rm_rf" in delta.content and builder.finish("stop")[1] == "stop"


def test_message_names_are_rendered_as_speakers(engine):
    messages = [NO_SYSTEM, {"role": "user", "content": "hi", "speaker": "alice"}]
    ids = engine.prepare(messages, 4).ids
    assert ids == engine.tokenizer.encode("<|im_start|>user name=alice\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"not": {"type": "boolean"}}, "$ref": "#/$defs/not"},  # a definition named like a keyword
        {"type": "string", "pattern": "^[a-z]{1,40}$"},
        {"type": "object", "properties": {"d": {"type": "object", "additionalProperties": {"type": "integer"}}}},
    ],
    ids=["def-named-not", "bounded-pattern", "dict"],
)
def test_schemas_the_grammar_enforces_are_honoured(client, schema):
    """What the checks above must not refuse: the output is valid against the schema."""
    from internlm_app.runtime.grammar import unenforced_keyword

    assert unenforced_keyword({"type": "string", "pattern": "^[a-z]{1,1500}$"}) is None  # (0.1 s to compile)
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m",
            messages=USER,
            max_tokens=200,
            seed=seed,
            temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        choice = completion.choices[0]
        if choice.finish_reason == "length":  # (a dict may run on: the random model need not close it in time)
            continue
        jsonschema.validate(json.loads(choice.message.content), schema)
        return
    pytest.fail("no reply ended within 200 tokens")


def test_a_discriminated_union_is_accepted_and_enforced(client):
    """pydantic's discriminated unions are oneOf with a discriminator: no value matches two branches, so decoding
    them as anyOf is exact (an undiscriminated oneOf is a 400 above)."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool

    class Pet(BaseModel):
        pet: Cat | Dog = Field(discriminator="kind")

    schema = Pet.model_json_schema()
    assert "oneOf" in json.dumps(schema)
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m",
            messages=USER,
            max_tokens=60,
            seed=seed,
            temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}},
        )
        Pet.model_validate_json(completion.choices[0].message.content)


def test_tools_whose_names_meet_their_definitions_keep_their_own_schemas(client):
    """Tool `a.b` and tool `a` with a definition `b`: once merged into one call schema their keys were the same,
    and a forced `a.b` call was decoded under `a`'s definition ({"z": false}). Keys come from the tools' places."""
    enum_x = {"type": "object", "properties": {"x": {"enum": [1]}}, "required": ["x"], "additionalProperties": False}
    z = {"type": "object", "properties": {"z": {"type": "boolean"}}, "required": ["z"], "additionalProperties": False}
    tools = [
        {"type": "function", "function": {"name": "a.b", "parameters": enum_x}},
        {
            "type": "function",
            "function": {
                "name": "a",
                "parameters": {"type": "object", "properties": {"w": {"$ref": "#/$defs/b"}}, "$defs": {"b": z}},
            },
        },
    ]
    for seed in range(3):
        completion = client.chat.completions.create(
            model="m", messages=USER, tools=tools, tool_choice="required", seed=seed, temperature=1.0, max_tokens=60
        )
        (call,) = completion.choices[0].message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert arguments == {"x": 1} if call.function.name == "a.b" else set(arguments) <= {"w"}, arguments
    pointer = {  # a pointer into the parameters themselves, not their $defs
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"$ref": "#/properties/a"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": pointer}}
    completion = client.chat.completions.create(
        model="m", messages=USER, tools=[tool], tool_choice="required", max_tokens=60
    )
    (call,) = completion.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), pointer)


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "string", "enum": ["abc"]},
        {"type": "array", "items": {"type": "integer"}},
        {"anyOf": [{"type": "object"}, {"type": "null"}]},
    ],
)
def test_tool_parameters_that_are_not_an_object_schema_are_a_400(url, parameters):
    """A forced call to such a tool came back as raw text with finish_reason stop: arguments are always an object."""
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    body = {"messages": USER, "tools": [tool], "tool_choice": "required", "max_tokens": 8}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools.0.function.parameters"


@pytest.mark.parametrize(
    ("tail", "param"),
    [
        ([{"role": "tool", "tool_call_id": "call_9", "content": "1"}], "messages.3.tool_call_id"),
        ([{"role": "tool", "content": "1"}], "messages.3.tool_call_id"),
        ([{"role": "tool", "tool_call_id": "call_1", "content": "1"}] * 2, None),  # (a second answer: fine)
        (
            [{"role": "user", "content": "and?"}, {"role": "tool", "tool_call_id": "call_1", "content": "1"}],
            "messages.4",
        ),
    ],
    ids=["unknown-id", "no-id", "two-answers", "after-a-user-turn"],
)
def test_a_tool_message_must_answer_a_call_just_before_it(url, tail, param):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, *tail]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)
    if param is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    only_tool = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}
    )
    assert only_tool.status_code == 400 and only_tool.json()["error"]["param"] == "messages.0"


def test_text_held_back_for_a_stop_string_goes_out_before_the_call():
    """ "Sure ST" with stop "STOP": "ST" was held back in case "OP" followed, then sent after the tool call. The
    control token that starts the call ends the text: it goes out first."""
    from internlm_app.chat.reply_reader import ChoiceBuilder
    from internlm_app.chat_types import ReplyChunk

    builder = ChoiceBuilder(["STOP"], tools=["get_weather"])
    deltas = [
        builder.push(piece)
        for piece in [
            ReplyChunk(text="Sure ST"),
            ReplyChunk(control="<|action_start|>"),
            ReplyChunk(control="<|plugin|>"),
            ReplyChunk(text='{"name": "get_weather", "parameters": {}}'),
            ReplyChunk(control="<|action_end|>"),
        ]
    ]
    rest, finish = builder.finish("stop")
    assert [d.content for d in deltas if d.content] == ["Sure ", "ST"] and deltas[-1].tool_call is not None
    assert not rest and finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_tokens_up_to_the_one_that_completes_a_stop_string(url, stream):
    """The reply's reader ran ahead of the route that saw the stop string: completion_tokens came back 14, 19 and 13
    for the same 5 tokens of text. Generation now ends at the token whose text completes the stop string, and
    usage counts through it, on every run."""
    prompt = {"prompt": "story", "temperature": 0, "max_tokens": 40}
    whole = httpx.post(f"{url}/v1/completions", json={**prompt, "logprobs": 0}, timeout=60).json()["choices"][0]
    tokens = whole["logprobs"]["tokens"]
    text = "".join(tokens)
    stop = tokens[6][:2] if tokens[6].strip() else tokens[7][:2]
    end = text.index(stop) + len(stop)  # where the first occurrence of the stop string ends
    reached = [len("".join(tokens[: i + 1])) >= end for i in range(len(tokens))]
    expected = reached.index(True) + 1
    counts = set()
    for _ in range(3):
        body = {**prompt, "stop": [stop], "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line[6:].startswith("{")]
            got, usage = "".join(c["text"] for e in events for c in e["choices"]), events[-1]["usage"]
        else:
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            got, usage = reply["choices"][0]["text"], reply["usage"]
        assert got == text[: text.index(stop)]
        counts.add(usage["completion_tokens"])
    assert counts == {expected}


def test_a_call_the_model_writes_to_a_strict_tool_must_validate_or_it_is_content():
    """`strict: true` with tool_choice auto: the model writes the call by itself (no grammar); arguments that do not
    validate against the tool's schema were returned as a tool call. Such a call is content, as a call to a tool
    not offered is; a valid one is a call."""
    from internlm_app.chat.reply_reader import ChoiceBuilder
    from internlm_app.chat_types import ReplyChunk

    schema = WEATHER["function"]["parameters"]

    def read(arguments: dict, strict: bool) -> ChoiceBuilder:
        builder = ChoiceBuilder(None, tools=["get_weather"], strict={"get_weather": schema} if strict else None)
        call = json.dumps({"name": "get_weather", "parameters": arguments})
        for piece in [
            ReplyChunk(control="<|action_start|>"),
            ReplyChunk(control="<|plugin|>"),
            ReplyChunk(text=call),
            ReplyChunk(control="<|action_end|>"),
        ]:
            builder.push(piece)
        return builder

    invalid, valid = {"city": 3}, {"city": "Paris", "unit": "celsius"}
    assert read(invalid, strict=True).tool_call is None and read(invalid, strict=True).finish("stop")[1] == "stop"
    assert read(invalid, strict=False).tool_call is not None  # not strict: as the model wrote it
    assert json.loads(read(valid, strict=True).tool_call["arguments"]) == valid


def test_a_strict_tools_pattern_cannot_hold_the_server():
    """^(a+)+$ against "a"*26 + "!" took 2.6 s on the event loop (each more "a" doubles it), stopping every request
    and page of the server. Patterns are matched under one time limit; one still running then fails the call."""
    import time

    from internlm_app.chat.reply_reader import STRICT_CHECK_SECONDS, ChoiceBuilder
    from internlm_app.chat_types import ReplyChunk

    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}, "required": ["s"]}
    for value, valid in (("a" * 40 + "!", False), ("aaaa", True)):
        builder = ChoiceBuilder(None, tools=["f"], strict={"f": schema})
        call = json.dumps({"name": "f", "parameters": {"s": value}})
        started = time.monotonic()
        for piece in [ReplyChunk(control="<|action_start|>"), ReplyChunk(control="<|plugin|>"), ReplyChunk(text=call)]:
            builder.push(piece)
        builder.push(ReplyChunk(control="<|action_end|>"))
        assert time.monotonic() - started < STRICT_CHECK_SECONDS + 1.0
        assert (builder.tool_call is not None) is valid, value


def test_many_small_patterns_are_not_refused_for_their_sum():
    """25 properties with ^[A-Za-z0-9 ]{1,100}$ were refused (their sizes added up past the bound of one pattern);
    they compile in 0.06 s. One pattern is bounded, and all of them together more loosely."""
    from internlm_app.runtime.grammar import MAX_PATTERNS_SIZE, unenforced_keyword

    fields = {f"f{i}": {"type": "string", "pattern": "^[A-Za-z0-9 ]{1,100}$"} for i in range(25)}
    assert unenforced_keyword({"type": "object", "properties": fields}) is None
    many = {f"f{i}": {"type": "string", "pattern": "^[a-z]{1,1900}$"} for i in range(MAX_PATTERNS_SIZE // 1900 + 1)}
    assert "in all" in unenforced_keyword({"type": "object", "properties": many})
