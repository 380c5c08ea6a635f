"""AppTest: the web app when its database fails (read-only, full disk, damaged) and when text is hostile Markdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from internlm_app.sampling import SamplingParams
from internlm_app.store import export
from internlm_app.store.db import ConversationStore
from internlm_app.web.reply import ReplyNotSaved, ReplyView, WebReply
from internlm_app.web.safe_markdown import plain
from tests.app_helpers import chat, run_page, send, texts
from tests.store_faults import LONG_TEXT, damage_pages, fingerprint, make_disk_full, make_read_only, not_a_database

HISTORY = "internlm_app/web/views/history.py"


def _seed(db: Path, title: str = "kept", *turns: str) -> str:
    store = ConversationStore(db)
    cid = store.create_conversation("", title=title)
    for i, text in enumerate(turns or ("hello", "hi there")):
        store.add_message(cid, "user" if i % 2 == 0 else "assistant", text)
    store.close()
    return cid


def _typed_text(at) -> str:
    """What the page put back into the chat input (Streamlit sends it to the browser with set_value)."""
    proto = at.chat_input(key="prompt").proto
    return proto.value if proto.set_value else ""


def _conversations(db: Path) -> list:
    store = ConversationStore(db)
    try:
        summaries = store.list_conversations()
        return [(s.title, [m.content for m in store.get_conversation(s.id).messages]) for s in summaries]
    finally:
        store.close()


def test_read_only_database_reads_and_a_refused_message_stays_in_the_box(app_env, monkeypatch):
    db = app_env / "conversations.db"
    cid = _seed(db)
    before = _conversations(db)
    make_read_only(monkeypatch)
    at = run_page(query={"c": cid})
    assert chat(at) == [("user", "hello"), ("assistant", "hi there")]
    at.chat_input(key="prompt").set_value("my typed message").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "是只读的" in texts(at.error) and f"`{db}`" in texts(at.error)
    assert _typed_text(at) == "my typed message" and "没有丢失" in texts(at.caption)
    assert chat(at) == [("user", "hello"), ("assistant", "hi there")]  # the page still shows the conversation
    at.text_input(key="rename_title").set_value("new name")
    at.button(key="rename").click().run()
    assert "是只读的" in texts(at.error) and at.text_input(key="rename_title").value == "new name"
    assert len(run_page(HISTORY).selectbox(key="selected").options) == 1  # history still lists it
    monkeypatch.undo()
    assert _conversations(db) == before


def test_full_disk_keeps_the_typed_message_and_says_what_to_do_in_english(app_env, monkeypatch):
    db = app_env / "conversations.db"
    cid = _seed(db)
    before = _conversations(db)
    make_disk_full(monkeypatch)
    at = run_page(query={"c": cid})
    at.radio(key="lang").set_value("en").run()
    at.chat_input(key="prompt").set_value(LONG_TEXT).run()
    assert not at.exception, [e.value for e in at.exception]
    error = texts(at.error)
    assert "The disk is full" in error and f"`{db}`" in error and "df -h" in error
    assert _typed_text(at) == LONG_TEXT and "not lost" in texts(at.caption)
    monkeypatch.undo()
    assert _conversations(db) == before


def test_a_full_disk_in_the_history_page_is_a_message_not_a_traceback(app_env, monkeypatch):
    db = app_env / "conversations.db"
    _seed(db, "kept", "hello", LONG_TEXT)
    data = export.export_json(ConversationStore(db))
    before = _conversations(db)
    make_disk_full(monkeypatch)
    at = run_page(HISTORY)
    at.radio(key="import_keep_both").set_value(True).run()  # the file holds the conversation already here
    at.file_uploader(key="import_file_0").set_value(("export.json", data.encode(), "application/json"))
    at.button(key="import_button").click().run()
    assert not at.exception and "磁盘已满" in texts(at.error) and not at.success
    assert len(at.selectbox(key="selected").options) == 1  # the page still lists what is there
    monkeypatch.undo()
    assert _conversations(db) == before


@pytest.mark.parametrize("damage", [not_a_database, damage_pages], ids=["not-a-database", "damaged-pages"])
def test_a_damaged_database_is_left_alone_and_a_fresh_one_can_start_beside_it(app_env, damage):
    db = app_env / "conversations.db"
    _seed(db)
    damage(db)
    before = fingerprint(db)
    at = run_page()
    assert "已损坏" in texts(at.error) and f"`{db}`" in texts(at.error)
    assert f"`{db.with_name('conversations-fresh.db')}`" in texts(at.error)
    assert not at.chat_input  # nothing of the chat without a database
    at.button(key="store_start_fresh").click().run()
    assert not at.error and at.chat_input(key="prompt")
    assert "conversations-fresh.db" in texts(at.info)
    send(at, "a new start")
    assert [c for _, c in _conversations(db.with_name("conversations-fresh.db"))][0][0] == "a new start"
    assert fingerprint(db) == before  # never written, not even by the fresh start
    assert chat(run_page(HISTORY)) == [] and "conversations-fresh.db" in texts(run_page(HISTORY).info)


HOSTILE_TITLE = "[Session expired – log in again](https://evil.example/login) ![t](http://img.evil.example/t.png)"
HOSTILE_REPLY = "![](http://img.evil.example/r.png) [open](data:text/html,<script>alert(1)</script>) `vec![1]`"


def test_titles_url_values_and_message_markdown_reach_the_page_made_safe(app_env):
    db = app_env / "conversations.db"
    cid = _seed(db, HOSTILE_TITLE, "look ![u](http://img.evil.example/u.png)", HOSTILE_REPLY)
    at = run_page(query={"c": cid})
    (title,) = [b.label for b in at.sidebar.button if b.key == f"open_{cid}"]
    assert title == plain(HOSTILE_TITLE)
    user, reply = (m for _, m in chat(at))
    assert user == "look \\![u](http://img.evil.example/u.png)"  # the image is a link to it now
    assert "\\[open](data:" in reply and "`vec![1]`" in reply  # the data: link is text, code as it was
    phishing = "[Session expired](https://evil.example/login)"
    warned = run_page(query={"c": phishing})
    assert plain(phishing) in texts(warned.warning) and "https://" not in texts(warned.warning)


def test_a_reply_the_database_stops_taking_mid_stream_is_reported_with_its_whole_text(engine, tmp_path, monkeypatch):
    store = ConversationStore(tmp_path / "conversations.db")
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=120)
    expected, _ = engine.reply(store.messages_for_model(cid), params)
    shown: list[str] = []

    def show(text: str) -> None:
        if not shown:  # the file turns read-only while the reply streams (a disk remounted read-only)
            store.close()
            make_read_only(monkeypatch)
        shown.append(text)

    with pytest.raises(ReplyNotSaved) as caught:
        WebReply(engine, store, cid, params).run(ReplyView(show=show))
    assert caught.value.kind == "read_only" and caught.value.text == expected  # nothing generated is lost
    assert len(shown) > 1 and engine.queue.active == 0  # it streamed on after the first failed save


def test_a_finished_reply_is_saved_once_a_lock_on_the_file_is_released(engine, tmp_path, monkeypatch):
    """Another process held the file for longer than the store's 30 s of retries as a reply ended: the finished reply
    was dropped and showed as "interrupted (server restarted?)" with no text. Its end is saved once the lock goes, and
    a periodic save waiting on the lock never holds the reply back."""
    import time

    from internlm_app.store.errors import StoreFault
    from internlm_app.web import reply as reply_module

    store = ConversationStore(tmp_path / "conversations.db")
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=60)
    expected, _ = engine.reply(store.messages_for_model(cid), params)
    real, refused = store.update_message, []

    def locked_for_a_while(mid, text, status, stats=None):
        if status == "streaming":
            time.sleep(0.5)  # a periodic save waiting on the lock
            raise StoreFault("locked", store.path, "database is locked")
        if len(refused) < 3:  # the end's save: locked three times, then free
            refused.append(status)
            raise StoreFault("locked", store.path, "database is locked")
        return real(mid, text, status, stats)

    monkeypatch.setattr(store, "update_message", locked_for_a_while)
    monkeypatch.setattr(reply_module, "FINAL_SAVE_RETRY_SECONDS", 0.01)
    monkeypatch.setattr(reply_module, "SAVE_INTERVAL_SECONDS", 0.0)
    shown: list[str] = []
    outcome = WebReply(engine, store, cid, params).run(ReplyView(show=shown.append))
    assert refused == ["complete"] * 3 and outcome.text == expected
    monkeypatch.undo()
    assert store.get_conversation(cid).messages[-1].content == expected
    assert store.get_conversation(cid).messages[-1].status == "complete"
