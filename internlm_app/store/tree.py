"""The message tree of a conversation (reply versions and branches) and what hangs on its messages: the SQL that the
store's methods run inside their transactions, and the small types they return."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FEEDBACK_VALUES = (0, 1)  # thumbs down, thumbs up: the values of Streamlit's st.feedback("thumbs"); None is no feedback

_SUBTREE = (
    "WITH RECURSIVE subtree(id) AS (SELECT ? UNION ALL"
    " SELECT m.id FROM messages m JOIN subtree ON m.parent_id = subtree.id)"
)


@dataclass(frozen=True)
class Attachment:
    """A file sent with a message: its name, MIME type, the text extracted from it and that text's token count."""

    name: str
    mime_type: str
    text: str = ""
    tokens: int = 0


@dataclass(frozen=True)
class Versions:
    """The versions of a message (its siblings and itself, oldest first) and its index among them."""

    ids: tuple[int, ...]
    index: int


def next_seq(conn: sqlite3.Connection, cid: str) -> int:
    """The next value of the conversation's selection counter (larger than any of its messages' selected_seq)."""
    row = conn.execute("SELECT coalesce(max(selected_seq), 0) + 1 FROM messages WHERE conversation_id = ?", (cid,))
    return row.fetchone()[0]


def insert_message(
    conn: sqlite3.Connection,
    cid: str,
    parent_id: int | None,
    role: str,
    content: str,
    created_at: float,
    status: str,
    stats_text: str | None,
    attachments: Iterable[Attachment] = (),
    feedback: int | None = None,
) -> int:
    """Insert one message (and its attachments) under `parent_id`, as the conversation's most recently used one."""
    cursor = conn.execute(
        "INSERT INTO messages (conversation_id, parent_id, role, content, created_at, status, stats, feedback,"
        " selected_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (cid, parent_id, role, content, created_at, status, stats_text, feedback, next_seq(conn, cid)),
    )
    mid = cursor.lastrowid
    conn.executemany(
        "INSERT INTO attachments (message_id, name, mime_type, text, tokens) VALUES (?, ?, ?, ?, ?)",
        [(mid, a.name, a.mime_type, a.text, a.tokens) for a in attachments],
    )
    return mid


def message_place(conn: sqlite3.Connection, mid: int) -> tuple[str, int | None, str] | None:
    """(conversation id, parent id, role) of a message, or None when it is gone."""
    return conn.execute("SELECT conversation_id, parent_id, role FROM messages WHERE id = ?", (mid,)).fetchone()


def leaf_of(conn: sqlite3.Connection, cid: str) -> int | None:
    """The selected leaf of a conversation (None: the path is empty); KeyError when the conversation does not exist."""
    row = conn.execute("SELECT leaf_id FROM conversations WHERE id = ?", (cid,)).fetchone()
    if row is None:
        raise KeyError(f"no conversation {cid!r}")
    return row[0]


def select_leaf(conn: sqlite3.Connection, cid: str, leaf_id: int | None) -> None:
    """Make `leaf_id` the conversation's selected leaf and its most recently used message."""
    if leaf_id is not None:
        conn.execute("UPDATE messages SET selected_seq = ? WHERE id = ?", (next_seq(conn, cid), leaf_id))
    conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf_id, cid))


def latest_below(conn: sqlite3.Connection, mid: int) -> int:
    """The most recently created or selected message of the subtree under `mid` (`mid` itself included)."""
    sql = f"{_SUBTREE} SELECT m.id FROM messages m JOIN subtree USING (id) ORDER BY m.selected_seq DESC, m.id DESC"
    return conn.execute(sql + " LIMIT 1", (mid,)).fetchone()[0]


def in_subtree(conn: sqlite3.Connection, root: int, mid: int | None) -> bool:
    """Whether `mid` is `root` or below it."""
    if mid is None:
        return False
    return conn.execute(f"{_SUBTREE} SELECT 1 FROM subtree WHERE id = ?", (root, mid)).fetchone() is not None


def delete_subtree(conn: sqlite3.Connection, mid: int) -> int:
    """Delete a message and every message below it in one statement; return how many went."""
    # The WITH goes inside: a statement that starts with WITH has no rowcount in Python's sqlite3.
    return conn.execute(f"DELETE FROM messages WHERE id IN ({_SUBTREE} SELECT id FROM subtree)", (mid,)).rowcount


def path_to(by_id: dict[int, object], parents: dict[int, int | None], leaf_id: int | None) -> list:
    """The items from the root down to `leaf_id`, following `parents`."""
    path = []
    while leaf_id is not None and leaf_id in by_id:
        path.append(by_id[leaf_id])
        leaf_id = parents[leaf_id]
    return path[::-1]


def attachments_of(conn: sqlite3.Connection, cid: str) -> dict[int, list[Attachment]]:
    """The attachments of every message of a conversation, by message id, in the order they were added."""
    rows = conn.execute(
        "SELECT a.message_id, a.name, a.mime_type, a.text, a.tokens FROM attachments a"
        " JOIN messages m ON m.id = a.message_id WHERE m.conversation_id = ? ORDER BY a.id",
        (cid,),
    ).fetchall()
    result: dict[int, list[Attachment]] = {}
    for mid, *fields in rows:
        result.setdefault(mid, []).append(Attachment(*fields))
    return result


def check_attachments(attachments: Sequence[Attachment]) -> list[Attachment]:
    """The attachments as a list, or ValueError for one that is not an Attachment or counts negative tokens."""
    items = list(attachments)
    for a in items:
        if not isinstance(a, Attachment) or type(a.tokens) is not int or a.tokens < 0:
            raise ValueError(f"attachments must be Attachment objects with a token count >= 0, not {a!r:.80}")
    return items
