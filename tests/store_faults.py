"""File faults of the conversation database, made by SQLite itself (no fake store, no faked error).

Tests run as root, for whom a read-only file is writable and no small disk can be mounted without privileges, so:
- read-only: the store's connections open the file with SQLite's `mode=ro` (what SQLite does for a file it may
  not write), through the store's one seam for connections, `ConversationStore._open`;
- full disk: `PRAGMA max_page_count` at the file's current size, so every write that needs another page fails as
  SQLite fails on a full disk (SQLITE_FULL, "database or disk is full");
- damaged: bytes of a real database overwritten, or a file that is no database at all.
"""

from __future__ import annotations

import hashlib
import sqlite3
import urllib.parse
from pathlib import Path

from internlm_app.store.connection import _Connection
from internlm_app.store.db import ConversationStore

_open = ConversationStore._open


def _read_only_open(self: ConversationStore) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, factory=_Connection)


def _full_disk_open(self: ConversationStore) -> sqlite3.Connection:
    conn = _open(self)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
    return conn


def make_read_only(monkeypatch) -> None:
    """Every connection opened from now on can only read."""
    monkeypatch.setattr(ConversationStore, "_open", _read_only_open)


def make_disk_full(monkeypatch) -> None:
    """Every connection opened from now on cannot grow the file: a write that needs a page fails with SQLITE_FULL."""
    monkeypatch.setattr(ConversationStore, "_open", _full_disk_open)


def not_a_database(path: Path) -> None:
    path.write_bytes(b"this was a conversation database until the disk said otherwise\n" * 200)


def damage_pages(path: Path) -> None:
    """Overwrite every page after the first (the header stays valid, the tables are garbage)."""
    page_size = int.from_bytes(path.read_bytes()[16:18], "big")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(page_size)
        f.write(bytes((i * 37 + 11) % 256 for i in range(size - page_size)))


def fingerprint(path: Path) -> tuple[str, int]:
    """The file's bytes and modification time, to prove it was not touched."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


LONG_TEXT = "这段话很长，需要新的数据库页才能保存。" * 300  # ~6 KB: every write of it needs a new page
