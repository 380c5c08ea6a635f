"""Chat tokenizers: InternLM2 on plain sentencepiece (no remote code) and native HF chat models via AutoTokenizer."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm

from internlm_app.chat_types import InvalidRequestError, Message
from internlm_app.runtime.prompt import build_prompt_ids, validate_messages

# Invalid UTF-8 becomes one U+FFFD per byte, as sentencepiece's own decoder does: "surrogateescape" turns each invalid
# byte into one lone surrogate U+DC80..U+DCFF (which valid UTF-8 never decodes to), then each becomes U+FFFD. No
# process-wide codec error handler is registered.
_ESCAPED_BYTE_TO_REPLACEMENT = dict.fromkeys(range(0xDC80, 0xDD00), "\ufffd")

# transformers' `clean_up_tokenization`, in its order (the replacements are chained, not simultaneous).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEAN_UP += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_INTERNLM2_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
# End-of-turn tokens of common HF chat models, used as stop ids when the tokenizer has them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# Turn-header tokens: a model that opens a new turn has ended its own, so each of these ends a reply too.
_TURN_HEADER_TOKENS = ("<|im_start|>", "<|start_header_id|>", "<start_of_turn>")
# InternLM2's tool tokens (chat/chat_format.md): structure only where the server puts them or the model emits them.
TOOL_TOKENS = ("<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>")


class StreamDecoder(Protocol):
    """Turns generated ids into text incrementally, never showing half a character."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class ChatTokenizer(Protocol):
    """What the engine needs from any tokenizer."""

    bos_id: int | None
    stop_ids: list[int]
    special_ids: frozenset[int]
    header_ids: list[int]  # turn-header ids: generating one ends the reply
    tool_ids: dict[str, int]  # TOOL_TOKENS the vocabulary has (empty: no InternLM2 tool calling)

    def build_prompt_ids(
        self, messages: list[Message], add_generation_prompt: bool = True, continue_final: bool = False
    ) -> list[int]: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def encode_plain(self, text: str) -> list[int]: ...

    def count_message_tokens(self, message: Message) -> int: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...


def reply_stop_ids(tokenizer: ChatTokenizer, tools: bool = False) -> list[int]:
    """The ids that end a reply: end of turn, a turn header (the model opened the next turn without closing its own),
    and, without tools, <|action_start|>; with tools, <|action_end|> after the call."""
    base = [*tokenizer.stop_ids, *(i for i in tokenizer.header_ids if i not in tokenizer.stop_ids)]
    marker = "<|action_end|>" if tools else "<|action_start|>"
    return base + [tokenizer.tool_ids[marker]] if marker in tokenizer.tool_ids else base


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (" ," -> "," ...), which the official slow tokenizer always applies."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _generation_eos_ids(model_dir: Path) -> list[int]:
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    return [] if eos is None else [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def _unique(ids: Iterable[int | None]) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None))


class _ByteStreamDecoder:
    """Concatenates per-token bytes and decodes them incrementally: O(1) per token, incomplete UTF-8 held back."""

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes(token_id)).translate(_ESCAPED_BYTE_TO_REPLACEMENT)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True).translate(_ESCAPED_BYTE_TO_REPLACEMENT)


class InternLM2Tokenizer:
    """The official slow InternLM2 tokenizer re-implemented on plain sentencepiece; implements ChatTokenizer."""

    def __init__(
        self,
        model_file: str | Path,
        added_tokens: dict[int, tuple[str, bool]],
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        extra_stop_ids: Iterable[int] = (),
    ):
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.added_tokens = {content: token_id for token_id, (content, _) in added_tokens.items()}
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        if missing := {"<|im_start|>", "<|im_end|>"} - self.added_tokens.keys():
            raise ValueError(f"tokenizer_config.json has no {sorted(missing)} in added_tokens_decoder")
        self.im_start_id, self.im_end_id = self.added_tokens["<|im_start|>"], self.added_tokens["<|im_end|>"]
        special = {i for i, (_, is_special) in added_tokens.items() if is_special}
        special |= {i for i in (self.bos_id, self.eos_id, self._sp.unk_id()) if i is not None and i >= 0}
        self.special_ids = frozenset(special)
        self.stop_ids = _unique([self.eos_id, self.im_end_id, *extra_stop_ids])
        self.header_ids = [self.im_start_id]
        self.tool_ids = {name: self.added_tokens[name] for name in TOOL_TOKENS if name in self.added_tokens}
        self._special_text = {i: added_tokens[i][0] if i in added_tokens else self._sp.id_to_piece(i) for i in special}
        names = sorted(self.added_tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        # sentencepiece matches user-defined pieces (like "[UNUSED_TOKEN_145]") in raw text: guard those in user text.
        size = self._sp.get_piece_size()
        guarded = [self._sp.id_to_piece(i) for i in sorted(special) if 0 <= i < size and self._matchable(i)]
        guarded = sorted((p for p in guarded if len(p) > 1), key=len, reverse=True)
        self._guard_re = re.compile("|".join(map(re.escape, guarded))) if guarded else None
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> InternLM2Tokenizer:
        """Load tokenizer.model, tokenizer_config.json (added_tokens_decoder) and generation_config.json's eos ids."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        decoder = config.get("added_tokens_decoder", {})
        added = {int(i): (tok["content"], bool(tok.get("special", False))) for i, tok in decoder.items()}
        return cls(
            model_dir / "tokenizer.model",
            added,
            bos_token=_token_content(config.get("bos_token", "<s>")),
            eos_token=_token_content(config.get("eos_token", "</s>")),
            extra_stop_ids=_generation_eos_ids(model_dir),
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.added_tokens.get(token, self._sp.piece_to_id(token))

    def _matchable(self, token_id: int) -> bool:
        sp = self._sp
        return not (sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_byte(token_id))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Like the official `tokenizer(text).input_ids`: added-token strings become their ids, BOS first."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for chunk in self._split_re.split(text) if self._split_re else [text]:
            if chunk in self.added_tokens:
                ids.append(self.added_tokens[chunk])
            elif chunk:
                ids += self._sp.encode(chunk)
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode user text as text only: never a control or special id, whatever the text says; no BOS."""
        if self._guard_re is None or not self._guard_re.search(text):
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._guard_re.finditer(text):  # cut after the first character, so the piece cannot match
            ids += self._sp.encode(text[start : match.start() + 1])
            start = match.start() + 1
        ids += self._sp.encode(text[start:])
        if self.special_ids.intersection(ids):  # overlapping look-alikes: fall back to byte pieces for those
            ids = [j for i in ids for j in (self._as_bytes(i) if i in self.special_ids else [i])]
        return ids

    def _as_bytes(self, token_id: int) -> list[int]:
        return [self._sp.piece_to_id(f"<0x{b:02X}>") for b in self._sp.id_to_piece(token_id).encode()]

    def build_prompt_ids(
        self, messages: list[Message], add_generation_prompt: bool = True, continue_final: bool = False
    ) -> list[int]:
        """The InternLM2 chat prompt for `messages` (see prompt.build_prompt_ids)."""
        return build_prompt_ids(self, messages, add_generation_prompt, continue_final)

    def vocab_pieces(self) -> list[str]:
        """Each id's sentencepiece piece ("▁the", "<0x0A>"), "" for special and control ids (never text)."""
        sp = self._sp
        return [
            "" if i in self.special_ids or sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i)
            for i in range(sp.get_piece_size())
        ]

    def count_message_tokens(self, message: Message) -> int:
        """Tokens this message adds to a prompt (its whole turn, markers included)."""
        return len(build_prompt_ids(self, [message], False)) - len(build_prompt_ids(self, [], False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, clean_up: bool = True) -> str:
        """Like the official slow decode, including its clean-up (`clean_up=False`: the exact text, as streamed)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            text = self._sp.decode([i for i in ids if i not in self.special_ids])
        else:  # the official convert_tokens_to_string: a space before a special token that follows a normal one
            text, run, prev_special = "", [], False
            for token_id in ids:
                if token_id not in self._special_text:
                    run.append(token_id)
                    prev_special = False
                    continue
                text += ("" if prev_special else " ") + self._sp.decode(run) + self._special_text[token_id]
                run, prev_special = [], True
            text += self._sp.decode(run)
        return clean_up_tokenization(text) if clean_up else text

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one id adds to the shown text (b"" for special, control and out-of-vocabulary ids)."""
        data = self._bytes.get(token_id)
        if data is None:
            sp = self._sp
            if not 0 <= token_id < sp.get_piece_size() or token_id in self.special_ids or sp.is_control(token_id):
                data = b""
            elif sp.is_byte(token_id):
                data = bytes([int(sp.id_to_piece(token_id)[3:5], 16)])
            elif sp.is_unknown(token_id):
                data = " \u2047 ".encode()
            else:
                data = sp.id_to_piece(token_id).replace("\u2581", " ").encode()
            self._bytes[token_id] = data
        return data

    def stream_decoder(self) -> StreamDecoder:
        """A decoder whose output for a reply is `decode(ids, clean_up=False)`, with no re-decoding."""
        return _ByteStreamDecoder(self.token_bytes)


class _WindowStreamDecoder:
    """Incremental detokenization with prefix/read offsets over a small window (as in vLLM)."""

    def __init__(self, decode: Callable[[list[int]], str], special_ids: frozenset[int]):
        self._decode, self._special_ids = decode, special_ids
        self._window: list[int] = []  # ids from the prefix offset on
        self._read = 0  # ids in the window whose text was already shown
        self._shown: str | None = ""  # decode(window[:read]), cached until the read offset moves (None: stale)

    def _shown_text(self) -> str:
        if self._shown is None:
            self._shown = self._decode(self._window[: self._read])
        return self._shown

    def push(self, token_id: int) -> str:
        if token_id in self._special_ids:
            return ""
        self._window.append(token_id)
        shown = self._shown_text()
        text = self._decode(self._window)
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing yet): wait for more ids
        moved = self._read > 0  # at the start the new prefix is the whole window, whose text is `text`
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._shown = None if moved else text  # a moved prefix is decoded again on the next push, once
        return text[len(shown) :]

    def flush(self) -> str:
        rest = ""
        if len(self._window) > self._read:  # ids whose text is not shown yet (an incomplete character)
            rest = self._decode(self._window)[len(self._shown_text()) :]
        self._window, self._read, self._shown = [], 0, ""
        return rest


class HFChatTokenizer:
    """A native HF tokenizer with a chat template (Qwen2.5, InternLM3 ...); implements ChatTokenizer."""

    def __init__(self, hf_tokenizer: Any, extra_stop_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        self.bos_id = hf_tokenizer.bos_token_id
        added = hf_tokenizer.added_tokens_decoder
        self.special_ids = frozenset(hf_tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}
        encoder = hf_tokenizer.added_tokens_encoder
        turn_ends = [encoder[t] for t in _END_OF_TURN_TOKENS if t in encoder]
        self.stop_ids = _unique([hf_tokenizer.eos_token_id, *extra_stop_ids, *turn_ends])
        self.header_ids = [encoder[t] for t in _TURN_HEADER_TOKENS if t in encoder]
        self.tool_ids: dict[str, int] = {}  # tool calling is InternLM2's format only
        self._overhead: int | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> HFChatTokenizer:
        """AutoTokenizer.from_pretrained (never remote code), plus generation_config.json's eos ids."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        if not hf.chat_template:
            raise ValueError(f"the tokenizer in {model_dir} has no chat template")
        return cls(hf, _generation_eos_ids(Path(model_dir)))

    def encode_plain(self, text: str) -> list[int]:
        """Encode text without matching any added or special token; no BOS."""
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Raw text as the tokenizer reads it, special-token text included (a completion's prompt)."""
        return self.hf.encode(text, add_special_tokens=add_bos)

    def build_prompt_ids(
        self, messages: list[Message], add_generation_prompt: bool = True, continue_final: bool = False
    ) -> list[int]:
        """apply_chat_template with sanitize_control_tokens, so control-token text in messages stays plain text."""
        from jinja2 import TemplateError

        validate_messages(messages)
        if any(
            m["role"] == "environment" or m.get("tool_calls") or m.get("name") or m.get("speaker") for m in messages
        ):
            raise InvalidRequestError("tool calls and tool results need an InternLM2 model (its chat format)")
        try:
            ids = self.hf.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                add_generation_prompt=add_generation_prompt and not continue_final,
                continue_final_message=continue_final,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
            )
        except (ValueError, TemplateError) as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
        return [int(i) for i in ids]

    def count_message_tokens(self, message: Message) -> int:
        """An estimate: the content's tokens plus the per-turn markers measured once on the template."""
        if self._overhead is None:
            turn: list[Message] = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]
            try:
                base = len(self.build_prompt_ids(turn, False))
                longer = len(self.build_prompt_ids([*turn, turn[0]], False))
                self._overhead = max(longer - base - len(self.encode_plain("x")), 0)
            except InvalidRequestError:
                self._overhead = 8
        return len(self.encode_plain(message["content"])) + self._overhead

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _decode_window(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if ids else ""

    def stream_decoder(self) -> StreamDecoder:
        return _WindowStreamDecoder(self._decode_window, self.special_ids)


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    """InternLM2Tokenizer for an InternLM2 tokenizer.model + tokenizer_config.json, else HFChatTokenizer."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "tokenizer_config.json")
    if (model_dir / "tokenizer.model").is_file() and config.get("tokenizer_class") in _INTERNLM2_CLASSES:
        return InternLM2Tokenizer.from_dir(model_dir)
    return HFChatTokenizer.from_dir(model_dir)
