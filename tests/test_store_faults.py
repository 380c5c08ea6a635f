"""The store when its file fails: read-only, full disk, damaged, unreachable. Reads go on where SQLite allows it,
every failure is a StoreFault of the right kind, and nothing is written to a file that failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from tests.store_faults import LONG_TEXT, damage_pages, fingerprint, make_disk_full, make_read_only, not_a_database


def _seeded(path: Path) -> tuple[str, list]:
    store = ConversationStore(path)
    cid = store.create_conversation("sys", title="kept")
    store.add_message(cid, "user", "hello")
    store.add_message(cid, "assistant", "hi there", stats={"completion_tokens": 2})
    messages = store.get_conversation(cid).messages
    store.close()  # checkpoints the WAL into the file
    return cid, messages


def _writes(store: ConversationStore, cid: str, mid: int) -> dict:
    return {
        "create": lambda: store.create_conversation(LONG_TEXT),
        "add": lambda: store.add_message(cid, "user", LONG_TEXT),
        "update": lambda: store.update_message(mid, LONG_TEXT, "complete"),
        "replace": lambda: store.replace_from(cid, mid, "user", LONG_TEXT),
        "settings": lambda: store.update_settings(cid, LONG_TEXT),
    }


def test_a_read_only_database_opens_reads_and_refuses_every_write(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    cid, messages = _seeded(path)
    before = fingerprint(path)
    make_read_only(monkeypatch)
    store = ConversationStore(path)  # no migration needed: opening writes nothing
    assert store.get_conversation(cid).messages == messages
    assert [s.id for s in store.search("hello")] == [cid]
    writes = {**_writes(store, cid, messages[0].id), "rename": lambda: store.rename(cid, "x")}
    writes["delete"] = lambda: store.delete(cid)
    for name, write in writes.items():
        with pytest.raises(StoreFault) as caught:
            write()
        assert caught.value.kind == "read_only" and caught.value.path == path, name
    assert store.get_conversation(cid).messages == messages  # still readable after the failures
    store.close()
    assert fingerprint(path) == before


def test_a_full_disk_refuses_writes_that_need_room_and_keeps_what_was_saved(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    cid, messages = _seeded(path)
    make_disk_full(monkeypatch)
    store = ConversationStore(path)
    for name, write in _writes(store, cid, messages[0].id).items():
        with pytest.raises(StoreFault) as caught:
            write()
        assert caught.value.kind == "full" and "disk is full" in caught.value.detail, name
    assert store.get_conversation(cid).messages == messages  # a failed write changed nothing
    store.close()
    monkeypatch.undo()  # space freed: the same file takes writes again
    store = ConversationStore(path)
    store.add_message(cid, "user", LONG_TEXT)
    assert store.get_conversation(cid).messages[-1].content == LONG_TEXT


@pytest.mark.parametrize("damage", [not_a_database, damage_pages], ids=["not-a-database", "damaged-pages"])
def test_a_damaged_database_is_a_corrupt_fault_and_the_file_is_left_as_it_is(tmp_path, damage):
    path = tmp_path / "c.db"
    _seeded(path)
    damage(path)
    before = fingerprint(path)
    with pytest.raises(StoreFault) as caught:
        store = ConversationStore(path)
        store.list_conversations()  # a valid header opens; the damaged tables fail on the first read
    assert caught.value.kind == "corrupt" and caught.value.path == path
    assert fingerprint(path) == before


def test_a_database_path_that_cannot_exist_is_an_unavailable_fault(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreFault) as caught:
        ConversationStore(tmp_path / "a-file" / "c.db")
    assert caught.value.kind == "unavailable"


def test_a_fault_is_not_sticky_once_the_file_is_fixed(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    cid, _ = _seeded(path)
    store = ConversationStore(path)
    store.close()
    make_read_only(monkeypatch)
    with pytest.raises(StoreFault):
        store.add_message(cid, "user", "while read-only")
    monkeypatch.undo()  # writable again: the same store object recovers on its next call
    store.add_message(cid, "user", "after")
    assert store.get_conversation(cid).messages[-1].content == "after"


def test_a_program_error_is_not_reported_as_a_file_fault(tmp_path):
    store = ConversationStore(tmp_path / "c.db")
    with pytest.raises(KeyError):
        store.add_message("no-such-conversation", "user", "x")
    with pytest.raises(Exception) as caught:
        store._write(lambda c: c.execute("INSERT INTO messages (conversation_id) VALUES (NULL)"))
    assert not isinstance(caught.value, StoreFault)


def test_a_database_file_deleted_while_the_app_runs_is_made_again(tmp_path, caplog):
    """Every page failed with "no such table: conversations" (Streamlit's English error page) until a restart: SQLite
    had made an empty file where the deleted one was. The new file gets the schema, and the log says what happened."""
    import logging

    from internlm_app.store.db import ConversationStore

    path = tmp_path / "conversations.db"
    store = ConversationStore(path)
    store.create_conversation("")
    for name in ("conversations.db", "conversations.db-wal", "conversations.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    store.close()  # (the app's connections live on in threads; a new one opens the path again)
    caplog.set_level(logging.WARNING, logger="internlm_app.store.connection")
    assert store.list_conversations() == []
    cid = store.create_conversation("")
    assert store.get_conversation(cid) is not None and "was removed while the app ran" in caplog.text
