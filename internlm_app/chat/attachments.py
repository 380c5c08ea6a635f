"""Documents in the chat: text, Markdown, code and PDF files read as text, counted in the model's tokens, fitted into
the room the context budget leaves, and put into the user's turn.

Prompt format (inside the user turn, before the message): one block per file,

    File: report.pdf (pages 1-3 of 12)
    ````
    --- page 1 ---
    ...
    ````

a fence longer than any run of backticks in the text, so the text cannot close it. A file that does not fit whole is
cut to what does: its leading pages (or lines), or with a question the parts that match it best (BM25, `bm25s`), and
the header says which parts are there.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from internlm_app.chat_types import ChatBackend, Message

MAX_FILE_BYTES = 20 << 20  # a file larger than this is refused before it is read
MAX_PDF_PAGES = 500
MAX_TEXT_CHARS = 2_000_000  # text of one file, after extraction
CHUNK_CHARS = 1500  # the parts a file is cut into to fit: lines joined up to about this many characters, or less
MIN_CHUNK_CHARS = 200  # (a small budget gets smaller parts: about a quarter of what it holds, not below this)
JOIN_TOKENS = 4  # kept per file for the blank line that joins it to the next and tokens merging across the join
MAX_NAME_CHARS = 200  # a file name shown in the prompt

_TEXT_TYPES = (
    "txt md markdown rst csv tsv json jsonl yaml yml toml ini cfg conf log xml html htm tex py ipynb js mjs ts tsx "
    "jsx java kt go rs c h cc cpp hpp cs rb php swift scala r m sh bash zsh ps1 sql css scss lua pl hs vue svelte "
    "dart proto diff patch"
)
TEXT_SUFFIXES = frozenset(f".{suffix}" for suffix in _TEXT_TYPES.split())
Reason = Literal[
    "unsupported_type",
    "not_text",
    "pdf_encrypted",
    "pdf_unreadable",
    "too_large",
    "too_many_pages",
    "empty",
    "pdf_no_text",
]


class AttachmentError(ValueError):
    """A file that cannot be attached: `reason` is for code (the web app words it per language), the message for
    people."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Attachment:
    """A file's text: one page per PDF page, one for any other file."""

    name: str
    kind: Literal["text", "pdf"]
    pages: list[str]

    @property
    def text(self) -> str:
        return "\n\n".join(self.pages)


def read_attachment(name: str, data: bytes) -> Attachment:
    """The text of an uploaded file, by its name's suffix; raises AttachmentError."""
    name = PurePath(name).name[:MAX_NAME_CHARS] or "file"
    if len(data) > MAX_FILE_BYTES:
        raise AttachmentError("too_large", f"{name} is {len(data) >> 20} MiB; files up to {MAX_FILE_BYTES >> 20} MiB")
    suffix = PurePath(name).suffix.lower()
    if suffix == ".pdf" or data.startswith(b"%PDF-"):
        pages = _pdf_pages(name, data)
        kind: Literal["text", "pdf"] = "pdf"
    elif suffix in TEXT_SUFFIXES or (not suffix and name.lower() in ("dockerfile", "makefile", "readme", "license")):
        pages, kind = [_decode(name, data)], "text"
    else:
        raise AttachmentError(
            "unsupported_type", f"{name}: only text, Markdown, code and PDF files can be attached, not {suffix or name}"
        )
    if sum(len(page) for page in pages) > MAX_TEXT_CHARS:
        raise AttachmentError("too_large", f"{name} holds more than {MAX_TEXT_CHARS} characters of text")
    if not any(page.strip() for page in pages):
        if kind == "pdf":
            raise AttachmentError("pdf_no_text", f"{name} has no text (a scanned PDF has images, not text)")
        raise AttachmentError("empty", f"{name} has no text")
    return Attachment(name, kind, pages)


def _decode(name: str, data: bytes) -> str:
    """A text file's text: UTF-8 (or UTF-16 with a BOM), else GB2312 as it stands (most Chinese files that are not
    UTF-8), else GB18030 or Windows-1252 (Latin-1), or Big5 in a longer file, whichever `charset_normalizer` finds
    most coherent, else GB18030 as it decodes. GB18030 alone takes almost any bytes, so a Latin-1 file came in as
    wrong Chinese; a detector free to pick any encoding reads short GBK text as Korean or Big5, hence so few
    candidates."""
    strict = ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig", "gb2312")
    for encoding in strict:
        try:
            return _checked_text(name, data.decode(encoding))
        except UnicodeDecodeError:
            continue
    from charset_normalizer import from_bytes

    candidates = [*_CANDIDATES, *(_LONG_CANDIDATES if len(data) >= _LONG_BYTES else ())]
    best = from_bytes(data, cp_isolation=candidates).best()
    if best is not None:
        return _checked_text(name, str(best))
    try:
        return _checked_text(name, data.decode("gb18030"))
    except UnicodeDecodeError:
        raise AttachmentError("not_text", f"{name} is not text in UTF-8, UTF-16, GB18030 or Latin-1") from None


_CANDIDATES = ("gb18030", "cp1252")  # after UTF-8 and GB2312: Chinese beyond GB2312, and Western European text
# Big5 (Traditional Chinese) only from this many bytes on: in shorter text the detector takes GBK for Big5.
_LONG_CANDIDATES, _LONG_BYTES = ("big5",), 48


def _checked_text(name: str, text: str) -> str:
    if "\x00" in text:  # a binary file that happens to decode
        raise AttachmentError("not_text", f"{name} is not a text file (it holds NUL bytes)")
    return text.replace("\r\n", "\n")


def _pdf_pages(name: str, data: bytes) -> list[str]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # an owner password alone still lets it be read
            raise AttachmentError("pdf_encrypted", f"{name} is protected by a password")
        count = len(reader.pages)
        if count > MAX_PDF_PAGES:
            raise AttachmentError("too_many_pages", f"{name} has {count} pages; PDFs of up to {MAX_PDF_PAGES} pages")
        return [(page.extract_text() or "").strip() for page in reader.pages]
    except AttachmentError:
        raise
    except Exception as exc:
        # pypdf raises its own errors for damaged files, and any plain one for a malformed object where another was
        # expected (AttributeError, IndexError, AssertionError, ...): a file from anyone is damaged, not a bug here
        if "decrypt" in str(exc).lower() or "cryptography" in str(exc).lower():
            raise AttachmentError("pdf_encrypted", f"{name} is encrypted in a way that cannot be read: {exc}") from None
        raise AttachmentError("pdf_unreadable", f"{name} is not a readable PDF: {exc}") from None


# Counting tokens


def token_counter(backend: ChatBackend) -> Callable[[str], int]:
    """`count_tokens(text)` in the backend's tokens: exact with a local model's tokenizer; for a remote backend the
    estimate below."""
    return backend.count_tokens


_CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def estimate_tokens(text: str) -> int:
    """Tokens of `text`, erring high: a CJK character or 3 other characters per token (InternLM2's tokenizer takes
    about 1.5 CJK characters and 4 English characters per token)."""
    cjk = len(_CJK.findall(text))
    return cjk + -(-(len(text) - cjk) // 3)


def room_for_attachments(
    backend: ChatBackend, messages: list[Message], max_new_tokens: int, max_length: int | None = None
) -> int:
    """Tokens left for attachments in the last (user) message: the budget less the prompt as it is and the reply."""
    window = backend.context_window if max_length is None else min(max_length, backend.context_window)
    return max(window - backend.prompt_tokens(messages) - max_new_tokens, 0)


# Fitting and formatting


@dataclass(frozen=True)
class Part:
    """A piece of a file: a page of a PDF or a run of lines of another file (numbers from 1, inclusive)."""

    label: str  # "page 3", "lines 10-42"
    text: str


@dataclass(frozen=True)
class FittedAttachment:
    """What of one file goes into the prompt: `block` (the formatted text), its tokens, and whether it is whole."""

    name: str
    block: str
    tokens: int
    complete: bool
    how: Literal["whole", "leading", "best_matching", "none"]
    parts: list[str] = field(default_factory=list)  # labels of the parts included ("page 1", "lines 1-40")
    total_parts: int = 0


def parts_of(attachment: Attachment, chunk_chars: int = CHUNK_CHARS) -> list[Part]:
    """The file cut into parts: PDF pages (a long page in pieces), or runs of lines of about `chunk_chars`."""
    if attachment.kind == "pdf":
        parts = []
        for number, page in enumerate(attachment.pages, 1):
            pieces = _chunks(page, chunk_chars) if len(page) > chunk_chars * 2 else [(1, 1, page)]
            suffix = len(pieces) > 1
            parts += [
                Part(f"page {number}" + (f" ({i}/{len(pieces)})" if suffix else ""), text)
                for i, (_, _, text) in enumerate(pieces, 1)
            ]
        return parts
    return [Part(f"lines {first}-{last}", text) for first, last, text in _chunks(attachment.text, chunk_chars)]


def _chunks(text: str, size_limit: int) -> list[tuple[int, int, str]]:
    """Runs of whole lines of about `size_limit` characters (a longer line is split), with their first and last line
    numbers."""
    out: list[tuple[int, int, str]] = []
    lines: list[str] = []
    first = 1
    size = 0
    for number, line in enumerate(text.split("\n"), 1):
        while len(line) > size_limit:
            if lines:
                out.append((first, number - 1, "\n".join(lines)))
                lines, size = [], 0
            out.append((number, number, line[:size_limit]))
            line = line[size_limit:]
            first = number
        if lines and size + len(line) > size_limit:
            out.append((first, number - 1, "\n".join(lines)))
            lines, size = [], 0
        if not lines:
            first = number
        lines.append(line)
        size += len(line) + 1
    if lines:
        out.append((first, first + len(lines) - 1, "\n".join(lines)))
    return out


def format_block(name: str, body: str, note: str = "") -> str:
    """One file in the prompt: `File: name (note)` and its text in a fence no run of backticks in it can close."""
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"File: {name}{f' ({note})' if note else ''}\n{fence}\n{body}\n{fence}"


def _block_of(attachment: Attachment, parts: list[Part], total: int, complete: bool) -> str:
    if attachment.kind == "pdf":
        body = "\n\n".join(f"--- {part.label} ---\n{part.text}" for part in parts)
        note = f"{len(attachment.pages)} pages" if complete else f"{_labels(parts)} of {len(attachment.pages)} pages"
    else:
        body = "\n".join(part.text for part in parts) if complete else "\n...\n".join(p.text for p in parts)
        note = "" if complete else f"{_labels(parts)} of {attachment.text.count(chr(10)) + 1}; the rest did not fit"
    return format_block(attachment.name, body, note)


def _labels(parts: list[Part]) -> str:
    return ", ".join(part.label for part in parts)


def _within_chars(count_tokens: Callable[[str], int], budget: int) -> Callable[[str], int]:
    """`count_tokens`, except that a block longer than MAX_ATTACHMENT_CHARS does not fit any `budget`: what the
    store keeps of a file is what its export carries and an import takes back (a text of many characters per token
    could fit the tokens and not that)."""
    from internlm_app.store.export_format import MAX_ATTACHMENT_CHARS

    def count(text: str) -> int:
        return budget + 1 if len(text) > MAX_ATTACHMENT_CHARS else count_tokens(text)

    return count


def fit_attachment(
    attachment: Attachment,
    count_tokens: Callable[[str], int],
    budget: int,
    question: str = "",
    strategy: Literal["leading", "best_matching"] = "leading",
) -> FittedAttachment:
    """The file as it fits in `budget` tokens: whole when it can, else its leading parts, or with `best_matching`
    and a question the parts that match the question best (in the file's order; the leading parts when none
    matches). When not one part fits, the start of the first (or best) part; a budget too small even for the
    header gives how="none" and an empty block."""
    count_tokens = _within_chars(count_tokens, budget)
    parts = parts_of(attachment)
    whole = _block_of(attachment, parts, len(parts), complete=True)
    tokens = count_tokens(whole)
    if tokens <= budget:
        return FittedAttachment(attachment.name, whole, tokens, True, "whole", [p.label for p in parts], len(parts))
    chars_per_token = len(whole) / max(tokens, 1)
    parts = parts_of(attachment, int(min(CHUNK_CHARS, max(MIN_CHUNK_CHARS, budget * chars_per_token / 4))))
    costs = [count_tokens(part.text) + 8 for part in parts]  # a part's text and its label line
    overhead = count_tokens(format_block(attachment.name, "", "page 1, page 2 of 100 pages; the rest did not fit"))
    order = list(range(len(parts)))
    how: Literal["leading", "best_matching"] = "leading"
    if strategy == "best_matching" and question.strip():
        ranked = _rank(parts, question)
        if ranked is not None:
            order, how = ranked, "best_matching"
    chosen: list[int] = []
    used = overhead
    for index in order:
        if used + costs[index] > budget:
            if how == "leading":
                break  # leading parts stay contiguous
            continue
        chosen.append(index)
        used += costs[index]
    while chosen:  # the estimate above sums parts; check the real block and drop the last part while it is over
        picked = [parts[i] for i in sorted(chosen)]
        block = _block_of(attachment, picked, len(parts), complete=False)
        tokens = count_tokens(block)
        if tokens <= budget:
            return FittedAttachment(attachment.name, block, tokens, False, how, [p.label for p in picked], len(parts))
        chosen.pop()
    # Not even one part fits: the leading characters of the first (or best matching) part that do.
    first = parts[order[0]]
    low, high = 0, len(first.text)
    while low < high:  # the longest prefix whose block fits
        middle = (low + high + 1) // 2
        cut = Part(f"{first.label}, its start", first.text[:middle])
        if count_tokens(_block_of(attachment, [cut], len(parts), complete=False)) <= budget:
            low = middle
        else:
            high = middle - 1
    if low:
        cut = Part(f"{first.label}, its start", first.text[:low])
        block = _block_of(attachment, [cut], len(parts), complete=False)
        return FittedAttachment(attachment.name, block, count_tokens(block), False, how, [cut.label], len(parts))
    return FittedAttachment(attachment.name, "", 0, False, "none", [], len(parts))


_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)


def search_terms(text: str) -> list[str]:
    """Terms for BM25: lower-cased words of Latin (and other spaced) scripts, and overlapping pairs of characters of
    Chinese, Japanese and Korean, which have no spaces between words."""
    terms: list[str] = []
    for word in _WORD.findall(text.lower()):
        if _CJK.search(word):
            runs = [run for run in re.split(r"([\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff]+)", word) if run]
            for run in runs:
                if _CJK.match(run):
                    terms += [run[i : i + 2] for i in range(max(len(run) - 1, 1))]
                else:
                    terms.append(run)
        else:
            terms.append(word)
    return terms


def _rank(parts: list[Part], question: str) -> list[int] | None:
    """Indexes of the parts that match the question, best BM25 score first; None when none does."""
    import bm25s

    corpus = [search_terms(part.text) or ["\x00"] for part in parts]
    vocabulary = {term for terms in corpus for term in terms}
    query = [term for term in search_terms(question) if term in vocabulary]
    if not query:
        return None
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = retriever.get_scores(query)
    ranked = sorted((i for i in range(len(parts)) if scores[i] > 0), key=lambda i: (-float(scores[i]), i))
    return ranked or None  # only parts that share a term with the question


def fit_attachments(
    attachments: list[Attachment],
    count_tokens: Callable[[str], int],
    budget: int,
    question: str = "",
    strategy: Literal["leading", "best_matching"] = "leading",
) -> list[FittedAttachment]:
    """Several files in one budget (the message's own tokens not included): the ones that fit in an equal share go
    whole, the others share the rest; JOIN_TOKENS per file are kept for the joins of `with_attachments`. When the
    shares get too small for some file to send anything (20 small files in a small budget: each share was below a
    file's header, so none was sent), the last files get nothing and the first ones their shares again, until every
    file in the split sends something."""
    n = len(attachments)

    def first(k: int) -> dict[int, FittedAttachment] | None:
        """The split over the first k files, if each of them sends something."""
        fitted = _share(attachments, list(range(k)), count_tokens, budget, question, strategy)
        return fitted if all(fitted[i].block for i in range(k)) else None

    best = first(n)
    if best is None and n > 1:  # the most files, in order, that each send something (fewer get more: binary search)
        lo, hi = 1, n - 1
        best = _share(attachments, [0], count_tokens, budget, question, strategy)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (fitted := first(mid)) is not None:
                best, lo = fitted, mid
            else:
                hi = mid - 1
    elif best is None:
        best = _share(attachments, [0], count_tokens, budget, question, strategy)
    return [
        best[i] if i in best else fit_attachment(a, count_tokens, 0, question, strategy)
        for i, a in enumerate(attachments)
    ]


def _share(
    attachments: list[Attachment],
    candidates: list[int],
    count_tokens: Callable[[str], int],
    budget: int,
    question: str,
    strategy: Literal["leading", "best_matching"],
) -> dict[int, FittedAttachment]:
    """Water-filling over the `candidates`: small files get what they need whole, the rest is split again."""
    fitted: dict[int, FittedAttachment] = {}
    left, waiting = budget - JOIN_TOKENS * len(candidates), list(candidates)
    changed = True
    while waiting and changed:
        changed = False
        share = left // len(waiting)
        for index in list(waiting):
            whole = fit_attachment(attachments[index], count_tokens, share, question, strategy)
            if whole.complete:
                fitted[index], left = whole, left - whole.tokens
                waiting.remove(index)
                changed = True
    for index in waiting:
        fitted[index] = fit_attachment(attachments[index], count_tokens, left // len(waiting), question, strategy)
    return fitted


def with_attachments(message: str, fitted: list[FittedAttachment]) -> str:
    """The user turn's content: the files' blocks (those with any text), then the message."""
    blocks = [f.block for f in fitted if f.block]
    return "\n\n".join([*blocks, message]) if blocks else message
