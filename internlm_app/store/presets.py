"""Saved system prompt presets: the part of the conversation store that keeps them (ConversationStore inherits it)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from internlm_app.store.connection import SQLiteDatabase
from internlm_app.store.records import check_choice

PRESET_LANGUAGES = ("zh", "en", "both")
PRESET_NAME_LIMIT = 60  # characters of a preset's name


@dataclass(frozen=True)
class Preset:
    """A named system prompt for one language ('zh', 'en') or both."""

    id: int
    name: str
    system_prompt: str
    language: str


class PresetQueries(SQLiteDatabase):
    """The presets table's queries, as methods of the store (callers use ConversationStore)."""

    def list_presets(self, language: str | None = None) -> list[Preset]:
        """The saved system prompt presets (those for `language` and for both when it is given), by name."""
        where, params = "", ()
        if language is not None:
            check_choice(language, PRESET_LANGUAGES, "language")
            where, params = "WHERE language IN (?, 'both')", (language,)
        sql = f"SELECT id, name, system_prompt, language FROM presets {where} ORDER BY name, language, id"
        return [Preset(*row) for row in self._read(lambda c: c.execute(sql, params).fetchall())]

    def save_preset(self, name: str, system_prompt: str, language: str = "both", preset_id: int | None = None) -> int:
        """Save a preset and return its id: a new one, or the one of that name shown in the same language's list
        (its prompt replaced: a list never shows one name twice), or with `preset_id` that one (renamed too).
        KeyError when `preset_id` is gone, ValueError for a name that is empty or taken by another preset a list
        shows beside it."""
        check_choice(language, PRESET_LANGUAGES, "language")
        title = " ".join(name.split())[:PRESET_NAME_LIMIT]
        if not title:
            raise ValueError("a preset needs a name")

        def body(conn: sqlite3.Connection) -> int:
            # Presets meet in a list when their languages overlap: the same one, or either is for both. The one of
            # the very language first, then the oldest.
            same = conn.execute(
                "SELECT id FROM presets WHERE name = ? AND (language = ? OR language = 'both' OR ? = 'both') "
                "ORDER BY language != ?, id LIMIT 1",
                (title, language, language, language),
            ).fetchone()
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
