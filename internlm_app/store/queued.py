"""Messages typed while a reply runs: the part of the conversation store that keeps them until they are sent
(ConversationStore inherits it). In the database, not the browser session, so a reload, a closed tab or a restart
never loses one; any page that opens the conversation shows them and sends the oldest once no reply runs
(`send_queued_message`: out of the queue and into the conversation in one write)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from internlm_app.store.connection import SQLiteDatabase
from internlm_app.store.messages import append_message
from internlm_app.store.tree import leaf_of


@dataclass(frozen=True)
class QueuedMessage:
    id: int
    content: str


class QueuedMessageQueries(SQLiteDatabase):
    """The queued_messages table's queries, as methods of the store (callers use ConversationStore)."""

    def queue_message(self, cid: str, content: str) -> int:
        """Keep `content` to be sent to `cid` after the reply that runs now; its id. KeyError for an unknown `cid`."""

        def body(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                raise KeyError(f"no conversation {cid}")
            sql = "INSERT INTO queued_messages (conversation_id, content, created_at) VALUES (?, ?, ?)"
            return conn.execute(sql, (cid, content, time.time())).lastrowid

        return self._write(body)

    def queued_messages(self, cid: str) -> list[QueuedMessage]:
        """The messages waiting to be sent to `cid`, oldest first."""
        sql = "SELECT id, content FROM queued_messages WHERE conversation_id = ? ORDER BY id"
        return [QueuedMessage(*row) for row in self._read(lambda c: c.execute(sql, (cid,)).fetchall())]

    def send_queued_message(self, qid: int) -> int | None:
        """Take queued message `qid` out of the queue and append it to its conversation as the user's message, in one
        write: the id of that message, or None when it is gone already (another page sent it). Of two pages sending
        the same one, one sends it; a write that fails leaves it queued."""

        def body(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT conversation_id, content FROM queued_messages WHERE id = ?", (qid,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM queued_messages WHERE id = ?", (qid,))
            cid, content = row
            return append_message(conn, cid, leaf_of(conn, cid), "user", content, "complete", None)

        return self._write(body)

    def edit_queued_message(self, qid: int, content: str) -> bool:
        """Replace the text of queued message `qid`, keeping its place in the queue: False when it is gone (sent by
        a page meanwhile, or removed)."""
        sql = "UPDATE queued_messages SET content = ? WHERE id = ?"
        return self._write(lambda conn: conn.execute(sql, (content, qid)).rowcount == 1)

    def remove_queued_message(self, qid: int) -> bool:
        """Take queued message `qid` out of the queue unsent: False when it is gone already (sent, or removed)."""
        return self._write(lambda conn: conn.execute("DELETE FROM queued_messages WHERE id = ?", (qid,)).rowcount == 1)
