"""Markdown that cannot reach out: no remote images, no data:/javascript: links, untrusted values as plain text.

Streamlit renders Markdown in the browser (images load from anywhere, a `data:` link stays clickable) and has no
option to turn that off, so text is made safe before it is handed over. markdown-it-py, a CommonMark parser like the
browser's, finds what the text really contains; the text is then changed with backslash escapes only, so everything
else (code, LaTeX, tables) renders as before.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator
from functools import lru_cache

from markdown_it import MarkdownIt
from markdown_it.token import Token

SAFE_SCHEMES = frozenset({"http", "https", "mailto"})  # a link with no scheme (relative) stays too
IMAGE_PLACEHOLDER = "image"  # the link text of an image without alt text, so there is something to click
_MARK_BASE = 0xF0000  # Supplementary Private Use Area-A: one marker character per `![` while checking for code
_MARK_LIMIT = 0xFFFE
_MAX_PASSES = 4

# Only text that contains one of these can hold an image or a link with a scheme (prefilter, no parse otherwise).
_MAYBE_LINK = re.compile(r"!\[|\]\(|\]:|<[A-Za-z][A-Za-z0-9+.\-]{1,31}:", re.ASCII)
_IMAGE_START = re.compile(r"(\\*)!\[")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_AUTOLINK_START = re.compile(r"(?i)(https?|ftp|www|mailto|xmpp)(?=[:.])|(?=@)")
_WORD_JOINER = "\u2060"  # invisible; it keeps the browser's Markdown from turning a URL or address into a link


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    md.validateLink = lambda url: True  # see every link: the scheme is judged here, not silently dropped
    return md


_MD = _parser()


def plain(text: str) -> str:
    """`text` as Markdown that shows exactly that text: no formatting, no link, no image, no icon or colour."""
    unlinked = _AUTOLINK_START.sub(lambda m: (m.group(1) or "") + _WORD_JOINER, str(text))
    return _ASCII_PUNCTUATION.sub(r"\\\1", unlinked)


def code_span(text: str) -> str:
    """`text` as an inline code span: shown exactly, in code type, whatever backticks it holds (newlines: spaces)."""
    text = " ".join(str(text).splitlines())
    if not text.strip():
        return plain(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def safe_link(href: str) -> bool:
    """True for a link the browser may follow: http, https, mailto, or relative (no scheme)."""
    target = _CONTROL_OR_SPACE.sub("", urllib.parse.unquote(href))  # as a browser reads it, and then some
    scheme = _SCHEME.match(target)
    return scheme is None or scheme.group(1).lower() in SAFE_SCHEMES


@lru_cache(maxsize=256)  # redraws of the same messages; streamed texts pass through
def safe_markdown(text: str) -> str:
    """`text` with every image turned into a link to it, and every link to another scheme than http(s)/mailto
    (data:, javascript:, file: ...) turned into plain text; a text without either comes back unchanged."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd")  # line numbers as the parser's
    if not _MAYBE_LINK.search(text):
        return text
    text = _images_as_links(text)
    for _ in range(_MAX_PASSES):
        lines = _unsafe_lines(text)
        if not lines:
            return text
        text = _escape_in_lines(text, lines, "[<!")
    return plain(text)  # not expected: a construct the passes could not take apart is shown as the text it is


def _walk(tokens: list[Token]) -> Iterator[tuple[Token, Token | None]]:
    """Every token with its enclosing inline token (None at block level)."""
    for token in tokens:
        yield token, None
        for child in token.children or ():
            yield child, token


def _in_code(text: str, runs: list[int]) -> set[int]:
    """Which k have runs[k] (where a backslash run before some character starts) inside a code span or block.

    A marker character put there leaves escapes, code spans and blocks as they were; the markers that land in code
    are the answer. Should markers not be possible, nothing counts as code (the safe side: all gets escaped)."""
    if not runs or len(runs) >= _MARK_LIMIT or any(_MARK_BASE <= ord(c) < _MARK_BASE + _MARK_LIMIT for c in text):
        return set()
    marked, last = [], 0
    for k, run in enumerate(runs):
        marked += [text[last:run], chr(_MARK_BASE + k)]
        last = run
    marked.append(text[last:])
    in_code: set[int] = set()
    for token, _ in _walk(_MD.parse("".join(marked))):
        if token.type in ("code_inline", "fence", "code_block"):
            in_code.update(ord(c) - _MARK_BASE for c in token.content if ord(c) >= _MARK_BASE)
    return in_code


def _images_as_links(text: str) -> str:
    """Put a backslash before every `!` that starts an image outside code: `![alt](url)` becomes `!` + a link."""
    # (where its backslash run starts, where the `!` is) of each `![` whose `!` no backslash escapes
    starts = [(m.start(), m.end() - 2) for m in _IMAGE_START.finditer(text) if len(m.group(1)) % 2 == 0]
    in_code = _in_code(text, [run for run, _ in starts])  # Rust's `vec![1]` stays as it is
    out, last = [], 0
    for k, (_, bang) in enumerate(starts):
        if k in in_code:
            continue
        empty_alt = text.startswith("[]", bang + 1)
        out += [text[last:bang], "\\![" + IMAGE_PLACEHOLDER if empty_alt else "\\!"]
        last = bang + (2 if empty_alt else 1)
    out.append(text[last:])
    return "".join(out)


def _unsafe_lines(text: str) -> set[int]:
    """Line numbers of the paragraphs (or cells) that still hold an image or a link with an unsafe scheme."""
    lines: set[int] = set()
    for token, inline in _walk(_MD.parse(text)):
        unsafe = token.type == "image" or (token.type == "link_open" and not safe_link(token.attrGet("href") or ""))
        if unsafe:
            where = inline.map if inline is not None else None
            if where is None:
                return set(range(text.count("\n") + 1))
            lines.update(range(where[0], where[1]))
    return lines


def _escape_in_lines(text: str, lines: set[int], chars: str) -> str:
    """Escape every unescaped character of `chars` outside code on the given lines: no link or image starts there."""
    pattern = re.compile(r"(\\*)([" + re.escape(chars) + "])")
    found, offset = [], 0  # (where the backslash run starts, where the character is)
    for i, line in enumerate(text.split("\n")):
        if i in lines:
            found += [
                (offset + m.start(), offset + m.end() - 1) for m in pattern.finditer(line) if len(m.group(1)) % 2 == 0
            ]
        offset += len(line) + 1
    in_code = _in_code(text, [run for run, _ in found])
    out, last = [], 0
    for k, (_, char) in enumerate(found):
        if k not in in_code:
            out += [text[last:char], "\\"]
            last = char
    out.append(text[last:])
    return "".join(out)
