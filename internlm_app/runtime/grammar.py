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
CACHE_BYTES = 64 << 20  # compiled grammars kept for reuse; clients that send a new schema each time cannot grow it
# JSON Schema keywords xgrammar 0.2 does not enforce (it warns on stderr and ignores them, or falls back): a schema
# with one is refused rather than accepted and then not honoured. Measured on the tiny model with jsonschema.
_NOT_ENFORCED = ("not", "contains", "minContains", "maxContains", "if", "then", "else")
_NOT_ENFORCED += ("dependentRequired", "dependentSchemas", "dependencies")


def unenforced_keyword(schema: Any, where: str = "") -> str | None:
    """Where `schema` uses a keyword the grammar cannot enforce ("properties.tags.uniqueItems"), or None."""
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            if found := unenforced_keyword(item, f"{where}[{index}]"):
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        path = f"{where}.{key}" if where else key
        if key in ("const", "enum", "default", "examples", "description", "title"):
            continue  # values, not schemas
        if key in _NOT_ENFORCED or (key == "uniqueItems" and value is True):
            return path
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            return path
        if key == "format" and ({"minLength", "maxLength"} & schema.keys()):
            return f"{path} with minLength/maxLength"
        if key == "properties" and isinstance(value, dict):  # property names are not keywords
            for name, sub in value.items():
                if found := unenforced_keyword(sub, f"{path}.{name}"):
                    return found
            continue
        if found := unenforced_keyword(value, path):
            return found
    return None


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
