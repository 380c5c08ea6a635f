"""Constrained decoding: JSON and JSON Schema grammars for one tokenizer, compiled by xgrammar.

Why xgrammar: a maintained grammar engine (vLLM's and SGLang's default) whose token mask is computed in C++ per step
(microseconds on a 92k vocabulary), with a CPU path, and a token table that can be built from the sentencepiece
vocabulary directly (byte-fallback pieces), so no transformers tokenizer or remote code is needed.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache
from typing import Any

import xgrammar as xgr

from internlm_app.chat_types import InvalidRequestError
from internlm_app.runtime.tokenizer import ChatTokenizer, InternLM2Tokenizer

MAX_SCHEMA_CHARS = 100_000  # a schema is compiled on the request's thread, before the reply queues: bound its size
# xgrammar unrolls a pattern's bounded repeats ({m,n}): compiling `^[a-z]{1,1000}$` takes 0.06 s on this machine's CPU,
# {1,6000} 1.7 s, and three nested {1,50}/{1,50}/{1,10} 15 s, all on the request's thread. The cost grows faster than
# the unrolled size (`pattern_size`): each pattern is bounded, and all of one schema's together more loosely (25
# patterns of {1,100} compile in 0.06 s). A plain length limit is maxLength, which costs nothing.
MAX_PATTERN_SIZE = 2000
MAX_PATTERNS_SIZE = 20_000
CACHE_BYTES = 64 << 20  # compiled grammars kept for reuse; clients that send a new schema each time cannot grow it
# JSON Schema keywords xgrammar 0.2 does not enforce (it warns on stderr and ignores them, or falls back), or enforces
# only loosely (the object keywords let one key repeat: {"a": 1, "a": 2} met minProperties 2): a schema with one is
# refused rather than accepted and then not honoured. Measured on the tiny model with jsonschema.
_NOT_ENFORCED = ("not", "contains", "minContains", "maxContains", "if", "then", "else")
_NOT_ENFORCED += ("dependentRequired", "dependentSchemas", "dependencies", "unevaluatedItems")
_NOT_ENFORCED += ("propertyNames", "patternProperties", "minProperties", "maxProperties")
_VALUES = ("const", "enum", "default", "examples")  # JSON values, not schemas
_ANNOTATIONS = ("title", "description", "$comment", "deprecated", "readOnly", "writeOnly", *_VALUES[2:])
_NAMED_SCHEMAS = ("properties", "$defs", "definitions")  # {name: schema}: the names are not keywords


def unenforced_keyword(schema: Any, where: str = "") -> str | None:
    """Where `schema` uses something the grammar cannot enforce, named by its path and why
    ("properties.tags.uniqueItems"), or None. Besides the keywords above: `allOf` with more than one schema,
    `oneOf` but for a discriminated union (`one_of_problem`), `format` with a length, `required` naming a property
    `properties` does not define (strict decoding never writes one), a `$ref` outside the schema or with validation
    keywords beside it, and a pattern that unrolls to more than MAX_PATTERN_SIZE (all of them: MAX_PATTERNS_SIZE)."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})} if isinstance(schema, dict) else {}
    size = 0

    def walk(node: Any, where: str) -> str | None:
        nonlocal size
        if isinstance(node, list):
            for index, item in enumerate(node):
                if found := walk(item, f"{where}[{index}]"):
                    return found
            return None
        if not isinstance(node, dict):
            return None
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            if key in _VALUES or (key in _ANNOTATIONS and not isinstance(value, dict)):
                continue
            if key in _NOT_ENFORCED or (key == "uniqueItems" and value is True):
                return path
            if key == "allOf" and isinstance(value, list) and len(value) > 1:
                return path
            if key == "oneOf" and (why := one_of_problem(node, defs)):
                return f"{path} ({why})"
            if key == "format" and ({"minLength", "maxLength"} & node.keys()):
                return f"{path} with minLength/maxLength"
            if key == "required" and isinstance(value, list) and (missing := _undefined(value, node)):
                return f"{path} ({missing!r} is not in properties: strict decoding never writes it)"
            if key == "$ref" and isinstance(value, str):
                if not value.startswith("#"):
                    return f"{path} ({value!r}: only references inside the schema, #/..., are followed)"
                if beside := sorted(set(node) - {"$ref", *_ANNOTATIONS, "$defs", "definitions"}):
                    return f"{path} with {', '.join(beside)} beside it (put them in the schema it points to)"
            if key == "pattern" and isinstance(value, str):
                one = pattern_size(value)
                size += one
                if one > MAX_PATTERN_SIZE:
                    return f"{path} (its repeats unroll to over {MAX_PATTERN_SIZE} characters; maxLength costs nothing)"
                if size > MAX_PATTERNS_SIZE:
                    return f"{path} (the schema's patterns unroll to over {MAX_PATTERNS_SIZE} characters in all)"
                continue
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                for name, sub in value.items():
                    if found := walk(sub, f"{path}.{name}"):
                        return found
                continue
            if found := walk(value, path):
                return found
        return None

    return walk(schema, where)


def _undefined(required: list[Any], node: dict[str, Any]) -> str | None:
    """The first name of `required` that the object schema `node` has no property for."""
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    return next((name for name in required if isinstance(name, str) and name not in properties), None)


def one_of_problem(node: dict[str, Any], defs: dict[str, Any]) -> str | None:
    """Why `node`'s oneOf cannot be enforced, or None. The grammar decodes oneOf as anyOf, which is the same only when
    no value can match two branches: accepted for a discriminated union (what pydantic writes for
    `Field(discriminator=...)`): a `discriminator.propertyName` that every branch (or the $defs schema it points to)
    requires with its own const or one-value enum."""
    branches, discriminator = node.get("oneOf"), node.get("discriminator")
    if not isinstance(branches, list) or len(branches) < 2:
        return None
    name = discriminator.get("propertyName") if isinstance(discriminator, dict) else None
    if not isinstance(name, str):
        return "a value may match two branches; use anyOf, or a discriminator"
    tags = []
    for branch in branches:
        if isinstance(branch, dict) and isinstance(ref := branch.get("$ref"), str):
            branch = defs.get(ref.rsplit("/", 1)[-1]) if ref.startswith(("#/$defs/", "#/definitions/")) else None
        tag = _tag(branch, name)
        if tag is None:
            return f"every branch must require {name!r} with one constant value"
        tags.append(tag)
    return None if len(set(tags)) == len(tags) else f"two branches share a value of {name!r}"


def _tag(branch: Any, name: str) -> str | None:
    """The JSON of the one value object schema `branch` requires for property `name`, or None."""
    if not isinstance(branch, dict) or name not in (branch.get("required") or []):
        return None
    prop = (branch.get("properties") or {}).get(name)
    if not isinstance(prop, dict):
        return None
    if "const" in prop:
        return json.dumps(prop["const"])
    enum = prop.get("enum")
    return json.dumps(enum[0]) if isinstance(enum, list) and len(enum) == 1 else None


def pattern_size(pattern: str) -> int:
    """About how many single-character steps `pattern` unrolls to: each bounded repeat {m,n} (and {m,}) multiplies what
    it repeats by its larger bound, nested groups multiply. A measure of xgrammar's compile work, not a regex parser:
    escapes and classes count one, * + ? count one."""
    sizes, last, i = [0], 0, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            last, i = 1, i + 2
        elif char == "[":
            end = i + 1 + (pattern[i + 1 : i + 2] == "^")
            end += pattern[end : end + 1] == "]"
            while end < len(pattern) and pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            last, i = 1, end + 1
        elif char == "(":
            sizes.append(0)
            i += 1
            continue
        elif char == ")":
            last = sizes.pop() if len(sizes) > 1 else 0
            i += 1
        elif char == "{" and (repeat := _REPEAT.match(pattern, i)):
            count = max(int(repeat[1] or 0), int(repeat[2] or 0))
            sizes[-1] += last * max(count - 1, 0)
            last *= count
            i = repeat.end()
            continue
        else:
            last, i = 1, i + 1
        sizes[-1] += last
    return sum(sizes)


_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


class GrammarCompiler:
    """Compiles grammars for one tokenizer and model vocabulary size; caches compiled schemas. Thread-safe."""

    def __init__(self, tokenizer: ChatTokenizer, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._compilers: dict[tuple[int, ...], xgr.GrammarCompiler] = {}
        self._lock = threading.Lock()

    def _compiler(self, stop_ids: tuple[int, ...]) -> xgr.GrammarCompiler:
        with self._lock:
            if stop_ids not in self._compilers:
                info = _tokenizer_info(self._tokenizer, self._vocab_size, stop_ids)
                self._compilers[stop_ids] = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
            return self._compilers[stop_ids]

    def compile(self, schema: dict[str, Any], stop_ids: list[int], param: str) -> xgr.CompiledGrammar:
        """A grammar for JSON valid against `schema` ({} is any JSON value); once it is complete only `stop_ids` may
        follow. Raises InvalidRequestError naming `param` for a schema that is too big, uses a keyword the grammar
        cannot enforce, or that xgrammar refuses."""
        compiler = self._compiler(tuple(stop_ids))
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_CHARS:
            raise InvalidRequestError(f"{param}: the schema has more than {MAX_SCHEMA_CHARS} characters", param)
        if where := unenforced_keyword(schema):
            raise InvalidRequestError(
                f"{param}: the schema uses {where}, which constrained decoding cannot enforce; leave it out", param
            )
        try:
            # No free whitespace between tokens: a model may otherwise pad JSON with spaces until it runs out of room.
            # Strict mode: no properties beyond the schema's unless it allows them (OpenAI's strict schemas).
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError for schemas it refuses
            raise InvalidRequestError(
                f"{param}: the schema cannot be used for constrained decoding: {_reason(exc)}", param
            ) from None


def _reason(exc: Exception) -> str:
    """xgrammar's message without the time and C++ source location its C++ errors start with."""
    return _CPP_LOG_PREFIX.sub("", str(exc)).strip() or type(exc).__name__


_CPP_LOG_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _tokenizer_info(tokenizer: ChatTokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> xgr.TokenizerInfo:
    if isinstance(tokenizer, InternLM2Tokenizer):
        return xgr.TokenizerInfo(
            _pieces(tokenizer),
            xgr.VocabType.BYTE_FALLBACK,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_ids),
            add_prefix_space=True,
        )
    return xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=vocab_size, stop_token_ids=list(stop_ids))


@lru_cache(maxsize=4)
def _pieces(tokenizer: InternLM2Tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.vocab_pieces())


def token_bitmask(vocab_size: int):
    """A bitmask buffer for one row (xgrammar's int32 layout)."""
    return xgr.allocate_token_bitmask(1, vocab_size)


def matcher(grammar: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(grammar)


def apply_mask(row, bitmask) -> None:
    """Set the logits of tokens the grammar forbids to -inf, in place (`row`: [1, vocab] float)."""
    xgr.apply_token_bitmask_inplace(row, bitmask.to(row.device))
