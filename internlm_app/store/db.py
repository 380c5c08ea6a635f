"""Durable conversation store: SQLite in WAL mode, safe from many threads and several processes at once.

ConversationStore is the one class callers use. Its conversation queries are here; it inherits those on single messages
(messages.py) and on prompt presets (presets.py), and its connections, transactions and migrations (connection.py).
The records it returns are in records.py."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable

from internlm_app.chat_types import TURN_ROLES, Message
from internlm_app.store.messages import MessageQueries
from internlm_app.store.presets import PresetQueries
from internlm_app.store.queued import QueuedMessageQueries
from internlm_app.store.records import (
    STATUSES,
    TITLE_LIMIT,
    Conversation,
    ConversationSummary,
    StoredMessage,
    check_choice,
    check_feedback,
    escape_like,
    new_id,
    stats_json,
)
from internlm_app.store.tree import (
    attachments_of,
    check_attachments,
    insert_message,
    latest_below,
    path_to,
    select_leaf,
)


def _insert_conversation(
    conn: sqlite3.Connection, title: str, system_prompt: str, settings_json: str, created_at: float, updated_at: float
) -> str:
    """Insert an empty conversation under a fresh random id and return the id."""
    cid = new_id()
    while conn.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
        cid = new_id()
    conn.execute(
        "INSERT INTO conversations (id, title, system_prompt, settings, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (cid, title, system_prompt, settings_json, created_at, updated_at),
    )
    return cid


class ConversationStore(MessageQueries, PresetQueries, QueuedMessageQueries):
    """Conversations and messages in one SQLite file; one connection per thread and process.

    `ConversationStore(path)` creates the file (and its folder) or migrates it to the current schema; StoreFault when
    the file cannot be used (see connection.SQLiteDatabase)."""

    # ----- conversations -----

    def create_conversation(self, system_prompt: str, settings: dict | None = None, title: str | None = None) -> str:
        """Create an empty conversation and return its id."""
        now = time.time()
        text = json.dumps(settings or {}, ensure_ascii=False)
        name = (title or "").strip()[:TITLE_LIMIT]

        return self._write(lambda conn: _insert_conversation(conn, name, system_prompt, text, now, now))

    def get_conversation(self, cid: str) -> Conversation | None:
        """The conversation with the path to its selected leaf (`messages`) and every message (`tree`), or None."""

        def body(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute(
                "SELECT id, title, system_prompt, settings, created_at, updated_at, leaf_id FROM conversations"
                " WHERE id = ?",
                (cid,),
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT id, conversation_id, role, content, created_at, status, stats, parent_id, feedback"
                " FROM messages WHERE conversation_id = ? ORDER BY id",
                (cid,),
            ).fetchall()
            attached = attachments_of(conn, cid)
            tree = [
                StoredMessage(*r[:6], json.loads(r[6]) if r[6] else None, r[7], r[8], attached.get(r[0], []))
                for r in rows
            ]
            by_id = {m.id: m for m in tree}
            path = path_to(by_id, {m.id: m.parent_id for m in tree}, row[6])
            return Conversation(*row[:3], json.loads(row[3]), row[4], row[5], path, tree, row[6])

        return self._read(body)

    def _summaries(
        self, where: list[str], params: tuple, limit: int | None, feedback: int | None
    ) -> list[ConversationSummary]:
        if feedback is not None:
            check_feedback(feedback)
            where = [*where, "EXISTS (SELECT 1 FROM messages f WHERE f.conversation_id = c.id AND f.feedback = ?)"]
            params = (*params, feedback)
        path_length = (
            "(WITH RECURSIVE path(id, parent_id) AS (SELECT id, parent_id FROM messages WHERE id = c.leaf_id"
            " UNION ALL SELECT m.id, m.parent_id FROM messages m JOIN path ON m.id = path.parent_id)"
            " SELECT count(*) FROM path)"
        )
        condition = " AND ".join(f"({w})" for w in where)
        sql = (
            f"SELECT c.id, c.title, c.created_at, c.updated_at, {path_length} FROM conversations c"
            f" {'WHERE ' + condition if where else ''} ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?"
        )
        rows = self._read(lambda c: c.execute(sql, (*params, -1 if limit is None else limit)).fetchall())
        return [ConversationSummary(*row) for row in rows]

    def export_size(self) -> tuple[int, int, int, int]:
        """What an export of everything would hold: conversations, messages (every version), attachments and the
        bytes (UTF-8) of their text (titles, system prompts, settings, contents, stats, attachments' names and
        text)."""
        sql = """SELECT
            (SELECT COUNT(*) FROM conversations),
            (SELECT COUNT(*) FROM messages),
            (SELECT COUNT(*) FROM attachments),
            (SELECT COALESCE(SUM(LENGTH(CAST(title AS BLOB)) + LENGTH(CAST(system_prompt AS BLOB))
                + LENGTH(CAST(settings AS BLOB))), 0) FROM conversations)
            + (SELECT COALESCE(SUM(LENGTH(CAST(content AS BLOB)) + COALESCE(LENGTH(CAST(stats AS BLOB)), 0)), 0)
                FROM messages)
            + (SELECT COALESCE(SUM(LENGTH(CAST(name AS BLOB)) + LENGTH(CAST(mime_type AS BLOB))
                + LENGTH(CAST(text AS BLOB))), 0) FROM attachments)"""
        return self._read(lambda c: tuple(c.execute(sql).fetchone()))

    def list_conversations(self, limit: int | None = 50, *, feedback: int | None = None) -> list[ConversationSummary]:
        """Conversations, most recently updated first (all of them when limit is None); with `feedback` (1 or 0)
        only those having a reply with that feedback."""
        return self._summaries([], (), limit, feedback)

    def search(self, text: str, limit: int | None = 50, *, feedback: int | None = None) -> list[ConversationSummary]:
        """Conversations whose title or any message (any version) contains `text` (case-insensitive for ASCII); with
        `feedback` (1 or 0) only those having a reply with that feedback."""
        pattern = escape_like(text)
        where = (
            "c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
            " WHERE m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\')"
        )
        return self._summaries([where], (pattern, pattern), limit, feedback)

    def rename(self, cid: str, title: str) -> bool:
        """Set the title; False when the conversation does not exist."""
        name = title.strip()[:TITLE_LIMIT]
        sql = "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?"
        return self._write(lambda c: c.execute(sql, (name, time.time(), cid)).rowcount > 0)

    def delete(self, cid: str) -> bool:
        """Delete the conversation and its messages; False when it does not exist."""
        return self._write(lambda c: c.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount > 0)

    def update_settings(self, cid: str, system_prompt: str, settings: dict | None = None) -> bool:
        """Replace the system prompt and sampling settings; False when the conversation does not exist."""
        sql = "UPDATE conversations SET system_prompt = ?, settings = ?, updated_at = ? WHERE id = ?"
        params = (system_prompt, json.dumps(settings or {}, ensure_ascii=False), time.time(), cid)
        return self._write(lambda c: c.execute(sql, params).rowcount > 0)

    # ----- paths (the methods on single messages are in messages.py) -----

    def fork(self, cid: str, mid: int) -> str:
        """Copy the conversation's path from the root down to message `mid` (included) into a new conversation, with
        the same title, system prompt and settings; return the new id. KeyError when either is missing."""
        conv = self.get_conversation(cid)
        if conv is None:
            raise KeyError(f"no conversation {cid!r}")
        by_id = {m.id: m for m in conv.tree}
        if mid not in by_id:
            raise KeyError(f"no message {mid} in conversation {cid!r}")
        path = path_to(by_id, {m.id: m.parent_id for m in conv.tree}, mid)
        now = time.time()
        copy = Conversation("", conv.title, conv.system_prompt, conv.settings, now, now, path)
        return self.import_conversations([copy])[0]

    def messages_for_model(self, cid: str) -> list[Message]:
        """What the engine should see: the system prompt, then the selected path minus empty or failed replies."""
        conv = self.get_conversation(cid)
        if conv is None:
            raise KeyError(f"no conversation {cid!r}")
        messages: list[Message] = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
        for m in conv.messages:
            if m.role == "assistant" and (m.status == "error" or not m.content.strip()):
                continue
            messages.append({"role": m.role, "content": m.content})
        return messages

    # ----- bulk -----

    def import_conversations(self, conversations: Iterable[Conversation]) -> list[str]:
        """Insert conversations (with new ids, keeping times, statuses, stats, feedback and attachments) in one
        transaction. A conversation with a `tree` keeps it (parents before children, `parent_id` and `leaf_id` among
        its message ids); one without is the linear chain of its `messages`, its last one selected."""
        items = list(conversations)
        for conv in items:
            for m in conv.tree or conv.messages:
                check_choice(m.role, TURN_ROLES, "role")
                check_choice(m.status, STATUSES, "status")
                check_feedback(m.feedback)
                check_attachments(m.attachments)

        def body(conn: sqlite3.Connection) -> list[str]:
            ids = []
            for conv in items:
                settings = json.dumps(conv.settings, ensure_ascii=False)
                title = conv.title.strip()[:TITLE_LIMIT]
                cid = _insert_conversation(conn, title, conv.system_prompt, settings, conv.created_at, conv.updated_at)
                new_ids: dict[int, int] = {}
                previous, leaf = None, None
                for m in conv.tree or conv.messages:
                    if conv.tree and m.parent_id is not None and m.parent_id not in new_ids:
                        raise ValueError(f"message {m.id}: its parent {m.parent_id} is not an earlier message")
                    parent = (new_ids[m.parent_id] if m.parent_id is not None else None) if conv.tree else previous
                    row = (m.role, m.content, m.created_at, m.status, stats_json(m.stats), m.attachments, m.feedback)
                    previous = new_ids[m.id] = insert_message(conn, cid, parent, *row)
                    leaf = previous  # a chain's last message
                if conv.tree:
                    leaf = new_ids.get(conv.leaf_id) if conv.leaf_id is not None else None
                    if conv.leaf_id is not None and leaf is None:
                        raise ValueError(f"the selected message {conv.leaf_id} is not a message of the conversation")
                    if leaf is not None:  # a selected inner message: its path goes on to a leaf, as select() does
                        leaf = latest_below(conn, leaf)
                select_leaf(conn, cid, leaf)
                ids.append(cid)
            return ids

        return self._write(body)
