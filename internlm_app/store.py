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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .chat_types import TURN_ROLES, Message, ReplyStats
from .store_errors import FAULT_KINDS as FAULT_KINDS
from .store_errors import StoreError as StoreError
from .store_errors import StoreFault, fault_kind
from .store_schema import MIGRATIONS, SCHEMA_VERSION

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


@dataclass
class Conversation:
    """A conversation with its settings and messages (oldest first)."""

    id: str
    title: str
    system_prompt: str
    settings: dict
    created_at: float
    updated_at: float
    messages: list[StoredMessage] = field(default_factory=list)


@dataclass
class ConversationSummary:
    """What the conversation list shows."""

    id: str
    title: str
    created_at: float
    updated_at: float
    message_count: int


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


def _append_message(
    conn: sqlite3.Connection, cid: str, role: str, content: str, status: str, stats_text: str | None
) -> int:
    """Insert a message inside the caller's transaction; the first user message titles an untitled conversation."""
    now, title = time.time(), title_from(content) if role == "user" else ""
    touched = conn.execute(
        "UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
        (now, title, cid),
    ).rowcount
    if not touched:
        raise KeyError(f"no conversation {cid!r}")
    cursor = conn.execute(
        "INSERT INTO messages (conversation_id, role, content, created_at, status, stats) VALUES (?, ?, ?, ?, ?, ?)",
        (cid, role, content, now, status, stats_text),
    )
    return cursor.lastrowid


def _stats_json(stats: ReplyStats | dict | None) -> str | None:
    if stats is None:
        return None
    return json.dumps(stats.to_dict() if isinstance(stats, ReplyStats) else dict(stats), ensure_ascii=False)


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


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

        def body(conn: sqlite3.Connection) -> str:
            while True:
                cid = new_id()
                if not conn.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
                    break
            conn.execute(
                "INSERT INTO conversations (id, title, system_prompt, settings, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (cid, name, system_prompt, text, now, now),
            )
            return cid

        return self._write(body)

    def get_conversation(self, cid: str) -> Conversation | None:
        """The conversation with all its messages, or None."""

        def body(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute(
                "SELECT id, title, system_prompt, settings, created_at, updated_at FROM conversations WHERE id = ?",
                (cid,),
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT id, conversation_id, role, content, created_at, status, stats FROM messages"
                " WHERE conversation_id = ? ORDER BY id",
                (cid,),
            ).fetchall()
            messages = [StoredMessage(*r[:6], stats=json.loads(r[6]) if r[6] else None) for r in rows]
            return Conversation(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], messages)

        return self._read(body)

    def _summaries(self, where: str, params: tuple, limit: int | None) -> list[ConversationSummary]:
        sql = (
            "SELECT c.id, c.title, c.created_at, c.updated_at,"
            " (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id)"
            f" FROM conversations c {where} ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?"
        )
        rows = self._read(lambda c: c.execute(sql, (*params, -1 if limit is None else limit)).fetchall())
        return [ConversationSummary(*row) for row in rows]

    def list_conversations(self, limit: int | None = 50) -> list[ConversationSummary]:
        """Conversations, most recently updated first (all of them when limit is None)."""
        return self._summaries("", (), limit)

    def search(self, text: str, limit: int | None = 50) -> list[ConversationSummary]:
        """Conversations whose title or any message contains `text` (case-insensitive for ASCII)."""
        pattern = escape_like(text)
        where = (
            "WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
            " WHERE m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\')"
        )
        return self._summaries(where, (pattern, pattern), limit)

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
        self, cid: str, role: str, content: str, status: str = "complete", stats: ReplyStats | dict | None = None
    ) -> int:
        """Append a message and return its id; the first user message titles an untitled conversation."""
        _check(role, TURN_ROLES, "role")
        _check(status, STATUSES, "status")
        stats_text = _stats_json(stats)
        return self._write(lambda conn: _append_message(conn, cid, role, content, status, stats_text))

    def replace_from(self, cid: str, mid: int, role: str, content: str) -> int:
        """Delete message `mid` and every later one, then append a new message, in one transaction (edit & resend)."""
        _check(role, TURN_ROLES, "role")

        def body(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (cid, mid))
            return _append_message(conn, cid, role, content, "complete", None)

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
        """Delete message `mid` of the conversation and every later one; return how many went."""

        def body(conn: sqlite3.Connection) -> int:
            count = conn.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (cid, mid)).rowcount
            if count:
                conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))
            return count

        return self._write(body)

    def messages_for_model(self, cid: str) -> list[Message]:
        """What the engine should see: the system prompt, then the messages minus empty or failed replies."""
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
        """Insert conversations (with new ids, keeping times, statuses and stats) in one transaction."""
        items = list(conversations)
        for conv in items:
            for m in conv.messages:
                _check(m.role, TURN_ROLES, "role")
                _check(m.status, STATUSES, "status")

        def body(conn: sqlite3.Connection) -> list[str]:
            ids = []
            for conv in items:
                cid = new_id()
                while conn.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
                    cid = new_id()
                conn.execute(
                    "INSERT INTO conversations (id, title, system_prompt, settings, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        cid,
                        conv.title.strip()[:TITLE_LIMIT],
                        conv.system_prompt,
                        json.dumps(conv.settings, ensure_ascii=False),
                        conv.created_at,
                        conv.updated_at,
                    ),
                )
                conn.executemany(
                    "INSERT INTO messages (conversation_id, role, content, created_at, status, stats)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(cid, m.role, m.content, m.created_at, m.status, _stats_json(m.stats)) for m in conv.messages],
                )
                ids.append(cid)
            return ids

        return self._write(body)
