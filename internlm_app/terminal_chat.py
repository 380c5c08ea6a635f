"""The terminal chat (`python -m internlm_app chat`): interactive with commands, or piped with one reply per line.

Piped (stdin is not a terminal), each input line is one user message and gets exactly one output line:
- plain mode: the reply with its newlines written as the two characters `\\n` and backslashes as `\\\\` (so a
  reply never spans lines); an empty input line gets an empty output line and is not sent;
- `--jsonl`: each input line is a JSON string or {"content": ...}; each output line is a JSON object
  {"content", "finish_reason", "usage"} (and "dropped_messages" when earlier turns no longer fit the context
  window) or {"error"}.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import TextIO

from internlm_app.chat_types import ChatBackend, EngineError, InvalidRequestError, Message, ReplyEvents
from internlm_app.sampling import SamplingParams

COMMANDS = {
    "/help": "show this help",
    "/clear": "forget the conversation (the system prompt stays)",
    "/exit": "leave (also /quit, exit, quit, Ctrl-D)",
}
HELP = "\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items()) + (
    "\n  Ctrl-C stops a reply. A message that starts with / is sent as typed after a second /: //etc."
)
_EXIT = {"/exit", "/quit", "exit", "quit"}
PROMPT = ">>> "
_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # how surrogateescape reads each byte 0x80-0xff that is not UTF-8


def undecodable(text: str) -> str | None:
    """Where a line read with errors="surrogateescape" was not UTF-8 (its first such byte), else None."""
    for index, char in enumerate(text):
        if ord(char) in _ESCAPED_BYTES:
            return f"byte 0x{ord(char) - 0xDC00:02x} at character {index + 1}"
    return None


def escape_line(text: str) -> str:
    """One reply as one line: backslash and newline escaped (`\\\\`, `\\n`), carriage returns too (`\\r`)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class TerminalChat:
    """One conversation in the terminal over any ChatBackend."""

    def __init__(
        self,
        backend: ChatBackend,
        params: SamplingParams,
        system: str,
        *,
        jsonl: bool = False,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ):
        self.backend, self.params, self.jsonl = backend, params, jsonl
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.system: list[Message] = [{"role": "system", "content": system}] if system else []
        self.messages: list[Message] = list(self.system)
        self.interactive = self.stdin.isatty()
        self.failures = 0  # lines whose reply failed or that could not be sent

    def run(self) -> int:
        if self.stdin is None:  # started with stdin closed (`<&-`)
            raise ValueError("there is no standard input: pipe messages in, or run it in a terminal")
        # Bytes that are not UTF-8 become lone surrogates, which the engine refuses for that line only; under a strict
        # locale (en_US.UTF-8) readline() would raise instead and end the chat.
        if hasattr(self.stdin, "reconfigure"):
            self.stdin.reconfigure(errors="surrogateescape")
        if self.interactive:
            info = self.backend.info
            name = f"{info.name} on {info.device}"
            self._note(f"InternLM2 Chat: {name}. Type a message and press Enter; /help lists the commands.")
        while True:
            try:
                line = self._read_line()
            except KeyboardInterrupt:
                if not self.interactive:
                    raise  # piped: Ctrl-C ends the run (exit 130), not one line
                self._note("\n(Ctrl-D or /exit leaves; the conversation is kept)")
                continue
            if not line:
                break
            text = line.rstrip("\r\n")  # a CRLF line's \r is not part of the message
            if self.interactive:
                if not self._command(text.strip()):
                    break
                continue
            self._piped(text)
        # Piped: exit status 1 when any line failed (each failure has its own output line), as a script expects.
        return 1 if self.failures and not self.interactive else 0

    def _read_line(self) -> str:
        """The next line, '' at the end of the input. In a terminal (stdin and stdout), through `input()` with GNU
        readline: the arrow keys move in the line, edit a word typed in Chinese, and go back to earlier lines;
        otherwise the raw line (the prompt, in a terminal, goes to stderr)."""
        if self._line_editing:
            try:
                return input(PROMPT) + "\n"
            except EOFError:
                return ""
        if self.interactive:
            print(PROMPT, end="", file=self.stderr, flush=True)
        return self.stdin.readline()

    @functools.cached_property
    def _line_editing(self) -> bool:
        if not (self.interactive and self.stdin is sys.stdin and self.stdout is sys.stdout and sys.stdout.isatty()):
            return False
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # (not built on this platform: plain lines)
            return False
        return True

    def _command(self, text: str) -> bool:
        """Handle an interactive line; False ends the chat."""
        if not text:
            return True  # an empty line is not a message
        if text in _EXIT:
            return False
        if text in ("/clear", "clear"):
            self.messages = list(self.system)
            self._note("(the conversation was cleared)")
        elif text == "/help":
            self._note(HELP)
        elif text.startswith("/") and not text.startswith("//"):
            self._note(f"unknown command {text.split()[0]}; /help lists the commands (//… sends a message with /)")
        else:
            self._reply(text[1:] if text.startswith("//") else text, echo=True)
        return True

    def _piped(self, text: str) -> None:
        if self.jsonl:
            try:
                data = json.loads(text) if text.strip() else ""
                content = data.get("content") if isinstance(data, dict) else data
                if not isinstance(content, str):
                    raise ValueError("a line must be a JSON string or an object with a string 'content'")
            except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                self._error(f"bad input line: {exc or 'nested too deeply'}")
                return
        else:
            content = text
        if not content.strip():
            self._write(json.dumps({"content": "", "finish_reason": "skipped"}) if self.jsonl else "")
            return
        self._reply(content, echo=False)

    def _reply(self, content: str, *, echo: bool) -> None:
        if where := undecodable(content):  # the terminal or the pipe is not UTF-8: this line only is not sent
            self._error(f"this line is not UTF-8 text ({where}), so it was not sent; is the terminal set to UTF-8?")
            return
        self.messages.append({"role": "user", "content": content})
        events, parts, error = ReplyEvents(), [], None
        try:
            for chunk in self.backend.stream_reply(self.messages, self.params, events=events):
                parts.append(chunk)
                if echo:
                    print(chunk, end="", file=self.stdout, flush=True)
        except InvalidRequestError as exc:  # this line cannot be sent (e.g. bytes that are not UTF-8): say so, go on
            self.messages.pop()
            self._error(str(exc))
            return
        except EngineError as exc:
            error = str(exc)
            self.failures += 1
        except KeyboardInterrupt:
            if not self.interactive:
                raise  # piped: Ctrl-C ends the run (exit 130), not only this line
            self._note("\n[stopped]")
        reply = "".join(parts)
        self.messages.append({"role": "assistant", "content": reply})
        stats = events.stats
        dropped = (
            f"({stats.dropped_messages} earlier messages no longer fit the context window: the model did not read "
            "them for this reply; /clear starts afresh)"
            if stats.dropped_messages
            else ""
        )
        if echo:
            print(flush=True, file=self.stdout)
            if error:
                self._note(f"error: {error}")
            if dropped:
                self._note(dropped)
            self._note(
                f"[{stats.completion_tokens} tokens, {stats.tokens_per_second or 0:.1f} tok/s, {stats.finish_reason}]"
            )
        elif self.jsonl:
            usage = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
            out: dict = {"content": reply, "finish_reason": stats.finish_reason, "usage": usage}
            if stats.dropped_messages:
                out["dropped_messages"] = stats.dropped_messages  # as the API's response says it
            self._write(json.dumps({**out, "error": error} if error else out, ensure_ascii=False))
        else:
            if error:
                self._note(f"error: {error}")
            if dropped:
                self._note(dropped)
            self._write(escape_line(reply))

    def _error(self, message: str) -> None:
        self.failures += 1
        if self.jsonl:
            self._write(json.dumps({"error": message}, ensure_ascii=False))
        elif self.interactive:
            self._note(f"error: {message}")
        else:
            self._note(f"error: {message}")
            self._write("")  # still one output line per input line

    def _write(self, line: str) -> None:
        print(line, file=self.stdout, flush=True)

    def _note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)
