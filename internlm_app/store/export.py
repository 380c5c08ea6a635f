"""Export conversations as JSON or Markdown, and import a JSON export after strict validation (the file's format and
its validation: export_format.py)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from internlm_app.store import export_format as bounds  # (read at each call: the tests make them small)
from internlm_app.store.db import ConversationStore
from internlm_app.store.export_format import (
    FORMAT,
    VERSION,
    ConversationIn,
    ExportDocument,
    ImportValidationError,
    parse_export,
)
from internlm_app.store.records import Conversation, StoredMessage, title_from
from internlm_app.store.tree import Attachment, path_to

# ----- export -----


def _message_to_dict(m: StoredMessage, number: dict[int, int]) -> dict:
    return {
        "id": number[m.id],
        "parent": number.get(m.parent_id) if m.parent_id is not None else None,
        "role": m.role,
        "content": m.content,
        "status": m.status,
        "created_at": m.created_at,
        "stats": m.stats,
        "feedback": m.feedback,
        "attachments": [
            {"name": a.name, "mime_type": a.mime_type, "text": a.text, "tokens": a.tokens} for a in m.attachments
        ],
    }


def conversation_to_dict(conv: Conversation) -> dict:
    """The export form of one conversation: every message (every version), numbered 1, 2, ... in the file, each with
    its parent's number, and the selected leaf."""
    tree = conv.tree or conv.messages
    number = {m.id: n for n, m in enumerate(tree, start=1)}
    return {
        "id": conv.id,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "settings": conv.settings,
        "created_at": conv.created_at,
        "updated_at": conv.updated_at,
        "selected": number.get(conv.leaf_id) if conv.leaf_id is not None else None,
        "messages": [_message_to_dict(m, number) for m in tree],
    }


def _load(store: ConversationStore, cids: Iterable[str] | None) -> list[Conversation]:
    ids = [s.id for s in store.list_conversations(limit=None)] if cids is None else list(cids)
    conversations = []
    for cid in ids:
        conv = store.get_conversation(cid)
        if conv is None:
            if cids is None:
                continue  # deleted meanwhile
            raise KeyError(f"no conversation {cid!r}")
        conversations.append(conv)
    return conversations


def export_json(store: ConversationStore, cids: Iterable[str] | None = None) -> str:
    """A JSON export document of the given conversations (all when None), most recent first."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.time(),
        "conversations": [conversation_to_dict(c) for c in _load(store, cids)],
    }
    return json.dumps(document, ensure_ascii=False, indent=1)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def conversation_markdown(conv: Conversation) -> str:
    """One conversation as Markdown."""
    title = " ".join(conv.title.split()) or "Untitled conversation"
    parts = [f"# {title}", f"*Created {_when(conv.created_at)} · updated {_when(conv.updated_at)}*"]
    if conv.system_prompt:
        parts.append("**System prompt**\n\n" + "\n".join("> " + line for line in conv.system_prompt.splitlines()))
    for m in conv.messages:  # the selected versions
        note = "" if m.status == "complete" else f" *({m.status})*"
        note += {1: " 👍", 0: " 👎"}.get(m.feedback, "")
        files = "".join(f"\n\n*Attached: {a.name} ({a.mime_type})*" for a in m.attachments)
        stats = m.stats or {}
        steps = "".join(
            f"\n\n*Tool call: {step.get('name', '')}({step.get('arguments', '')})*"
            + (f" → {step['error'] or step.get('result', '')}" if "result" in step else " (stopped before it ran)")
            for step in stats.get("tool_steps") or []
        )
        error = f"\n\n*Error: {stats['error']}*" if m.status == "error" and stats.get("error") else ""
        parts.append(f"**{m.role.capitalize()}**{note}{files}{steps}\n\n{m.content}{error}")
    return "\n\n".join(parts) + "\n"


def export_markdown(store: ConversationStore, cids: Iterable[str] | None = None) -> str:
    """The given conversations (all when None) as one Markdown document."""
    return "\n---\n\n".join(conversation_markdown(c) for c in _load(store, cids))


# ----- import (what a valid file is: export_format.py) -----


def _to_conversation(item: ConversationIn, now: float) -> Conversation:
    created = item.created_at if item.created_at is not None else now
    linear = all(m.id is None for m in item.messages)  # an export before versions: a chain
    tree = [
        StoredMessage(
            id=n if linear else m.id,
            conversation_id="",
            role=m.role,
            content=m.content,
            created_at=m.created_at if m.created_at is not None else created,
            status=m.status,
            stats=m.stats.model_dump(exclude_unset=True) if m.stats is not None else None,
            parent_id=(n - 1 if n > 1 else None) if linear else m.parent,
            feedback=m.feedback,
            attachments=[Attachment(a.name, a.mime_type, a.text, a.tokens) for a in m.attachments],
        )
        for n, m in enumerate(item.messages, start=1)
    ]
    leaf = item.selected if item.selected is not None else (tree[-1].id if tree else None)
    by_id = {m.id: m for m in tree}
    path = path_to(by_id, {m.id: m.parent_id for m in tree}, leaf)
    updated = item.updated_at if item.updated_at is not None else max([created, *(m.created_at for m in tree)])
    title = item.title or next((title_from(m.content) for m in path if m.role == "user"), "")
    return Conversation("", title, item.system_prompt, dict(item.settings), created, updated, path, tree, leaf)


def fingerprint(conv: Conversation) -> tuple:
    """What makes two conversations the same one: system prompt, creation time and every message's role, text and
    place in the tree (not the selected version, feedback or attachments, which change without making it another)."""
    if conv.tree:
        index = {m.id: n for n, m in enumerate(conv.tree)}
        shape = [(index.get(m.parent_id, -1) if m.parent_id is not None else -1, m) for m in conv.tree]
    else:  # a path alone: a chain
        shape = list(enumerate(conv.messages, start=-1))
    return (conv.system_prompt, round(conv.created_at, 3), tuple((n, m.role, m.content) for n, m in shape))


class ImportedIds(list):
    """The new ids of an import; `skipped`: how many conversations were left out as already in the store."""

    skipped: int = 0


def import_json(store: ConversationStore, data: bytes | str, skip_existing: bool = False) -> ImportedIds:
    """Import the conversations of an export in one transaction (all or nothing) and return their new ids. With
    `skip_existing`, one the store already holds (the same `fingerprint`: an export imported again) is left out.
    `data` is one JSON export, or a ZIP of them (`export_archive`: a store too large for one file)."""
    now = time.time()
    if isinstance(data, bytes) and data.startswith(ZIP_MAGIC):
        incoming = [_to_conversation(c, now) for part in _archive_parts(data) for c in part.conversations]
    else:
        incoming = [_to_conversation(c, now) for c in parse_export(data).conversations]
    kept = incoming
    if skip_existing:
        have = {fingerprint(c) for s in store.list_conversations(limit=None) if (c := store.get_conversation(s.id))}
        kept = [c for c in incoming if fingerprint(c) not in have]
    ids = ImportedIds(store.import_conversations(kept))
    ids.skipped = len(incoming) - len(kept)
    return ids


# ----- a store too large for one export file: a ZIP of exports, each one an import takes -----

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a ZIP's first bytes: its first file, or the end of an empty one


def fits_one_file(store: ConversationStore) -> bool:
    """Whether every conversation fits one JSON export that an import takes, by what the store holds (without making
    the export): the counts, and a bound on its size that cannot be exceeded: six bytes per byte of text (a control
    character is written as \\u0001), plus 1 KiB per conversation, message and attachment (keys, numbers,
    indentation). When not, `export_archive` makes the backup."""
    conversations, messages, attachments, text_bytes = store.export_size()
    bound = 6 * text_bytes + 1024 * (conversations + messages + attachments) + 1024
    return (
        conversations <= bounds.MAX_CONVERSATIONS
        and messages <= bounds.MAX_TOTAL_MESSAGES
        and bound <= bounds.MAX_IMPORT_BYTES
    )


def export_parts(store: ConversationStore) -> Iterator[str]:
    """Every conversation (most recent first) as JSON export documents, each within what one import takes
    (MAX_CONVERSATIONS, MAX_TOTAL_MESSAGES, MAX_IMPORT_BYTES: the bytes counted exactly as written). A conversation
    larger than one file on its own is a part of its own (a ZIP's part may hold up to MAX_PART_BYTES)."""
    room = bounds.MAX_IMPORT_BYTES - len(_document([]).encode()) - 32  # (32: the export time may print longer)
    batch: list[str] = []
    messages = size = 0
    for cid in [s.id for s in store.list_conversations(limit=None)]:
        conv = store.get_conversation(cid)
        if conv is None:
            continue  # deleted meanwhile
        item = _indented(json.dumps(conversation_to_dict(conv), ensure_ascii=False, indent=1))
        count, cost = len(conv.tree or conv.messages), len(item.encode()) + len(_SEPARATOR)
        full = len(batch) >= bounds.MAX_CONVERSATIONS or messages + count > bounds.MAX_TOTAL_MESSAGES
        if batch and (full or size + cost > room):
            yield _document(batch)
            batch, messages, size = [], 0, 0
        batch.append(item)
        messages, size = messages + count, size + cost
    yield _document(batch)


_SEPARATOR = ",\n"


def _indented(item: str) -> str:
    """A conversation's JSON one level deeper, as it sits in the document's list."""
    return "  " + item.replace("\n", "\n  ")


def _document(items: list[str]) -> str:
    """An export document of conversations already in JSON (`_indented`), as export_json would write them."""
    head = json.dumps({"format": FORMAT, "version": VERSION, "exported_at": time.time()}, ensure_ascii=False)
    return head[:-1] + ', "conversations": [\n' + _SEPARATOR.join(items) + "\n]}"


def export_archive(store: ConversationStore) -> bytes:
    """A ZIP of JSON exports (`export_parts`), part-0001.json, ...: a backup of a store of any size that an import
    takes back whole (import_json reads the ZIP)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for number, part in enumerate(export_parts(store), start=1):
            archive.writestr(f"part-{number:04d}.json", part)
    return out.getvalue()


def _archive_parts(data: bytes) -> Iterator[ExportDocument]:
    """The JSON exports in a ZIP, validated, in name order, within the archive bounds (a ZIP bomb is refused by its
    declared and its real sizes); ImportValidationError for anything else."""
    if len(data) > bounds.MAX_ARCHIVE_BYTES:
        raise ImportValidationError(
            f"the ZIP is larger than {bounds.MAX_ARCHIVE_BYTES >> 20} MiB; unzip it and import its parts one by one",
            "too_large",
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = sorted((m for m in archive.infolist() if not m.is_dir()), key=lambda m: m.filename)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ImportValidationError(f"not a readable ZIP file: {exc}", "not_json") from None
    if not members or len(members) > bounds.MAX_ARCHIVE_PARTS:
        raise ImportValidationError(
            f"a ZIP of 1 to {bounds.MAX_ARCHIVE_PARTS} JSON exports; this one has {len(members)}", "invalid"
        )
    if sum(m.file_size for m in members) > bounds.MAX_ARCHIVE_JSON_BYTES:
        raise ImportValidationError(
            f"the ZIP unpacks to more than {bounds.MAX_ARCHIVE_JSON_BYTES >> 20} MiB", "too_large"
        )
    messages = 0
    for member in members:
        try:
            with archive.open(member) as part:
                text = part.read(bounds.MAX_PART_BYTES + 1)  # never more, whatever its header says
        except Exception as exc:  # a damaged member: zlib.error, lzma.LZMAError, a bad CRC, an encrypted one ...
            raise ImportValidationError(f"{member.filename}: cannot be unpacked: {exc}", "not_json") from None
        try:
            document = parse_export(text, bounds.MAX_PART_BYTES)
        except ImportValidationError as exc:
            raise ImportValidationError(f"{member.filename}: {exc}", exc.reason) from None
        messages += sum(len(c.messages) for c in document.conversations)
        if messages > bounds.MAX_ARCHIVE_MESSAGES:  # the work (and memory) of one import, whatever the parts
            raise ImportValidationError(
                f"more than {bounds.MAX_ARCHIVE_MESSAGES} messages in all; unzip it and import its parts one by one",
                "too_large",
            )
        yield document
