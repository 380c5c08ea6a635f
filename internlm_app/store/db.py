"""Durable conversation store: SQLite in WAL mode, safe from many threads and several processes at once."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from internlm_app.chat_types import TURN_ROLES, Message, ReplyStats
from internlm_app.store.errors import FAULT_KINDS as FAULT_KINDS
from internlm_app.store.errors import StoreError as StoreError
from internlm_app.store.errors import StoreFault, fault_kind
from internlm_app.store.schema import MIGRATIONS, SCHEMA_VERSION
from internlm_app.store.tree import (
    FEEDBACK_VALUES,
    PRESET_LANGUAGES,
    PRESET_NAME_LIMIT,
    Attachment,
    Preset,
    Versions,
    attachments_of,
    check_attachments,
    delete_subtree,
    in_subtree,
    insert_message,
    latest_below,
    leaf_of,
    message_place,
    path_to,
    select_leaf,
)

T = TypeVar("T")

STATUSES = ("complete", "streaming", "stopped", "error")
TITLE_MAX = 60  # characters of the first user message used as the automatic title
TITLE_LIMIT = 200  # longest title a user may set
BUSY_TIMEOUT_MS = 10_000
MIN_FREE_BYTES = 64 * 1024  # less free space than this where the database lives: a full disk
RETRY_SECONDS = 30.0  # total time a transaction is retried when SQLite still reports the database busy


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced."""


@dataclass
class StoredMessage:
    """One saved message of a conversation."""

    id: int
    conversation_id: str
    role: str
    content: str
    created_at: float
    status: str = "complete"
    stats: dict | None = None
    parent_id: int | None = None
    feedback: int | None = None  # 1 thumbs up, 0 thumbs down, None none (st.feedback("thumbs"))
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class Conversation:
    """A conversation with its settings and the path of messages from the root to the selected leaf.

    `tree` holds every message (every version and branch), parents before children; `leaf_id` is the selected leaf."""

    id: str
    title: str
    system_prompt: str
    settings: dict
    created_at: float
    updated_at: float
    messages: list[StoredMessage] = field(default_factory=list)
    tree: list[StoredMessage] = field(default_factory=list)
    leaf_id: int | None = None


@dataclass
class ConversationSummary:
    """What the conversation list shows."""

    id: str
    title: str
    created_at: float
    updated_at: float
    message_count: int  # messages on the selected path


def new_id() -> str:
    """A short random url-safe conversation id."""
    return secrets.token_urlsafe(8)


def title_from(text: str) -> str:
    """An automatic title: the text on one line, truncated to TITLE_MAX characters."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_MAX else line[: TITLE_MAX - 1].rstrip() + "…"


def escape_like(text: str) -> str:
    """`text` as a LIKE pattern matching it literally anywhere (escape character backslash)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def _check_feedback(value: int | None) -> None:
    if value is not None and (type(value) is not int or value not in FEEDBACK_VALUES):
        raise ValueError(f"feedback must be 1 (thumbs up), 0 (thumbs down) or None, not {value!r:.40}")


def _append_message(
    conn: sqlite3.Connection,
    cid: str,
    parent_id: int | None,
    role: str,
    content: str,
    status: str,
    stats_text: str | None,
    attachments: Iterable[Attachment] = (),
) -> int:
    """Insert a message under `parent_id` as the selected leaf, inside the caller's transaction; the first user
    message titles an untitled conversation."""
    now, title = time.time(), title_from(content) if role == "user" else ""
    touched = conn.execute(
        "UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
        (now, title, cid),
    ).rowcount
    if not touched:
        raise KeyError(f"no conversation {cid!r}")
    mid = insert_message(conn, cid, parent_id, role, content, now, status, stats_text, attachments)
    conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (mid, cid))
    return mid


def _stats_json(stats: ReplyStats | dict | None) -> str | None:
    if stats is None:
        return None
    return json.dumps(stats.to_dict() if isinstance(stats, ReplyStats) else dict(stats), ensure_ascii=False)


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


# SQLite's primary result codes for "another connection holds the lock" (extended codes keep them in the low byte).
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (and their extended codes): worth retrying."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES


class ConversationStore:
    """Conversations and messages in one SQLite file; one connection per thread and process."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Weak, so the connection of a finished thread (Streamlit runs each rerun in a new one) closes with it.
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreFault(fault_kind(exc) or "unavailable", self.path, exc.strerror or str(exc)) from exc
        # Only a file that needs it is migrated (a write): a read-only database of the current schema opens for reading.
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            self._migrate_refused(version)
        if version < SCHEMA_VERSION:
            self._write(self._migrate)

    # ----- connections and transactions -----

    def _open(self) -> sqlite3.Connection:
        """A new connection to the file (the one place a connection is made: tests inject file faults here)."""
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, factory=_Connection)

    def _open_immutable(self) -> sqlite3.Connection:
        """A read-only connection that needs no -shm file: for a database on read-only media."""
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?immutable=1"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, factory=_Connection)

    def _connect(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) == os.getpid():
            return local.conn
        try:
            conn, local.why_read_only = self._configure(self._open()), None
        except sqlite3.OperationalError as exc:
            # A WAL database cannot even be read normally when SQLite cannot make its -shm file beside it: on a
            # read-only mount, or on a full disk. Read it as immutable then; every write fails, as what it is.
            kind = self._why_unopenable(exc)
            if kind is None:
                raise
            conn = self._open_immutable()
            conn.execute("PRAGMA query_only = ON")
            local.why_read_only = (kind, str(exc))
        local.conn, local.pid = conn, os.getpid()
        with self._lock:
            self._connections.add(conn)
        return conn

    def _why_unopenable(self, exc: sqlite3.OperationalError) -> str | None:
        """ "read_only" or "full" when the file exists but its folder takes no new file; None for other failures."""
        if fault_kind(exc) != "unavailable" or not self.path.is_file():
            return None
        if not os.access(self.path.parent, os.W_OK):
            return "read_only"
        return "full" if shutil.disk_usage(self.path.parent).free < MIN_FREE_BYTES else None

    def _configure(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError as exc:
                    if fault_kind(exc) != "read_only":
                        raise  # a read-only file stays in its journal mode and can still be read
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL survives a crash of the app, not a power cut
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, body: Callable[[sqlite3.Connection], T], begin: str) -> T:
        """Run `body` in one short transaction, retrying while another writer holds the database.

        A failure of the file itself (read-only, full, damaged, locked too long) is a StoreFault; nothing is written
        then (the transaction is rolled back), so the file is never changed by a failed call."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.005
        while True:
            try:
                conn = self._connect()
                conn.execute(begin)
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back by itself (disk full)
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as exc:  # also "file is not a database", "disk image is malformed"
                busy = isinstance(exc, sqlite3.OperationalError) and _busy(exc)
                if not busy or time.monotonic() > deadline:
                    kind, detail = fault_kind(exc), str(exc)
                    if kind is None:
                        raise  # the program's own mistake (a constraint, bad SQL), not a fault of the file
                    if kind == "read_only" and getattr(self._local, "why_read_only", None):
                        kind, detail = self._local.why_read_only  # read-only because the file could not be opened
                    self._forget_connection()  # the next call starts afresh: the file may be fixed by then
                    raise StoreFault(kind, self.path, detail) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _forget_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        vars(self._local).clear()
        if conn is not None:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        return self._run(body, "BEGIN IMMEDIATE")

    def _read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        return self._run(body, "BEGIN")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._migrate_refused(version)
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in step:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")

    def _migrate_refused(self, version: int) -> None:
        raise StoreFault("newer", self.path, f"schema version {version}; this app knows up to {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        """The schema version of the file."""
        return self._read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close every connection this store opened (the store reopens on the next use)."""
        with self._lock:
            connections, self._connections = list(self._connections), weakref.WeakSet()
        for conn in connections:
            conn.close()
        self._local = threading.local()

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
            _check_feedback(feedback)
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

    # ----- messages -----

    def add_message(
        self,
        cid: str,
        role: str,
        content: str,
        status: str = "complete",
        stats: ReplyStats | dict | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> int:
        """Append a message (with its attachments) below the selected leaf, make it the leaf and return its id; the
        first user message titles an untitled conversation."""
        _check(role, TURN_ROLES, "role")
        _check(status, STATUSES, "status")
        stats_text, files = _stats_json(stats), check_attachments(attachments)

        def body(conn: sqlite3.Connection) -> int:
            return _append_message(conn, cid, leaf_of(conn, cid), role, content, status, stats_text, files)

        return self._write(body)

    def add_version(
        self,
        mid: int,
        content: str,
        status: str = "complete",
        stats: ReplyStats | dict | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> int:
        """Add another version of message `mid` (same parent, same role) and select it; return its id.

        Regenerate: `add_version(reply_id, "", "streaming")`, then `messages_for_model` (the empty reply is left out)
        and `update_message` as it streams. Edit of any user message: `add_version(user_id, text)` starts a branch;
        then append the reply with `add_message`. The old versions stay, reachable with `versions` and `select`."""
        _check(status, STATUSES, "status")
        stats_text, files = _stats_json(stats), check_attachments(attachments)

        def body(conn: sqlite3.Connection) -> int:
            place = message_place(conn, mid)
            if place is None:
                raise KeyError(f"no message {mid}")
            cid, parent_id, role = place
            return _append_message(conn, cid, parent_id, role, content, status, stats_text, files)

        return self._write(body)

    def versions(self, mid: int) -> Versions | None:
        """The versions of message `mid` (its siblings and itself, oldest first) and its index, or None when gone."""

        def body(conn: sqlite3.Connection) -> Versions | None:
            place = message_place(conn, mid)
            if place is None:
                return None
            rows = conn.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY id", place[:2]
            ).fetchall()
            ids = tuple(r[0] for r in rows)
            return Versions(ids, ids.index(mid))

        return self._read(body)

    def select(self, mid: int) -> bool:
        """Switch to version `mid`: the path goes through it down to the most recently created or selected message
        below it. False when the message is gone."""

        def body(conn: sqlite3.Connection) -> bool:
            place = message_place(conn, mid)
            if place is None:
                return False
            select_leaf(conn, place[0], latest_below(conn, mid))
            return True

        return self._write(body)

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

    def set_feedback(self, mid: int, value: int | None) -> bool:
        """Set a reply's feedback: 1 thumbs up, 0 thumbs down, None none (as st.feedback("thumbs") gives it); False
        when the message is gone, ValueError for a message that is not a reply."""
        _check_feedback(value)

        def body(conn: sqlite3.Connection) -> bool:
            place = message_place(conn, mid)
            if place is None:
                return False
            if place[2] != "assistant":
                raise ValueError(f"feedback is for replies; message {mid} is a {place[2]} message")
            conn.execute("UPDATE messages SET feedback = ? WHERE id = ?", (value, mid))
            return True

        return self._write(body)

    def replace_from(self, cid: str, mid: int, role: str, content: str) -> int:
        """Delete message `mid` and everything below it, then add a new message in its place, in one transaction.

        Today's edit & resend on a linear chat; `add_version` replaces it (it keeps the old version)."""
        _check(role, TURN_ROLES, "role")

        def body(conn: sqlite3.Connection) -> int:
            place = message_place(conn, mid)
            if place is None or place[0] != cid:
                return _append_message(conn, cid, leaf_of(conn, cid), role, content, "complete", None)
            delete_subtree(conn, mid)
            return _append_message(conn, cid, place[1], role, content, "complete", None)

        return self._write(body)

    def update_message(self, mid: int, content: str, status: str, stats: ReplyStats | dict | None = None) -> bool:
        """Replace a message's content and status (stats None keeps the saved stats); False when it is gone."""
        _check(status, STATUSES, "status")
        now, stats_text = time.time(), _stats_json(stats)

        def body(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (mid,)).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE messages SET content = ?, status = ?, stats = coalesce(?, stats) WHERE id = ?",
                (content, status, stats_text, mid),
            )
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, row[0]))
            return True

        return self._write(body)

    def delete_messages_from(self, cid: str, mid: int) -> int:
        """Delete message `mid` of the conversation and everything below it (on a linear chat: every later one);
        return how many went. When the selected leaf went, the path ends at `mid`'s parent.

        Today's regenerate deletes the last reply with it; `add_version` replaces it (it keeps the old reply)."""

        def body(conn: sqlite3.Connection) -> int:
            place = message_place(conn, mid)
            if place is None or place[0] != cid:
                return 0
            leaf_went = in_subtree(conn, mid, leaf_of(conn, cid))
            count = delete_subtree(conn, mid)
            if leaf_went:
                select_leaf(conn, cid, place[1])
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))
            return count

        return self._write(body)

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
                _check(m.role, TURN_ROLES, "role")
                _check(m.status, STATUSES, "status")
                _check_feedback(m.feedback)
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
                    row = (m.role, m.content, m.created_at, m.status, _stats_json(m.stats), m.attachments, m.feedback)
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

    # ----- prompt presets -----

    def list_presets(self, language: str | None = None) -> list[Preset]:
        """The saved system prompt presets (those for `language` and for both when it is given), by name."""
        where, params = "", ()
        if language is not None:
            _check(language, PRESET_LANGUAGES, "language")
            where, params = "WHERE language IN (?, 'both')", (language,)
        sql = f"SELECT id, name, system_prompt, language FROM presets {where} ORDER BY name, language, id"
        return [Preset(*row) for row in self._read(lambda c: c.execute(sql, params).fetchall())]

    def save_preset(self, name: str, system_prompt: str, language: str = "both", preset_id: int | None = None) -> int:
        """Save a preset and return its id: a new one, or the one of that name and language (its prompt replaced),
        or with `preset_id` that one (renamed too). KeyError when `preset_id` is gone, ValueError for a name that is
        empty or taken by another preset of the language."""
        _check(language, PRESET_LANGUAGES, "language")
        title = " ".join(name.split())[:PRESET_NAME_LIMIT]
        if not title:
            raise ValueError("a preset needs a name")

        def body(conn: sqlite3.Connection) -> int:
            same = conn.execute("SELECT id FROM presets WHERE name = ? AND language = ?", (title, language)).fetchone()
            if preset_id is None:
                if same is not None:
                    conn.execute("UPDATE presets SET system_prompt = ? WHERE id = ?", (system_prompt, same[0]))
                    return same[0]
                sql = "INSERT INTO presets (name, system_prompt, language) VALUES (?, ?, ?)"
                return conn.execute(sql, (title, system_prompt, language)).lastrowid
            if same is not None and same[0] != preset_id:
                raise ValueError(f"another preset is named {title!r}")
            sql = "UPDATE presets SET name = ?, system_prompt = ?, language = ? WHERE id = ?"
            if not conn.execute(sql, (title, system_prompt, language, preset_id)).rowcount:
                raise KeyError(f"no preset {preset_id}")
            return preset_id

        return self._write(body)

    def delete_preset(self, preset_id: int) -> bool:
        """Delete a preset (a default one too: it does not come back); False when it does not exist."""
        return self._write(lambda c: c.execute("DELETE FROM presets WHERE id = ?", (preset_id,)).rowcount > 0)
