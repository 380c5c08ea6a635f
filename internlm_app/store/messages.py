"""The messages of a conversation's tree: adding them and their versions, switching versions, feedback, edits and
deletions (the store's methods; the SQL they share is in tree.py). ConversationStore inherits them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence

from internlm_app.chat_types import TURN_ROLES, ReplyStats
from internlm_app.store.connection import SQLiteDatabase
from internlm_app.store.records import STATUSES, check_choice, check_feedback, stats_json, title_from
from internlm_app.store.tree import (
    Attachment,
    Versions,
    check_attachments,
    delete_subtree,
    in_subtree,
    insert_message,
    latest_below,
    leaf_of,
    message_place,
    select_leaf,
)


def append_message(
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


class MessageQueries(SQLiteDatabase):
    """The message methods of the store (callers use ConversationStore)."""

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
        check_choice(role, TURN_ROLES, "role")
        check_choice(status, STATUSES, "status")
        stats_text, files = stats_json(stats), check_attachments(attachments)

        def body(conn: sqlite3.Connection) -> int:
            return append_message(conn, cid, leaf_of(conn, cid), role, content, status, stats_text, files)

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
        check_choice(status, STATUSES, "status")
        stats_text, files = stats_json(stats), check_attachments(attachments)

        def body(conn: sqlite3.Connection) -> int:
            place = message_place(conn, mid)
            if place is None:
                raise KeyError(f"no message {mid}")
            cid, parent_id, role = place
            return append_message(conn, cid, parent_id, role, content, status, stats_text, files)

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

    def set_feedback(self, mid: int, value: int | None) -> bool:
        """Set a reply's feedback: 1 thumbs up, 0 thumbs down, None none (as st.feedback("thumbs") gives it); False
        when the message is gone, ValueError for a message that is not a reply."""
        check_feedback(value)

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
        check_choice(role, TURN_ROLES, "role")

        def body(conn: sqlite3.Connection) -> int:
            place = message_place(conn, mid)
            if place is None or place[0] != cid:
                return append_message(conn, cid, leaf_of(conn, cid), role, content, "complete", None)
            delete_subtree(conn, mid)
            return append_message(conn, cid, place[1], role, content, "complete", None)

        return self._write(body)

    def update_message(self, mid: int, content: str, status: str, stats: ReplyStats | dict | None = None) -> bool:
        """Replace a message's content and status (stats None keeps the saved stats); False when it is gone."""
        check_choice(status, STATUSES, "status")
        now, stats_text = time.time(), stats_json(stats)

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
