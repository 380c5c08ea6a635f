"""Built-in tools, user tools from a folder, and the tool runner end to end on the tiny model (a forced call)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from internlm_app.chat.builtin_tools import MAX_INT_BITS, ToolError, calculate, convert_units, current_time
from internlm_app.chat.tool_runner import FinalEvent, TextEvent, ToolCallEvent, ToolResultEvent, run_with_tools
from internlm_app.chat.tool_set import ToolSet, chat_tools, load_user_tools
from internlm_app.chat_types import InvalidRequestError
from internlm_app.runtime.tool_format import parse_tool_call
from internlm_app.sampling import SamplingParams

NO_SYSTEM = {"role": "system", "content": ""}  # the tiny model's window is 512 tokens


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("(2 + 3) * 4 ** 2 / 8", "10"),
        ("2 ** 100", str(2**100)),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("0.1 + 0.2", "0.3"),
    ],
)
def test_calculator_does_arithmetic(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('echo hi')", "function call"),
        ("x + 1", "name 'x'"),
        ("(1).real", "attribute 'real'"),
        ("abs(-1)", "function call"),
        ("9 ** 9 ** 9", "exponents are limited"),
        ("2 ** 5000", "exponents are limited"),
        ("99999 ** 999", f"more than {MAX_INT_BITS} bits"),
        ("1e308 * 10", "too large"),
        ("1 / 0", "division by zero"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("[1, 2]", "List"),
        ("lambda: 1", "Lambda"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 201, "longer than"),
        ("+".join(["1"] * 60), "more than 100 parts"),
        ("(-8) ** 0.5", "not a real number"),
    ],
)
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, why):
    started = time.perf_counter()
    with pytest.raises(ToolError, match=why):
        calculate(expression)
    assert time.perf_counter() - started < 1  # refused before computing, not after


def test_unit_conversions():
    assert convert_units(10, "km", "mile") == "10 km = 6.213711922 mile"
    assert convert_units(100, "degC", "degF") == "100 degC = 212 degF"
    assert convert_units(1, "°C", "K") == "1 °C = 274.15 K"
    assert convert_units(36, "km/h", "m/s") == "36 km/h = 10 m/s"
    assert convert_units(1, "GiB", "MB") == "1 GiB = 1073.741824 MB"
    with pytest.raises(ToolError, match="measure different things"):
        convert_units(1, "kg", "m")
    with pytest.raises(ToolError, match="unknown unit"):
        convert_units(1, "parsec_of_cheese", "m")
    for bad in ("3 km", "m**10**10", "__import__('os')", ""):
        with pytest.raises(ToolError, match="is not a unit"):
            convert_units(1, bad, "m")


def test_current_time_in_a_time_zone():
    shanghai = current_time("Asia/Shanghai")
    stamp = datetime.fromisoformat(shanghai.split(" ")[0])
    assert stamp.utcoffset() == timedelta(hours=8) and "Asia/Shanghai" in shanghai
    assert abs(stamp - datetime.now(UTC)) < timedelta(seconds=5)
    assert stamp.strftime("%A") in shanghai
    assert datetime.fromisoformat(current_time().split(" ")[0]).tzinfo is not None  # the server's zone, named
    with pytest.raises(ToolError, match="unknown time zone"):
        current_time("Mars/Olympus")


def test_builtin_schemas_come_from_signatures_and_carry_the_bounds():
    schemas = {f["name"]: f for f in chat_tools(None).functions()}
    assert set(schemas) == {"current_time", "calculate", "convert_units"}
    calc = schemas["calculate"]["parameters"]
    assert calc["required"] == ["expression"] and calc["properties"]["expression"]["maxLength"] == 200
    units = schemas["convert_units"]["parameters"]["properties"]
    assert units["value"]["type"] == "number" and units["to_unit"]["type"] == "string"


USER_TOOLS = '''
import time

def pick_color(color: str) -> str:
    """Pick a color for the user.

    Args:
        color: The color to pick. (choices: ["red", "blue"])
    """
    return f"picked {color}"


def add(a: int, b: int = 2) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def slow() -> str:
    """Take a long time."""
    time.sleep(5)
    return "late"


def broken() -> str:
    """Fail."""
    raise RuntimeError("the tool broke")


def no_docstring(x: int) -> int:
    return x


def _helper() -> None:
    pass
'''


@pytest.fixture
def tools_dir(tmp_path):
    folder = tmp_path / "tools"
    folder.mkdir()
    (folder / "mine.py").write_text(USER_TOOLS)
    (folder / "bad.py").write_text("def oops(:\n")
    mine = 'def calculate(expression: str) -> str:\n    """Mine.\n\n    Args:\n        expression: e\n    """\n'
    (folder / "calc.py").write_text(mine)
    return folder


def test_user_tools_load_with_schemas_from_signature_and_docstring(tools_dir):
    tools, problems = load_user_tools(tools_dir)
    by_name = {tool.name: tool for tool in tools}
    assert list(by_name) == ["calculate", "pick_color", "add", "slow", "broken"]  # by file, then as written
    assert by_name["pick_color"].schema == {
        "name": "pick_color",
        "description": "Pick a color for the user.",
        "parameters": {
            "type": "object",
            "properties": {"color": {"type": "string", "enum": ["red", "blue"], "description": "The color to pick."}},
            "required": ["color"],
        },
    }
    assert by_name["add"].schema["parameters"]["required"] == ["a"] and by_name["add"].source == "mine.py"
    wheres = {problem.where: problem.message for problem in problems}
    assert "SyntaxError" in wheres["bad.py"] and "docstring" in wheres["mine.py: no_docstring"]
    toolset = chat_tools(tools_dir)  # the built-in calculator stays; the user's of the same name is a problem
    assert toolset.tools["calculate"].source == "builtin" and "pick_color" in toolset.tools
    assert any(p.where == "calc.py" and "already offered" in p.message for p in toolset.problems)


def test_tool_calls_turn_every_failure_into_a_result(tools_dir):
    toolset = ToolSet({tool.name: tool for tool in load_user_tools(tools_dir)[0]})
    assert toolset.call("add", '{"a": 40}').content == "42"
    assert toolset.call("add", '{"a": 1, "c": 2}').error == "add: got an unexpected keyword argument 'c'"
    assert toolset.call("add", "[1]").error == "the arguments must be a JSON object"
    too_long = toolset.call("add", '{"a": ' + "9" * 5000 + "}")  # JSON, but an integer Python will not convert
    assert too_long.error.startswith("the arguments are not JSON Python can read") and "digits" in too_long.error
    assert toolset.call("add", "[" * 100_000 + "]" * 100_000).error.endswith("(nested too deeply)")
    assert toolset.call("nope", "{}").content == "Error: there is no tool named 'nope'"
    assert toolset.call("broken", "{}").content == "Error: RuntimeError: the tool broke"
    started = time.perf_counter()
    late = toolset.call("slow", "{}", timeout=0.2)
    assert late.error == "slow did not finish within 0.2 s" and time.perf_counter() - started < 2


def test_forced_call_runs_the_tool_and_the_result_is_in_the_next_prompt(engine, tools_dir):
    tools, _ = load_user_tools(tools_dir)
    toolset = ToolSet({"pick_color": next(tool for tool in tools if tool.name == "pick_color")})
    prompts: list[list[dict]] = []

    class Recording:  # the real engine; notes each prompt it is asked to continue
        def stream_chunks(self, messages, *args, **kwargs):
            prompts.append(messages)
            return engine.stream_chunks(messages, *args, **kwargs)

    messages = [NO_SYSTEM, {"role": "user", "content": "Pick a color"}]
    params = SamplingParams.greedy_params(100)
    events = list(run_with_tools(Recording(), messages, toolset, params, tool_choice="pick_color"))
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    final = events[-1]
    assert len(calls) == 1 and calls[0].call["name"] == "pick_color" and calls[0].step == 0
    color = json.loads(calls[0].call["arguments"])["color"]
    assert color in {"red", "blue"} and results[0].result.content == f"picked {color}"
    assert not [e for e in events if isinstance(e, TextEvent) and e.step == 0]  # the call is not shown as text
    assert isinstance(final, FinalEvent) and final.finish_reason in {"stop", "length"} and len(final.stats) == 2
    assert final.messages[0] == {"role": "assistant", "content": "", "tool_calls": [calls[0].call]}
    assert final.messages[1] == {"role": "environment", "name": "plugin", "content": f"picked {color}"}
    assert final.text == "".join(e.text for e in events if isinstance(e, TextEvent) and e.step == 1)
    # The second prompt: the tools turn, the question, the call as the model writes it, the result turn.
    assert len(prompts) == 2 and prompts[1][-2:] == final.messages[:2]
    ids = engine.prepare(prompts[1], 16).ids
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert f"picked {color}" in text and '"name": "pick_color"' in text
    tool_ids = engine.tokenizer.tool_ids
    marks = ("<|plugin|>", "<|action_start|>", "<|plugin|>", "<|action_end|>", "<|plugin|>")
    assert [i for i in ids if i in tool_ids.values()] == [tool_ids[m] for m in marks]  # offer, call, result


def test_a_reply_with_tools_reports_its_place_in_line(engine):
    """While every slot is taken, a reply with tools waits, and its place in line reaches `on_queue` (the web page
    shows it), then it runs once a slot is free."""
    from tests.api_helpers import free_all_slots, take_all_slots, wait_until

    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    places: list[int] = []
    events: list = []
    messages = [NO_SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    take_all_slots(engine)
    try:
        run = threading.Thread(
            target=lambda: events.extend(
                run_with_tools(
                    engine, messages, ToolSet.of([add]), SamplingParams.greedy_params(8), on_queue=places.append
                )
            )
        )
        run.start()
        assert wait_until(lambda: places, 30) and places[0] == 1
    finally:
        free_all_slots(engine)
    run.join(60)
    assert events and isinstance(events[-1], FinalEvent) and engine.queue.active == 0


def test_a_cancel_at_the_call_stops_the_reply_before_the_tool_runs(engine):
    ran: list[str] = []

    def pick_color(color: str) -> str:
        """Pick a color for the user.

        Args:
            color: The color to pick. (choices: ["red", "blue"])
        """
        ran.append(color)
        return color

    cancel = threading.Event()
    messages = [NO_SYSTEM, {"role": "user", "content": "Pick a color"}]
    params = SamplingParams.greedy_params(100)
    events = []
    for event in run_with_tools(
        engine, messages, ToolSet.of([pick_color]), params, tool_choice="required", cancel=cancel
    ):
        events.append(event)
        cancel.set()  # the Stop button, at the first event shown: the call
    assert [type(e) for e in events] == [ToolCallEvent, FinalEvent] and events[-1].finish_reason == "cancelled"
    assert not ran and events[-1].messages == [{"role": "assistant", "content": ""}]


def test_a_tool_choice_not_offered_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        next(
            run_with_tools(
                engine, [{"role": "user", "content": "hi"}], chat_tools(None), SamplingParams(), tool_choice="rm"
            )
        )


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "add", "parameters": {"a": ' + "9" * 5000 + "}}",  # JSON, but an integer Python will not convert
        '{"name": "add", "parameters": "{\\"a\\": ' + "9" * 5000 + '}"}',  # the same inside string arguments
        '{"name": "add", "parameters": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"name": "add", "parameters": "' + "[" * 100_000 + "]" * 100_000 + '"}',
    ],
    ids=["integer-too-long", "integer-too-long-in-string", "nested-too-deeply", "nested-too-deeply-in-string"],
)
def test_a_call_the_model_wrote_that_python_cannot_read_is_not_a_call(text):
    """The model's text stays text (no call, no exception ending the reply) when its JSON cannot be read."""
    assert parse_tool_call(text) is None
    assert parse_tool_call('{"name": "add", "parameters": {"a": 1}}')["arguments"] == '{"a": 1}'


def test_a_forced_call_cut_off_by_the_length_limit_is_an_error_never_half_a_call_as_text(engine, tools_dir):
    from internlm_app.chat.tool_runner import ToolCallCutOffError

    tools, _ = load_user_tools(tools_dir)
    toolset = ToolSet({"pick_color": next(tool for tool in tools if tool.name == "pick_color")})
    messages = [NO_SYSTEM, {"role": "user", "content": "Pick a color"}]
    stats: list = []
    run = run_with_tools(
        engine, messages, toolset, SamplingParams.greedy_params(3), tool_choice="pick_color", step_stats=stats
    )
    texts = []
    with pytest.raises(ToolCallCutOffError, match=r"cut off by max_new_tokens \(3\)") as info:
        texts += [e.text for e in run if isinstance(e, TextEvent)]
    assert texts == [] and info.value.code == "tool_call_cut_off"
    assert len(stats) == 1 and stats[0].completion_tokens == 3  # the step's stats reach the caller all the same
    # The same call cut off by the end of the context budget, with max new tokens to spare: another cause, another
    # advice.
    budget = stats[0].prompt_tokens + 3
    run = run_with_tools(
        engine, messages, toolset, SamplingParams.greedy_params(100), tool_choice="pick_color", max_length=budget
    )
    with pytest.raises(ToolCallCutOffError, match="end of the context budget") as info:
        list(run)
    assert info.value.code == "tool_call_no_room"
