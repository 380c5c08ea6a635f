"""Feedback on replies, attachments of messages and prompt presets in the store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.store.presets import Preset
from internlm_app.store.tree import Attachment
from tests.store_faults import make_read_only

pytestmark = pytest.mark.timeout(120)


def test_feedback_is_stored_and_filters_the_lists(store: ConversationStore) -> None:
    liked, disliked, none = (store.create_conversation("") for _ in range(3))
    replies = {}
    for cid, text in ((liked, "good"), (disliked, "bad"), (none, "meh")):
        store.add_message(cid, "user", f"question {text}")
        replies[cid] = store.add_message(cid, "assistant", text)
    assert store.set_feedback(replies[liked], 1) and store.set_feedback(replies[disliked], 0)
    assert [m.feedback for m in store.get_conversation(liked).messages] == [None, 1]
    assert store.get_conversation(disliked).messages[1].feedback == 0
    assert [s.id for s in store.list_conversations(feedback=1)] == [liked]
    assert [s.id for s in store.list_conversations(feedback=0)] == [disliked]
    assert len(store.list_conversations()) == 3
    assert [s.id for s in store.search("question", feedback=0)] == [disliked]
    assert store.search("good", feedback=0) == [] and [s.id for s in store.search("good", feedback=1)] == [liked]

    assert store.set_feedback(replies[liked], None) and store.list_conversations(feedback=1) == []
    assert not store.set_feedback(10**9, 1)
    with pytest.raises(ValueError, match="feedback"):
        store.set_feedback(replies[liked], 2)
    with pytest.raises(ValueError, match="replies"):
        store.set_feedback(store.get_conversation(liked).messages[0].id, 1)
    with pytest.raises(ValueError, match="feedback"):
        store.list_conversations(feedback=True)


def test_feedback_of_a_version_that_is_not_shown_still_counts(store: ConversationStore) -> None:
    cid = store.create_conversation("")
    store.add_message(cid, "user", "q")
    first = store.add_message(cid, "assistant", "first")
    store.set_feedback(first, 0)
    store.add_version(first, "second")
    assert store.get_conversation(cid).messages[-1].feedback is None
    assert [s.id for s in store.list_conversations(feedback=0)] == [cid]


def test_attachments_come_back_with_their_messages(store: ConversationStore) -> None:
    cid = store.create_conversation("")
    files = [Attachment("报告.pdf", "application/pdf", "第一页\n第二页", 7), Attachment("empty.png", "image/png")]
    q = store.add_message(cid, "user", "summarise these", attachments=files)
    store.add_message(cid, "assistant", "done")
    q2 = store.add_version(q, "only the report", attachments=files[:1])
    conv = store.get_conversation(cid)
    assert conv.messages[0].attachments == files[:1] and conv.tree[0].attachments == files
    assert conv.tree[1].attachments == [] and conv.messages[0].id == q2
    assert store.select(q) and store.get_conversation(cid).messages[0].attachments == files
    assert store.get_conversation(store.fork(cid, q)).messages[0].attachments == files
    assert store.delete_messages_from(cid, q) == 2
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM attachments").fetchone()[0] == 3  # the version's and the fork's
    with pytest.raises(ValueError, match="token count"):
        store.add_message(cid, "user", "x", attachments=[Attachment("a", "text/plain", "x", -1)])
    with pytest.raises(ValueError, match="Attachment"):
        store.add_message(cid, "user", "x", attachments=[{"name": "a"}])
    assert store.delete(cid)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM attachments").fetchone()[0] == 2  # the fork's


def test_default_presets_in_both_languages(store: ConversationStore) -> None:
    zh, en = store.list_presets("zh"), store.list_presets("en")
    assert {p.name for p in zh} == {"翻译", "代码审查", "简洁助手"} and {p.language for p in zh} == {"zh"}
    assert {p.name for p in en} == {"Translator", "Code reviewer", "Concise assistant"}
    assert all(p.system_prompt for p in zh + en) and len(store.list_presets()) == 6
    with pytest.raises(ValueError, match="language"):
        store.list_presets("fr")


def test_presets_save_rename_and_delete(store: ConversationStore) -> None:
    mine = store.save_preset("  Poet  ", "Answer in verse.")
    assert Preset(mine, "Poet", "Answer in verse.", "both") in store.list_presets("zh")
    assert Preset(mine, "Poet", "Answer in verse.", "both") in store.list_presets("en")
    assert store.save_preset("Poet", "Answer in haiku.") == mine  # the same name and language: replaced
    assert store.save_preset("Poet", "诗", "zh") == mine  # a name the zh list shows already: replaced, never twice
    translator = next(p for p in store.list_presets("zh") if p.name == "翻译")
    assert store.save_preset("翻译", "只译成法语。") == translator.id  # a default's name, saved for both: replaced
    assert [p.name for p in store.list_presets("zh")].count("翻译") == 1
    french = store.save_preset("Translator", "Into French.", "zh")  # the zh list does not show the en one: new
    assert french not in {p.id for p in store.list_presets("en")}
    assert store.save_preset("Poet", "Answer in haiku.") == mine
    assert store.save_preset("Bard", "Rhyme.", "en", preset_id=mine) == mine
    assert Preset(mine, "Bard", "Rhyme.", "en") in store.list_presets("en")
    assert "Bard" not in {p.name for p in store.list_presets("zh")}
    with pytest.raises(ValueError, match="another preset"):
        store.save_preset("Translator", "x", "en", preset_id=mine)
    with pytest.raises(ValueError, match="name"):
        store.save_preset("   ", "x")
    with pytest.raises(KeyError):
        store.save_preset("Ghost", "x", preset_id=10**9)
    assert store.delete_preset(mine) and not store.delete_preset(mine)


def test_a_deleted_default_preset_does_not_come_back(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = ConversationStore(path)
    translator = next(p for p in store.list_presets("en") if p.name == "Translator")
    assert store.delete_preset(translator.id)
    store.close()
    for _ in range(2):  # later starts of the app
        store = ConversationStore(path)
        assert "Translator" not in {p.name for p in store.list_presets()} and len(store.list_presets()) == 5
        store.close()


def test_presets_are_read_from_a_read_only_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ConversationStore(tmp_path / "c.db").close()
    make_read_only(monkeypatch)
    store = ConversationStore(tmp_path / "c.db")
    assert len(store.list_presets()) == 6  # listing writes nothing (the defaults came with the schema)
    store.close()


def test_the_new_writes_on_a_read_only_database_are_read_only_faults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ConversationStore(tmp_path / "c.db")
    cid = store.create_conversation("")
    q = store.add_message(cid, "user", "q", attachments=[Attachment("a.txt", "text/plain", "x", 1)])
    a = store.add_message(cid, "assistant", "a")
    preset = store.list_presets()[0].id
    store.close()
    make_read_only(monkeypatch)
    store = ConversationStore(tmp_path / "c.db")
    writes = {
        "add_version": lambda: store.add_version(a, "b"),
        "select": lambda: store.select(q),
        "fork": lambda: store.fork(cid, q),
        "set_feedback": lambda: store.set_feedback(a, 1),
        "save_preset": lambda: store.save_preset("x", "y"),
        "delete_preset": lambda: store.delete_preset(preset),
    }
    for name, write in writes.items():
        with pytest.raises(StoreFault) as caught:
            write()
        assert caught.value.kind == "read_only", name
    conv = store.get_conversation(cid)  # still readable, unchanged
    assert [m.content for m in conv.tree] == ["q", "a"] and conv.messages[0].attachments[0].name == "a.txt"
    store.close()
