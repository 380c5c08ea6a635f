"""Messages typed while a reply runs: the part of the conversation store that keeps them until they are sent
(ConversationStore inherits it). In the database, not the browser session, so a reload, a closed tab or a restart
never loses one; any page that opens the conversation shows them and sends the oldest once no reply runs (it
removes it with `remove_queued_message` in the write that saves it as the user's message)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from internlm_app.store.connection import SQLiteDatabase


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

    def remove_queued_message(self, qid: int) -> bool:
        """Remove a queued message as it is sent; False when it is gone already (another page sent it): of two pages
        that send the same one at once, only one removes it."""
        return self._write(lambda c: c.execute("DELETE FROM queued_messages WHERE id = ?", (qid,)).rowcount > 0)
