"""The SQLite file under the conversation store: WAL mode, a connection per thread and process, short transactions
retried while another writer holds the file, and the schema migrated when the store opens it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from internlm_app.store.errors import StoreFault, fault_kind
from internlm_app.store.schema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
MIN_FREE_BYTES = 64 * 1024  # less free space than this where the database lives: a full disk
RETRY_SECONDS = 30.0  # total time a transaction is retried when SQLite still reports the database busy

# SQLite's primary result codes for "another connection holds the lock" (extended codes keep them in the low byte).
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced."""


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (and their extended codes): worth retrying."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES


class SQLiteDatabase:
    """One SQLite file, safe from many threads and several processes at once; the base of ConversationStore, which
    adds the queries (callers use ConversationStore).

    Every query runs in `_read` or `_write`: one short transaction on this thread's connection."""

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
                if "no such table" in str(exc) and self._schema_gone():
                    continue  # the file was deleted while the app ran: a new one has the schema now
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

    def _schema_gone(self) -> bool:
        """The file lost its tables (deleted while the app ran, SQLite made an empty one): give it the schema again
        and say so; True when it had none and has it now (the call is tried again), False otherwise."""
        self._forget_connection()
        if self.schema_version() != 0:
            return False
        log.warning("the conversation database %s was removed while the app ran: a new, empty one is made", self.path)
        self._write(self._migrate)
        return True

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
