"""Tool calling in InternLM2's own format (InternLM's chat/chat_format.md), shared by the API and the web app.

- The offered tools: a system turn named `<|plugin|>` whose content is a JSON list of
  {"name", "description", "parameters"} (the OpenAI function definitions, unwrapped).
- A call: the assistant writes `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`.
- A result: an `environment` turn named `<|plugin|>` whose content is what the tool returned.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from internlm_app.chat_types import Message, ToolCall


def tools_turn(functions: list[dict[str, Any]]) -> Message:
    """The system turn that offers `functions` (each {"name", "description"?, "parameters"?})."""
    listed = [{key: f[key] for key in ("name", "description", "parameters") if key in f} for f in functions]
    return {"role": "system", "name": "plugin", "content": json.dumps(listed, ensure_ascii=False)}


def with_tools(messages: list[Message], functions: list[dict[str, Any]]) -> list[Message]:
    """`messages` with the tools turn after the leading system messages (where the format's example puts it)."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    return [*messages[:lead], tools_turn(functions), *messages[lead:]]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(text: str) -> ToolCall | None:
    """The call in the JSON the model wrote after `<|action_start|><|plugin|>`, or None if it is not one.

    Accepts {"name": str, "parameters": object} (InternLM2's key) or "arguments" (what some fine-tunes write).
    """
    try:
        data = json.loads(text.strip())
    except (ValueError, RecursionError):  # not JSON, nested too deeply, or an integer too long for Python
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("parameters", data.get("arguments", {}))
    if isinstance(arguments, str):  # already JSON text
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": new_call_id(), "name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def call_schema(functions: list[dict[str, Any]], only: str | None = None) -> dict[str, Any]:
    """JSON Schema of one call's JSON: {"name": one of the tools (or `only`), "parameters": that tool's schema}.

    The i-th tool's parameter schema moves into the root's `$defs` as `tool<i>` (its own `$defs` as `tool<i>.<name>`):
    keys made from the tool's place, never its name, so no tool's name or definition can take another's key. Its
    references are rewritten to match, so `#/$defs/...`, `#/properties/...` and `#` inside it (what SDKs generate for
    nested and recursive models) still point where they did.
    """
    options, defs = [], {}
    for index, function in enumerate(functions):
        if only is not None and function["name"] != only:
            continue
        key = f"tool{index}"
        parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
        own = {**parameters.pop("definitions", {}), **parameters.pop("$defs", {})}
        defs[key] = _rewrite_refs(parameters, key)
        defs.update({f"{key}.{name}": _rewrite_refs(value, key) for name, value in own.items()})
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "parameters": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    return {**(options[0] if len(options) == 1 else {"anyOf": options}), "$defs": defs}


def _rewrite_refs(schema: Any, key: str) -> Any:
    """`schema` with its local references pointing into the root's $defs: "#/$defs/X" and "#/definitions/X" to
    "#/$defs/<key>.X", any other "#..." pointer (the schema itself, "#/properties/a") to the same place under
    "#/$defs/<key>"."""
    if isinstance(schema, list):
        return [_rewrite_refs(item, key) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for name, value in schema.items():
        if name == "$ref" and isinstance(value, str) and value.startswith("#"):
            for prefix in ("#/$defs/", "#/definitions/"):
                if value.startswith(prefix):
                    value = f"#/$defs/{key}.{value.removeprefix(prefix)}"
                    break
            else:
                value = f"#/$defs/{key}{value.removeprefix('#')}"
        out[name] = value if name in ("const", "enum", "default", "examples") else _rewrite_refs(value, key)
    return out
