"""Export conversations as JSON or Markdown, and import a JSON export after strict validation (the file's format and
its validation: export_format.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from internlm_app.store.db import ConversationStore
from internlm_app.store.export_format import FORMAT, VERSION, ConversationIn, parse_export
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
        parts.append(f"**{m.role.capitalize()}**{note}{files}\n\n{m.content}")
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
    `skip_existing`, one the store already holds (the same `fingerprint`: an export imported again) is left out."""
    document = parse_export(data)
    now = time.time()
    incoming = [_to_conversation(c, now) for c in document.conversations]
    kept = incoming
    if skip_existing:
        have = {fingerprint(c) for s in store.list_conversations(limit=None) if (c := store.get_conversation(s.id))}
        kept = [c for c in incoming if fingerprint(c) not in have]
    ids = ImportedIds(store.import_conversations(kept))
    ids.skipped = len(incoming) - len(kept)
    return ids
