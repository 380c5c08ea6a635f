"""What can go wrong with the conversation database as a file, in kinds the web app can explain."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path


class StoreError(RuntimeError):
    """The database cannot be used (e.g. written by a newer version of the app)."""


FAULT_KINDS = ("read_only", "full", "corrupt", "locked", "newer", "unavailable")


class StoreFault(StoreError):
    """The database file failed as a file: read-only, disk full, damaged, locked, too new, or not reachable.

    `kind` is one of FAULT_KINDS; the web app says in words what each means and what to do."""

    def __init__(self, kind: str, path: Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.kind, self.path, self.detail = kind, path, detail


def fault_kind(exc: BaseException) -> str | None:
    """Which StoreFault kind an SQLite or OS error is, or None for an error of the program itself."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        for prefix, kind in (
            ("SQLITE_READONLY", "read_only"),
            ("SQLITE_FULL", "full"),
            ("SQLITE_CORRUPT", "corrupt"),
            ("SQLITE_NOTADB", "corrupt"),
            ("SQLITE_BUSY", "locked"),
            ("SQLITE_LOCKED", "locked"),
            ("SQLITE_CANTOPEN", "unavailable"),
            ("SQLITE_IOERR", "unavailable"),
            ("SQLITE_PERM", "read_only"),
            ("SQLITE_AUTH", "unavailable"),
        ):
            if name.startswith(prefix):
                return kind
        return None
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "full"
        return "read_only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "unavailable"
    return None
