"""Reply versions and branches: the store keeps a tree of messages and shows the path to the selected leaf."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from internlm_app.store.db import ConversationStore
from internlm_app.store.schema import MIGRATIONS, SCHEMA_VERSION
from internlm_app.store.tree import Versions

pytestmark = pytest.mark.timeout(120)


def path(store: ConversationStore, cid: str) -> list[str]:
    return [m.content for m in store.get_conversation(cid).messages]


def chat(store: ConversationStore, *texts: str) -> tuple[str, list[int]]:
    """A linear conversation alternating user and assistant messages."""
    cid = store.create_conversation("SYS")
    return cid, [store.add_message(cid, ("user", "assistant")[n % 2], t) for n, t in enumerate(texts)]


def test_regenerate_keeps_every_reply_as_a_version(store: ConversationStore) -> None:
    cid, (q1, a1) = chat(store, "q1", "a1")
    a2 = store.add_version(a1, "", status="streaming")
    # the empty streaming reply is left out: the model sees the path up to the question
    assert store.messages_for_model(cid) == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q1"}]
    assert store.update_message(a2, "a2", "complete")
    a3 = store.add_version(a1, "a3")
    assert path(store, cid) == ["q1", "a3"]
    assert store.versions(a2) == Versions((a1, a2, a3), 1) and store.versions(a3).index == 2
    assert store.get_conversation(cid).messages[1].parent_id == q1
    assert store.select(a1) and path(store, cid) == ["q1", "a1"]
    store.add_message(cid, "user", "q2 after a1")  # appended at the selected leaf
    assert path(store, cid) == ["q1", "a1", "q2 after a1"]
    assert store.select(a3) and path(store, cid) == ["q1", "a3"]
    assert store.messages_for_model(cid)[-1] == {"role": "assistant", "content": "a3"}
    assert len(store.get_conversation(cid).tree) == 5
    assert store.list_conversations()[0].message_count == 2  # the path shown, not every version


def test_editing_any_user_message_starts_a_branch_and_select_follows_the_latest_leaf(store: ConversationStore) -> None:
    cid, (q1, a1, q2, a2, q3, a3) = chat(store, "q1", "a1", "q2", "a2", "q3", "a3")
    q2b = store.add_version(q2, "q2 edited")  # an edit of a user message in the middle
    assert path(store, cid) == ["q1", "a1", "q2 edited"]
    store.add_message(cid, "assistant", "a2 for the edit")
    assert path(store, cid) == ["q1", "a1", "q2 edited", "a2 for the edit"]
    assert store.versions(q2) == Versions((q2, q2b), 0)

    assert store.select(q2)  # back to the first version: down to its most recent leaf
    assert path(store, cid) == ["q1", "a1", "q2", "a2", "q3", "a3"]
    a3b = store.add_version(a3, "a3 again")
    assert store.select(a3)  # a version chosen deep in the branch ...
    assert store.select(q2b) and path(store, cid)[-1] == "a2 for the edit"
    assert store.select(q2) and path(store, cid)[-1] == "a3"  # ... is the one found again
    assert store.select(a3b) and store.select(q1) and path(store, cid)[-1] == "a3 again"
    assert store.select(a2) and path(store, cid)[-1] == "a3 again"  # an inner message: the path goes on below it
    assert not store.select(10**9) and store.versions(10**9) is None
    with pytest.raises(KeyError):
        store.add_version(10**9, "x")


def test_the_first_message_has_versions_too(store: ConversationStore) -> None:
    cid, (q1, a1) = chat(store, "q1", "a1")
    q1b = store.add_version(q1, "q1 edited")
    assert store.versions(q1b) == Versions((q1, q1b), 1) and path(store, cid) == ["q1 edited"]
    assert store.get_conversation(cid).title == "q1"  # the title stays the first one
    assert store.select(q1) and path(store, cid) == ["q1", "a1"]


def test_replace_from_and_delete_messages_from_on_a_tree(store: ConversationStore) -> None:
    cid, (q1, a1, q2, a2) = chat(store, "q1", "a1", "q2", "a2")
    a1b = store.add_version(a1, "a1b")
    store.add_message(cid, "user", "q2b")
    # deleting a branch that is not shown leaves the path alone
    assert store.delete_messages_from(cid, a1) == 3 and path(store, cid) == ["q1", "a1b", "q2b"]
    assert store.versions(a1b) == Versions((a1b,), 0)
    # deleting the shown leaf ends the path at its parent, where the next message goes (today's regenerate)
    last = store.get_conversation(cid).messages[-1].id
    assert store.delete_messages_from(cid, last) == 1 and path(store, cid) == ["q1", "a1b"]
    store.add_message(cid, "user", "q2c")
    new = store.replace_from(cid, store.get_conversation(cid).messages[-1].id, "user", "q2d")
    assert path(store, cid) == ["q1", "a1b", "q2d"] and store.versions(new) == Versions((new,), 0)
    assert store.delete_messages_from(cid, q1) == 3 and path(store, cid) == []
    assert store.get_conversation(cid).tree == []
    assert store.delete_messages_from(cid, q2) == 0  # gone already
    assert store.delete_messages_from("other", a2) == 0


def test_a_long_chain_is_deleted_without_hitting_sqlite_limits(store: ConversationStore) -> None:
    # A cascade would nest one trigger per level and fail past SQLite's depth limit of 1000.
    cid, mids = chat(store, *(f"m{n}" for n in range(1200)))
    assert store.delete_messages_from(cid, mids[1]) == 1199 and path(store, cid) == ["m0"]
    store.add_message(cid, "assistant", "after")
    assert path(store, cid) == ["m0", "after"]
    assert store.delete(cid)


def test_fork_copies_the_path_up_to_a_message(store: ConversationStore) -> None:
    cid, (q1, a1, q2, a2) = chat(store, "q1", "a1", "q2", "a2")
    store.add_version(a1, "a1b")
    store.rename(cid, "Named")
    store.set_feedback(a1, 1)
    fork = store.fork(cid, q2)  # q2 is on a branch that is not shown: its own path is copied
    copy = store.get_conversation(fork)
    assert fork != cid and [m.content for m in copy.messages] == ["q1", "a1", "q2"] and len(copy.tree) == 3
    assert (copy.title, copy.system_prompt) == ("Named", "SYS") and copy.messages[1].feedback == 1
    assert copy.messages[1].created_at == store.get_conversation(cid).tree[1].created_at
    store.add_message(fork, "assistant", "new in the fork")
    assert path(store, fork)[-1] == "new in the fork" and path(store, cid) == ["q1", "a1b"]
    with pytest.raises(KeyError):
        store.fork(cid, 10**9)
    with pytest.raises(KeyError):
        store.fork("missing", q1)
    with pytest.raises(KeyError):
        store.fork(fork, q1)  # a message of another conversation


def v2_database(path: Path) -> None:
    """A file of the schema before versions (2), with two linear conversations and an empty one."""
    with sqlite3.connect(path) as conn:
        for step in MIGRATIONS[:2]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT INTO conversations VALUES ('a', 'A', 'sys', '{}', 1, 2)")
        conn.execute("INSERT INTO conversations VALUES ('b', 'B', '', '{}', 1, 2)")
        conn.execute("INSERT INTO conversations VALUES ('e', 'E', '', '{}', 1, 2)")
        for n, (cid, role, text) in enumerate(
            [("a", "user", "a-q1"), ("b", "user", "b-q1"), ("a", "assistant", "a-r1"), ("b", "assistant", "b-r1")]
            + [("a", "user", "a-q2"), ("a", "assistant", "a-r2")]
        ):
            conn.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                (cid, role, text, 10 + n),
            )
        conn.execute("PRAGMA user_version = 2")


def test_a_file_before_versions_becomes_chains(tmp_path: Path) -> None:
    path_ = tmp_path / "v2.db"
    v2_database(path_)
    store = ConversationStore(path_)
    assert store.schema_version() == SCHEMA_VERSION
    a = store.get_conversation("a")
    assert [m.content for m in a.messages] == ["a-q1", "a-r1", "a-q2", "a-r2"] and a.leaf_id == a.messages[-1].id
    assert [m.parent_id for m in a.messages] == [None, *(m.id for m in a.messages[:-1])]
    assert [m.content for m in store.get_conversation("b").messages] == ["b-q1", "b-r1"]
    assert store.get_conversation("e").messages == [] and store.get_conversation("e").leaf_id is None
    assert {s.id: s.message_count for s in store.list_conversations()} == {"a": 4, "b": 2, "e": 0}
    store.add_message("a", "user", "a-q3")  # appends after the last message, as before
    r2b = store.add_version(a.messages[-1].id, "a-r2b")
    assert [m.content for m in store.get_conversation("a").messages] == ["a-q1", "a-r1", "a-q2", "a-r2b"]
    assert store.select(a.messages[-1].id) and path(store, "a")[-1] == "a-q3"
    assert store.versions(r2b).ids == (a.messages[-1].id, r2b)
    store.close()
