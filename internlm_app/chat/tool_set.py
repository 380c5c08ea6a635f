"""The tools a chat offers the model: the built-ins and a folder of user tools, each with its JSON schema, run with a
timeout so that a tool's failure becomes its result rather than an exception.

A tool is a plain Python function with type hints and a Google-style docstring; its schema is
`transformers.utils.get_json_schema`'s (the same the chat templates of transformers use).

User tools (INTERNLM_TOOLS_DIR) are every public function defined in the folder's `*.py` files. Loading a file runs
it, and the model decides when its functions run, with the app's rights: only put code there you would run yourself.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import get_json_schema

from internlm_app.chat.builtin_tools import BUILTIN_TOOLS, SCHEMA_LIMITS, ToolError

log = logging.getLogger(__name__)

TOOL_TIMEOUT_SECONDS = 10.0  # a tool still running then is answered "did not finish" (its thread runs on, unseen)
MAX_RESULT_CHARS = 4000  # a longer result is cut, and says so: it goes into the prompt
MAX_USER_TOOL_FILES = 100


@dataclass(frozen=True)
class Tool:
    """One function the model may call, with its schema {"name", "description", "parameters"}."""

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]
    source: str = "builtin"  # "builtin", or the file a user tool came from


@dataclass(frozen=True)
class ToolResult:
    """What one call returned (`content`, the text the model reads), or why it failed (`error`, also in content)."""

    content: str
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class LoadProblem:
    """A user-tools file or function that was left out, and why (the web app shows these)."""

    where: str
    message: str


def tool_from_function(function: Callable[..., Any], source: str = "builtin") -> Tool:
    """A Tool for `function`; raises ValueError when its hints or docstring cannot make a schema."""
    try:
        described = get_json_schema(function)["function"]
    except Exception as exc:  # transformers' DocstringParsingException, TypeHintParsingException
        raise ValueError(str(exc)) from None
    schema = {key: described[key] for key in ("name", "description", "parameters") if key in described}
    for name, limit in SCHEMA_LIMITS.get(schema["name"], {}).items():
        schema["parameters"]["properties"][name]["maxLength"] = limit
    return Tool(schema["name"], function, schema, source)


@dataclass
class ToolSet:
    """Tools by name, in the order they are offered."""

    tools: dict[str, Tool] = field(default_factory=dict)
    problems: list[LoadProblem] = field(default_factory=list)

    @classmethod
    def of(cls, functions: Iterable[Callable[..., Any]]) -> ToolSet:
        return cls({tool.name: tool for tool in map(tool_from_function, functions)})

    def __bool__(self) -> bool:
        return bool(self.tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def functions(self) -> list[dict[str, Any]]:
        """The schemas, as the tools turn lists them (`tools.tools_turn`)."""
        return [tool.schema for tool in self.tools.values()]

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            self.problems.append(LoadProblem(tool.source, f"{tool.name}: a tool of that name is already offered"))
            return
        self.tools[tool.name] = tool

    def call(self, name: str, arguments: str, timeout: float = TOOL_TIMEOUT_SECONDS) -> ToolResult:
        """Run one call (arguments as JSON text); every failure, a timeout included, is a ToolResult with an error."""
        started = time.perf_counter()
        tool = self.tools.get(name)
        try:
            if tool is None:
                raise ToolError(f"there is no tool named {name!r}")
            try:
                kwargs = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolError(f"the arguments are not JSON ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # an integer too long for Python, or nested too deeply
                why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise ToolError(f"the arguments are not JSON Python can read ({why})") from None
            if not isinstance(kwargs, dict):
                raise ToolError("the arguments must be a JSON object")
            _check_arguments(tool, kwargs)
            value = _run_with_timeout(tool.function, kwargs, timeout, name)
        except ToolError as exc:
            return ToolResult(f"Error: {exc}", str(exc), time.perf_counter() - started)
        except Exception as exc:  # the tool's own failure: the model is told, the reply goes on
            log.info("tool %s failed", name, exc_info=exc)
            message = f"{type(exc).__name__}: {exc}"
            return ToolResult(f"Error: {message}", message, time.perf_counter() - started)
        return ToolResult(_as_text(value), None, time.perf_counter() - started)


def _check_arguments(tool: Tool, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(tool.function).bind(**kwargs)
    except TypeError as exc:
        raise ToolError(f"{tool.name}: {exc}") from None


def _run_with_timeout(function: Callable[..., Any], kwargs: dict[str, Any], timeout: float, name: str) -> Any:
    """Call in a daemon thread and wait at most `timeout` s; Python cannot stop a thread, so one that overruns is left
    to finish on its own while the reply goes on."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = function(**kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"internlm-tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ToolError(f"{name} did not finish within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _as_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > MAX_RESULT_CHARS:
        text = f"{text[:MAX_RESULT_CHARS]}\n[cut: {len(text) - MAX_RESULT_CHARS} more characters]"
    return text


def load_user_tools(folder: Path) -> tuple[list[Tool], list[LoadProblem]]:
    """Every public function defined in `folder/*.py` (sorted by file, then as defined), and what was left out.

    A file that fails to import, or a function without type hints or a docstring, is a problem, not an error.
    """
    tools: list[Tool] = []
    problems: list[LoadProblem] = []
    if not folder.is_dir():
        return tools, [LoadProblem(str(folder), "the tools folder does not exist")]
    files = sorted(path for path in folder.glob("*.py") if not path.name.startswith("_"))
    if len(files) > MAX_USER_TOOL_FILES:
        problems.append(LoadProblem(str(folder), f"only the first {MAX_USER_TOOL_FILES} files are loaded"))
    for path in files[:MAX_USER_TOOL_FILES]:
        try:
            module = _import_file(path)
        except (Exception, SystemExit) as exc:
            problems.append(LoadProblem(path.name, f"cannot be loaded: {type(exc).__name__}: {exc}"))
            continue
        functions = [f for _, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__]
        functions.sort(key=lambda f: f.__code__.co_firstlineno)
        for function in functions:
            if function.__name__.startswith("_"):
                continue
            try:
                tools.append(tool_from_function(function, source=path.name))
            except ValueError as exc:
                problems.append(LoadProblem(f"{path.name}: {function.__name__}", str(exc)))
    return tools, problems


def _import_file(path: Path):
    name = f"internlm_user_tools.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError("not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up here while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def chat_tools(tools_dir: Path | None) -> ToolSet:
    """The built-in tools, then the user tools of `tools_dir` (INTERNLM_TOOLS_DIR) when set; a user tool named like
    one already offered is left out (a problem)."""
    toolset = ToolSet.of(BUILTIN_TOOLS)
    if tools_dir is not None:
        tools, problems = load_user_tools(Path(tools_dir))
        toolset.problems += problems
        for tool in tools:
            toolset.add(tool)
        for problem in toolset.problems:
            log.warning("user tools: %s: %s", problem.where, problem.message)
    return toolset
