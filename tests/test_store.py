"""Tests of the conversation store and export/import: round trips, migrations, concurrency, crashes, bad files."""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from internlm_app.chat_types import ReplyStats
from internlm_app.store import export_format
from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreError
from internlm_app.store.export import export_json, export_markdown, import_json
from internlm_app.store.export_format import IMPORT_REASONS, ImportValidationError
from internlm_app.store.records import TITLE_MAX
from internlm_app.store.schema import MIGRATIONS, SCHEMA_VERSION

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("store_worker.py")


def counts(store: ConversationStore) -> tuple[int, int]:
    with sqlite3.connect(store.path) as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("conversations", "messages"))


def worker(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ----- basic behaviour -----


def test_round_trip(store: ConversationStore) -> None:
    cid = store.create_conversation("You are helpful.", {"temperature": 0.3, "top_k": 40})
    assert store.get_conversation(cid).title == ""
    store.add_message(cid, "user", "  What is\nthe capital of France?  ")
    mid = store.add_message(cid, "assistant", "", status="streaming")
    store.update_message(mid, "Par", "streaming")
    stats = ReplyStats(prompt_tokens=12, completion_tokens=3, time_to_first_token=0.1, total_seconds=0.4)
    assert store.update_message(mid, "Paris.", "complete", stats)

    conv = store.get_conversation(cid)
    assert conv.title == "What is the capital of France?"
    assert (conv.system_prompt, conv.settings) == ("You are helpful.", {"temperature": 0.3, "top_k": 40})
    assert [(m.role, m.content, m.status) for m in conv.messages] == [
        ("user", "  What is\nthe capital of France?  ", "complete"),
        ("assistant", "Paris.", "complete"),
    ]
    assert conv.messages[1].stats == stats.to_dict() and conv.messages[0].stats is None
    assert conv.updated_at >= conv.created_at
    store.update_message(mid, "Paris!", "complete")  # stats None keeps the saved stats
    assert store.get_conversation(cid).messages[1].stats == stats.to_dict()

    store.add_message(cid, "user", "Another question")  # the title stays the first one
    assert store.get_conversation(cid).title == "What is the capital of France?"
    assert store.rename(cid, "  Geography  ") and store.get_conversation(cid).title == "Geography"
    assert store.update_settings(cid, "Be terse.", {"temperature": 0.0})
    assert store.get_conversation(cid).settings == {"temperature": 0.0}
    assert store.get_conversation("missing") is None
    assert not store.rename("missing", "x") and not store.update_message(10**9, "x", "complete")


def test_title_truncated_and_given_title_kept(store: ConversationStore) -> None:
    cid = store.create_conversation("", title=None)
    store.add_message(cid, "assistant", "greeting first does not title")
    store.add_message(cid, "user", "word " * 100)
    title = store.get_conversation(cid).title
    assert len(title) == TITLE_MAX and title.endswith("…")
    named = store.create_conversation("", title="Mine")
    store.add_message(named, "user", "hello")
    assert store.get_conversation(named).title == "Mine"


def test_list_order_and_limit(store: ConversationStore) -> None:
    ids = [store.create_conversation("") for _ in range(4)]
    store.add_message(ids[1], "user", "bump")
    listed = store.list_conversations()
    assert listed[0].id == ids[1] and listed[0].message_count == 1
    assert {s.id for s in listed} == set(ids)
    assert len(store.list_conversations(limit=2)) == 2


def test_delete_messages_from_and_messages_for_model(store: ConversationStore) -> None:
    cid = store.create_conversation("SYS")
    store.add_message(cid, "user", "q1")
    store.add_message(cid, "assistant", "boom", status="error")
    store.add_message(cid, "assistant", "   ", status="stopped")
    store.add_message(cid, "assistant", "a1 partial", status="stopped")
    m_q2 = store.add_message(cid, "user", "q2")
    store.add_message(cid, "assistant", "a2")
    assert store.messages_for_model(cid) == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1 partial"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    other = store.create_conversation("")
    store.add_message(other, "user", "untouched")
    assert store.delete_messages_from(cid, m_q2) == 2
    assert [m.content for m in store.get_conversation(cid).messages][-1] == "a1 partial"
    assert store.messages_for_model(other) == [{"role": "user", "content": "untouched"}]


def test_bad_arguments(store: ConversationStore) -> None:
    cid = store.create_conversation("")
    with pytest.raises(ValueError, match="role"):
        store.add_message(cid, "tool", "x")
    with pytest.raises(ValueError, match="status"):
        store.add_message(cid, "user", "x", status="done")
    with pytest.raises(KeyError):
        store.add_message("missing", "user", "x")
    assert counts(store) == (1, 0)


def test_delete_cascades(store: ConversationStore) -> None:
    keep, gone = store.create_conversation(""), store.create_conversation("")
    store.add_message(keep, "user", "keep me")
    mid = store.add_message(gone, "user", "a")
    store.add_message(gone, "assistant", "b")
    assert store.delete(gone) and not store.delete(gone)
    assert counts(store) == (1, 1)
    assert store.get_conversation(gone) is None
    assert not store.update_message(mid, "late stream chunk", "streaming")  # a tab still streaming into it
    with pytest.raises(KeyError):
        store.add_message(gone, "user", "x")


def test_search_escaping(store: ConversationStore) -> None:
    ids = {}
    for text in ["100% sure", "snake_case name", "back\\slash", "Hello World", "plain 100 percent"]:
        ids[text] = store.create_conversation("")
        store.add_message(ids[text], "user", text)
    store.rename(ids["plain 100 percent"], "Renamed")

    def found(q: str) -> set[str]:
        return {s.id for s in store.search(q)}

    assert found("%") == {ids["100% sure"]}
    assert found("_") == {ids["snake_case name"]}
    assert found("\\") == {ids["back\\slash"]}
    assert found("hello world") == {ids["Hello World"]}
    assert found("renamed") == {ids["plain 100 percent"]}  # by title
    assert found("percent") == {ids["plain 100 percent"]}  # by content
    assert found("100%") == {ids["100% sure"]}
    assert found("nothing like this") == set()
    assert len(found("")) == 5


# ----- files and migrations -----


def test_migrations_from_empty_file_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "chats.db"  # parents are created
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    store = ConversationStore(path)
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"conversations", "messages", "messages_by_conversation", "conversations_by_update"} <= names
    cid = store.create_conversation("sys")
    store.add_message(cid, "user", "persisted")
    store.close()

    reopened = ConversationStore(path)
    assert reopened.schema_version() == SCHEMA_VERSION
    assert [m.content for m in reopened.get_conversation(cid).messages] == ["persisted"]
    reopened.close()
    assert ConversationStore(tmp_path / "new" / "deeper" / "x.db").schema_version() == SCHEMA_VERSION


def test_migrations_resume_from_an_older_version(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO conversations VALUES ('abc', 't', '', '{}', 1, 2)")
        conn.execute("PRAGMA user_version = 1")
    store = ConversationStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get_conversation("abc").title == "t"
    store.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        ConversationStore(path)


def test_finished_thread_connection_is_closed(store: ConversationStore) -> None:
    thread = threading.Thread(target=store.list_conversations)
    thread.start()
    thread.join()
    gc.collect()
    assert len(store._connections) <= 1  # only this thread's


# ----- concurrency and crashes -----


def run_threads(target, count: int) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def wrapped(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_concurrent_fresh_open(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    stores: list[ConversationStore] = []
    assert run_threads(lambda i: stores.append(ConversationStore(path)), 8) == []
    assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}


def test_concurrent_threads(store: ConversationStore) -> None:
    cid = store.create_conversation("")
    own: dict[int, str] = {}

    def write(i: int) -> None:
        own[i] = store.create_conversation("")
        for n in range(40):
            store.add_message(cid, "user", f"t{i}-{n}")
            mid = store.add_message(own[i], "assistant", "", status="streaming")
            store.update_message(mid, f"reply {n}", "complete")
            if n % 8 == 0:
                store.list_conversations()
                store.get_conversation(cid)

    assert run_threads(write, 8) == []
    contents = [m.content for m in store.get_conversation(cid).messages]
    assert sorted(contents) == sorted(f"t{i}-{n}" for i in range(8) for n in range(40))
    for i in range(8):
        assert [m.content for m in store.get_conversation(own[i]).messages] == [f"reply {n}" for n in range(40)]


def test_concurrent_processes(store: ConversationStore, tmp_path: Path) -> None:
    cid = store.create_conversation("")
    go = tmp_path / "go"
    procs = [worker("append", str(store.path), cid, f"p{k}", "150", str(go)) for k in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        for n in range(50):  # this process writes at the same time
            store.add_message(cid, "assistant", f"main-{n}")
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.strip() == "done", err
        assert "locked" not in err
    contents = [m.content for m in store.get_conversation(cid).messages]
    expected = [f"p{k}-{n}" for k in range(2) for n in range(150)] + [f"main-{n}" for n in range(50)]
    assert sorted(contents) == sorted(expected)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_crash_mid_reply_keeps_last_partial(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    proc = worker("crash", str(path))
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        saved = json.loads(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL

    store = ConversationStore(path)
    conv = store.get_conversation(saved["cid"])
    assert [(m.role, m.content, m.status) for m in conv.messages] == [
        ("user", "Tell me a story", "complete"),
        ("assistant", saved["text"], "streaming"),
    ]
    assert conv.title == "Tell me a story" and conv.settings == {"temperature": 0.5}
    assert store.update_message(saved["mid"], saved["text"], "stopped")  # the app can mark it afterwards
    store.close()


# ----- export and import -----


def fill(store: ConversationStore) -> list[str]:
    a = store.create_conversation("SYS", {"temperature": 0.7, "max_new_tokens": 256})
    store.add_message(a, "user", "你好, what's 2+2?")
    store.add_message(a, "assistant", "4", stats=ReplyStats(prompt_tokens=9, completion_tokens=1, error=None))
    store.add_message(a, "user", "and 3+3?")
    store.add_message(a, "assistant", "6 and", status="stopped", stats={"finish_reason": "cancelled"})
    b = store.create_conversation("", title="Second")
    store.add_message(b, "user", "fail please")
    store.add_message(b, "assistant", "", status="error", stats=ReplyStats(error="CUDA out of memory").to_dict())
    return [a, b]


def test_export_import_round_trip(store: ConversationStore, tmp_path: Path) -> None:
    ids = fill(store)
    document = json.loads(export_json(store))
    assert (document["format"], document["version"], len(document["conversations"])) == (export_format.FORMAT, 1, 2)

    other = ConversationStore(tmp_path / "other.db")
    new_ids = import_json(other, export_json(store).encode())
    assert len(new_ids) == 2 and not set(new_ids) & set(ids)

    def snapshot(s: ConversationStore, cids: list[str]) -> list[tuple]:
        result = []
        for cid in cids:
            c = s.get_conversation(cid)
            messages = [(m.role, m.content, m.status, m.stats, m.created_at) for m in c.messages]
            result.append((c.title, c.system_prompt, c.settings, c.created_at, c.updated_at, messages))
        return result

    assert sorted(snapshot(other, new_ids)) == sorted(snapshot(store, ids))
    again = import_json(store, export_json(store, [ids[0]]))  # into the same store: new ids, nothing clobbered
    assert len(again) == 1 and again[0] not in ids and counts(store) == (3, 10)
    other.close()


def test_markdown_export(store: ConversationStore) -> None:
    a, b = fill(store)
    text = export_markdown(store, [a])
    assert text.startswith("# 你好, what's 2+2?") and "> SYS" in text and "**Assistant** *(stopped)*" in text
    both = export_markdown(store)
    assert "# Second" in both and "*(error)*" in both and both.count("\n---\n") == 1
    with pytest.raises(KeyError):
        export_markdown(store, ["missing"])


def valid_conversation(**extra: object) -> dict:
    return {"title": "ok", "messages": [{"role": "user", "content": "hi"}], **extra}


def doc(*conversations: dict, **top: object) -> str:
    return json.dumps({"format": export_format.FORMAT, "version": 1, "conversations": list(conversations), **top})


def message(**fields: object) -> dict:
    return valid_conversation(messages=[{"role": "user", "content": "hi", **fields}])


BAD_IMPORTS = {
    "not json": "{not json",
    "not utf-8": b"\xff\xfe\x00{",
    "top level list": "[]",
    "wrong format tag": doc(valid_conversation()).replace(export_format.FORMAT, "other-export"),
    "wrong version": json.dumps({"format": export_format.FORMAT, "version": 2, "conversations": []}),
    "version as bool": json.dumps({"format": export_format.FORMAT, "version": True, "conversations": []}),
    "version as string": json.dumps({"format": export_format.FORMAT, "version": "1", "conversations": []}),
    "missing conversations": json.dumps({"format": export_format.FORMAT, "version": 1}),
    "unknown role": doc(message(role="tool")),
    "unknown status": doc(message(status="done")),
    "content number": doc(message(content=123)),
    "content null": doc(message(content=None)),
    "content list": doc(message(content=["hi"])),
    "extra message field": doc(message(name="x")),
    "extra conversation field": doc(valid_conversation(owner="x")),
    "extra top field": doc(valid_conversation(), extra=1),
    "too many messages": doc(
        valid_conversation(messages=[{"role": "user", "content": "x"}] * (export_format.MAX_MESSAGES + 1))
    ),
    "huge string": doc(message(content="x" * (export_format.MAX_CONTENT_CHARS + 1))),
    "huge title": doc(valid_conversation(title="t" * (export_format.MAX_TITLE_CHARS + 1))),
    "nested garbage in stats": doc(message(stats={"a": {"b": [1, {"c": None}]}})),
    "system role among messages": doc(message(role="system")),
    "unknown finish reason in stats": doc(message(role="assistant", stats={"finish_reason": "bogus"})),
    "text where stats need a number": doc(message(role="assistant", stats={"time_to_first_token": "x"})),
    "negative token count": doc(message(role="assistant", stats={"completion_tokens": -1})),
    "unknown stats field": doc(message(role="assistant", stats={"secret": 1})),
    "nested garbage in settings": doc(valid_conversation(settings={"temperature": [[[0.5]]]})),
    "deep nesting": '{"format": "internlm-chat-export", "version": 1, "conversations": ' + "[" * 100_000,
    "NaN": doc(valid_conversation()).replace('"ok"', "NaN"),
    "duplicate keys": doc(valid_conversation()).replace('"title": "ok"', '"title": "ok", "title": "evil"'),
    "lone surrogate": doc(valid_conversation()).replace('"ok"', '"\\ud800"'),
    "negative timestamp": doc(message(created_at=-5)),
    "timestamp as string": doc(valid_conversation(created_at="2024-01-01")),
    "conversations not a list": json.dumps({"format": export_format.FORMAT, "version": 1, "conversations": {"a": 1}}),
    "valid then invalid": doc(valid_conversation(), valid_conversation(), message(role="root")),
}


@pytest.mark.parametrize("data", BAD_IMPORTS.values(), ids=BAD_IMPORTS.keys())
def test_bad_import_rejected_and_nothing_changes(store: ConversationStore, data: str | bytes) -> None:
    fill(store)
    before = counts(store)
    with pytest.raises(ImportValidationError) as info:
        import_json(store, data)
    assert len(str(info.value)) < 2000  # a clear message, not an echo of the file
    assert info.value.reason in IMPORT_REASONS  # the kind the History page says in its language
    assert counts(store) == before


def test_import_size_limits(store: ConversationStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_format, "MAX_IMPORT_BYTES", 1000)
    with pytest.raises(ImportValidationError, match="larger than") as info:
        import_json(store, doc(message(content="x" * 2000)))
    assert info.value.reason == "too_large"
    monkeypatch.setattr(export_format, "MAX_TOTAL_MESSAGES", 3)
    monkeypatch.setattr(export_format, "MAX_IMPORT_BYTES", 10**6)
    with pytest.raises(ImportValidationError, match="at most 3"):
        import_json(store, doc(valid_conversation(), valid_conversation(), valid_conversation(), valid_conversation()))
    assert counts(store) == (0, 0)
    assert len(import_json(store, doc(valid_conversation(), valid_conversation()))) == 2


def test_import_is_one_transaction(store: ConversationStore) -> None:
    fill(store)
    before = counts(store)
    good, bad = (
        store.get_conversation(store.list_conversations()[0].id),
        store.get_conversation(store.list_conversations()[1].id),
    )
    bad.messages[0].stats = {"x": object()}  # fails half-way through the insert
    with pytest.raises(TypeError):
        store.import_conversations([good, bad])
    assert counts(store) == before


def test_import_defaults_and_bom(store: ConversationStore) -> None:
    minimal = {
        "format": export_format.FORMAT,
        "version": 1,
        "conversations": [{"messages": [{"role": "user", "content": "a"}]}],
    }
    (cid,) = import_json(store, b"\xef\xbb\xbf" + json.dumps(minimal).encode())
    conv = store.get_conversation(cid)
    assert conv.title == "a" and conv.messages[0].status == "complete" and conv.messages[0].created_at > 0
    assert import_json(store, doc()) == []


def test_replace_from_is_one_transaction(store: ConversationStore) -> None:
    cid = store.create_conversation("")
    store.add_message(cid, "user", "first")
    q2 = store.add_message(cid, "user", "typo")
    store.add_message(cid, "assistant", "answer to typo")
    new = store.replace_from(cid, q2, "user", "fixed")
    assert new > q2
    assert [(m.role, m.content) for m in store.get_conversation(cid).messages] == [("user", "first"), ("user", "fixed")]
    with pytest.raises(KeyError):
        store.replace_from("missing", q2, "user", "x")
    with pytest.raises(ValueError):
        store.replace_from(cid, new, "system", "x")
    # a refused replace changed nothing
    assert [m.content for m in store.get_conversation(cid).messages] == ["first", "fixed"]


def test_an_export_imported_again_is_recognised(store):
    """The same conversation (system prompt, creation time, every message) is skipped when asked; kept when not."""
    from internlm_app.store.export import export_json, import_json

    cid = store.create_conversation("sys")
    store.add_message(cid, "user", "hello")
    data = export_json(store)
    skipped = import_json(store, data, skip_existing=True)
    assert skipped == [] and skipped.skipped == 1 and len(store.list_conversations()) == 1
    kept = import_json(store, data)
    assert len(kept) == 1 and kept.skipped == 0 and len(store.list_conversations()) == 2
    store.add_message(cid, "assistant", "a later reply")  # no longer the same conversation as the export
    assert import_json(store, data, skip_existing=True).skipped == 1  # the copy made above still matches


def test_messages_queued_during_a_reply_wait_in_the_file_until_sent(tmp_path: Path) -> None:
    """Typed while a reply runs: kept in the file (a reload, another tab or a restart sees them), oldest first; sent
    ones are removed, once only (two pages sending the same one: one removes it); deleting the conversation drops
    them. A file from before the queue gets the table by migration, its conversations kept."""
    path = tmp_path / "chats.db"
    with sqlite3.connect(path) as conn:  # a file of the schema before the queue
        for step in MIGRATIONS[:-1]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) - 1}")
    store = ConversationStore(path)
    cid, other = store.create_conversation(""), store.create_conversation("")
    first, second = store.queue_message(cid, "first"), store.queue_message(cid, "second")
    store.queue_message(other, "elsewhere")
    with pytest.raises(KeyError):
        store.queue_message("nope", "lost?")
    store.close()
    reopened = ConversationStore(path)  # a restart
    assert [(q.id, q.content) for q in reopened.queued_messages(cid)] == [(first, "first"), (second, "second")]
    mid = reopened.send_queued_message(first)  # out of the queue, into the conversation: one write
    assert mid is not None and reopened.send_queued_message(first) is None  # a second page finds it gone
    assert [q.content for q in reopened.queued_messages(cid)] == ["second"]
    assert [(m.id, m.role, m.content) for m in reopened.get_conversation(cid).messages] == [(mid, "user", "first")]
    reopened.delete(cid)
    assert reopened.queued_messages(cid) == [] and [q.content for q in reopened.queued_messages(other)] == ["elsewhere"]


def test_a_queued_message_can_be_edited_in_its_place_or_removed_until_it_is_sent(tmp_path: Path) -> None:
    """An edit keeps the message's place in the queue; a removed one is never sent; either on a message another page
    has sent (or removed) meanwhile says so (False) and changes nothing."""
    store = ConversationStore(tmp_path / "chats.db")
    cid = store.create_conversation("")
    first, second, third = (store.queue_message(cid, text) for text in ("first", "second", "third"))
    assert store.edit_queued_message(first, "first, edited") is True
    assert store.remove_queued_message(second) is True
    assert [(q.id, q.content) for q in store.queued_messages(cid)] == [(first, "first, edited"), (third, "third")]
    assert store.remove_queued_message(second) is False and store.edit_queued_message(second, "back?") is False
    mid = store.send_queued_message(first)
    assert store.edit_queued_message(first, "too late") is False and store.remove_queued_message(first) is False
    assert [(m.id, m.content) for m in store.get_conversation(cid).messages] == [(mid, "first, edited")]
    assert [q.content for q in store.queued_messages(cid)] == ["third"]


def _chats(store: ConversationStore, n: int) -> list[tuple]:
    """`n` conversations of a question and an answer (one with a regenerated answer and an attachment)."""
    from internlm_app.store.export import fingerprint
    from internlm_app.store.tree import Attachment

    for i in range(n):
        cid = store.create_conversation(f"system {i}")
        files = [Attachment("a.txt", "text/plain", "t")]
        store.add_message(cid, "user", f"question {i} " + "词" * 40, attachments=files)
        answer = store.add_message(cid, "assistant", f"answer {i}")
        if i == 0:
            store.add_version(answer, "answer 0, again")
    return sorted(fingerprint(store.get_conversation(s.id)) for s in store.list_conversations(limit=None))


def test_a_store_too_large_for_one_export_is_backed_up_as_a_zip_that_imports_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What "Export all" makes always imports again (reviewer: 1000+ conversations, or over 32 MiB, made a file the
    import refused). Bounds made small: a store past them is a ZIP of parts, each within them; the ZIP imports
    every conversation, in one transaction, and again with skip finds them all."""
    from internlm_app.store.export import export_archive, export_parts, fingerprint, fits_one_file

    monkeypatch.setattr(export_format, "MAX_IMPORT_BYTES", 2500)
    monkeypatch.setattr(export_format, "MAX_TOTAL_MESSAGES", 7)
    source = ConversationStore(tmp_path / "source.db")
    assert fits_one_file(source)  # empty
    expected = _chats(source, 6)
    assert not fits_one_file(source)
    with pytest.raises(ImportValidationError):  # one file holding everything: more than an import takes
        import_json(ConversationStore(tmp_path / "refused.db"), export_json(source))
    parts = list(export_parts(source))
    assert len(parts) >= 3 and all(len(p.encode()) <= 2500 for p in parts)
    assert all(sum(len(c["messages"]) for c in json.loads(p)["conversations"]) <= 7 for p in parts)
    for part, following in zip(parts, parts[1:], strict=False):  # packed: the next part's first one did not fit
        head, nxt = json.loads(part)["conversations"], json.loads(following)["conversations"][0]
        item = "  " + json.dumps(nxt, ensure_ascii=False, indent=1).replace("\n", "\n  ")
        over_bytes = len(part.encode()) + 2 + len(item.encode()) > 2500 - 32
        assert over_bytes or sum(len(c["messages"]) for c in head) + len(nxt["messages"]) > 7
    archive = export_archive(source)
    target = ConversationStore(tmp_path / "target.db")
    assert len(import_json(target, archive)) == 6
    assert sorted(fingerprint(target.get_conversation(s.id)) for s in target.list_conversations(limit=None)) == expected
    again = import_json(target, archive, skip_existing=True)
    assert len(again) == 0 and again.skipped == 6


def test_a_zip_that_is_not_a_backup_is_refused_with_nothing_imported(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import zipfile

    def zipped(**members: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return out.getvalue()

    good = doc(valid_conversation()).encode()
    bomb = zipped(**{"part-1.json": good, "part-2.json": b" " * (2 << 20)})
    monkeypatch.setattr(export_format, "MAX_ARCHIVE_JSON_BYTES", 1 << 20)
    cases = [
        (zipped(), "invalid"),
        (zipped(**{"part-1.json": good, "part-2.json": b"not json"}), "not_json"),
        (bomb, "too_large"),
        (b"PK\x03\x04 cut short", "not_json"),
    ]
    for data, reason in cases:
        with pytest.raises(ImportValidationError) as info:
            import_json(store, data)
        assert info.value.reason == reason, (reason, info.value)
    assert counts(store) == (0, 0)
    assert len(import_json(store, zipped(**{"part-1.json": good}))) == 1


def test_one_file_is_offered_only_when_its_export_surely_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate behind "json or zip" is a bound: text JSON escapes to six bytes a character (control
    characters) still fits when it says one file (reviewer: 200,000 x \\x01 a message made 36 MB from 6 MB)."""
    from internlm_app.store.export import fits_one_file

    monkeypatch.setattr(export_format, "MAX_IMPORT_BYTES", 60_000)
    store = ConversationStore(tmp_path / "c.db")
    cid = store.create_conversation("")
    store.add_message(cid, "user", "\x01" * 9_000)  # 9 KB stored, 54 KB in JSON
    fits = fits_one_file(store)
    assert len(export_json(store).encode()) <= 60_000 or not fits
    store.add_message(cid, "assistant", "\x01" * 2_000)
    assert not fits_one_file(store) and len(export_json(store).encode()) > 60_000


def test_a_damaged_or_too_large_zip_is_refused_cleanly(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose compressed bytes are damaged (zlib.error), and a ZIP whose parts together hold more messages
    than one import takes: ImportValidationError, nothing imported."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("part-1.json", doc(*(valid_conversation() for _ in range(20))))
    data = bytearray(out.getvalue())
    data[60:70] = b"\xff" * 10  # inside the deflated stream of the first member
    with pytest.raises(ImportValidationError) as info:
        import_json(store, bytes(data))
    assert info.value.reason == "not_json" and "part-1.json" in str(info.value)
    monkeypatch.setattr(export_format, "MAX_ARCHIVE_MESSAGES", 3)
    with pytest.raises(ImportValidationError, match="more than 3 messages in all") as info:
        import_json(store, out.getvalue())
    assert info.value.reason == "too_large" and counts(store) == (0, 0)


def test_a_conversation_of_many_versions_exports_and_imports_whole(tmp_path: Path) -> None:
    """The store caps no conversation's messages (each regenerated reply is one): one with more than 5,000 must make
    a backup that imports again (fourth reviewer: the import capped a conversation at 5,000)."""
    from internlm_app.store.export import fits_one_file

    source = ConversationStore(tmp_path / "source.db")
    cid = source.create_conversation("")
    source.add_message(cid, "user", "hello")
    reply = source.add_message(cid, "assistant", "v0")
    for i in range(1, 5_002):
        source.add_version(reply, f"v{i}")
    assert fits_one_file(source)
    target = ConversationStore(tmp_path / "target.db")
    (new,) = import_json(target, export_json(source))
    assert len(target.get_conversation(new).tree) == 5_003
