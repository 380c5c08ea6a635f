"""Export and import of branched conversations, feedback and attachments; linear exports of before still import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internlm_app.store import export_format
from internlm_app.store.db import ConversationStore
from internlm_app.store.export import export_json, export_markdown, fingerprint, import_json
from internlm_app.store.export_format import ImportValidationError
from internlm_app.store.tree import Attachment

pytestmark = pytest.mark.timeout(120)

# An export written by the app before versions existed (format version 1, messages a list in order).
LINEAR_EXPORT = {
    "format": "internlm-chat-export",
    "version": 1,
    "exported_at": 1767225600.0,
    "conversations": [
        {
            "id": "Xy3-abcDEF0",
            "title": "Capitals",
            "system_prompt": "SYS",
            "settings": {"temperature": 0.7},
            "created_at": 1767225000.0,
            "updated_at": 1767225100.0,
            "messages": [
                {"role": "user", "content": "France?", "status": "complete", "created_at": 1767225001.0, "stats": None},
                {
                    "role": "assistant",
                    "content": "Paris.",
                    "status": "complete",
                    "created_at": 1767225002.0,
                    "stats": {"prompt_tokens": 9, "completion_tokens": 2, "finish_reason": "stop"},
                },
                {"role": "user", "content": "Spain?", "status": "complete", "created_at": 1767225003.0, "stats": None},
                {"role": "assistant", "content": "Mad", "status": "stopped", "created_at": 1767225004.0, "stats": None},
            ],
        }
    ],
}


def branched(store: ConversationStore) -> str:
    """q1 → (a1 | a1b → q2 → (a2 👍 | a2b 👎)) with attachments, a2b selected, then a1 selected and a1b again."""
    cid = store.create_conversation("SYS", {"temperature": 0.2}, title="Branches")
    store.add_message(cid, "user", "q1", attachments=[Attachment("a.txt", "text/plain", "alpha", 2)])
    a1 = store.add_message(cid, "assistant", "a1")
    a1b = store.add_version(a1, "a1b", stats={"completion_tokens": 3})
    store.add_message(cid, "user", "q2", attachments=[Attachment("图.png", "image/png", "", 0)] * 2)
    a2 = store.add_message(cid, "assistant", "a2")
    a2b = store.add_version(a2, "a2b", status="stopped")
    store.set_feedback(a2, 1)
    store.set_feedback(a2b, 0)
    store.select(a1)
    store.select(a1b)  # back down to a2b, the latest leaf there
    return cid


def shape(store: ConversationStore, cid: str) -> tuple:
    """Everything an export carries, without the store's ids."""
    conv = store.get_conversation(cid)
    index = {m.id: n for n, m in enumerate(conv.tree)}
    messages = [
        (index.get(m.parent_id), m.role, m.content, m.status, m.stats, m.created_at, m.feedback, m.attachments)
        for m in conv.tree
    ]
    head = (conv.title, conv.system_prompt, conv.settings, conv.created_at, conv.updated_at)
    return head, messages, index[conv.leaf_id], [m.content for m in conv.messages]


def test_a_linear_export_of_before_imports_as_a_chain(store: ConversationStore) -> None:
    (cid,) = import_json(store, json.dumps(LINEAR_EXPORT))
    conv = store.get_conversation(cid)
    assert [(m.role, m.content, m.status) for m in conv.messages] == [
        ("user", "France?", "complete"),
        ("assistant", "Paris.", "complete"),
        ("user", "Spain?", "complete"),
        ("assistant", "Mad", "stopped"),
    ]
    assert conv.tree == conv.messages and conv.leaf_id == conv.messages[-1].id
    assert [m.parent_id for m in conv.messages] == [None, *(m.id for m in conv.messages[:-1])]
    assert conv.messages[1].stats["completion_tokens"] == 2 and conv.messages[1].feedback is None
    assert (conv.title, conv.settings, conv.created_at) == ("Capitals", {"temperature": 0.7}, 1767225000.0)
    store.add_message(cid, "user", "Italy?")  # goes on after the last message
    assert conv.messages[-1].id == store.get_conversation(cid).messages[-1].parent_id
    # the same file again is recognised, and so is the store's export of it as the file it was imported from
    assert import_json(store, json.dumps(LINEAR_EXPORT), skip_existing=True).skipped == 0  # Italy? was added
    again = import_json(store, json.dumps(LINEAR_EXPORT))
    assert import_json(store, json.dumps(LINEAR_EXPORT), skip_existing=True).skipped == 1
    assert import_json(store, export_json(store, again), skip_existing=True).skipped == 1


def test_a_branched_conversation_round_trips(store: ConversationStore, tmp_path: Path) -> None:
    cid = branched(store)
    assert [m.content for m in store.get_conversation(cid).messages] == ["q1", "a1b", "q2", "a2b"]
    document = json.loads(export_json(store))
    (item,) = document["conversations"]
    assert [(m["id"], m["parent"]) for m in item["messages"]] == [(1, None), (2, 1), (3, 1), (4, 3), (5, 4), (6, 4)]
    assert item["selected"] == 6 and [m["feedback"] for m in item["messages"]][4:] == [1, 0]

    other = ConversationStore(tmp_path / "other.db")
    (new,) = import_json(other, export_json(store).encode())
    assert shape(other, new) == shape(store, cid)
    versions = other.versions(other.get_conversation(new).messages[-1].id)
    assert versions.index == 1 and len(versions.ids) == 2
    assert json.loads(export_json(other))["conversations"][0]["messages"] == item["messages"]
    # the re-import is recognised with its tree; a tree with another shape is another conversation
    assert import_json(other, export_json(store), skip_existing=True).skipped == 1
    assert other.select(other.get_conversation(new).tree[1].id)  # choosing a version changes no fingerprint
    assert import_json(other, export_json(store), skip_existing=True).skipped == 1
    moved = json.loads(export_json(store))
    moved["conversations"][0]["messages"][3]["parent"] = 2  # q2 under a1 instead of a1b
    assert len(import_json(other, json.dumps(moved), skip_existing=True)) == 1
    other.close()


def test_fingerprint_tells_trees_with_the_same_path_apart(store: ConversationStore) -> None:
    def tree(q2b_parent: int | None) -> str:
        messages = [msg(id=1, content="q1"), msg(id=2, parent=1, role="assistant", content="a1")]
        messages += [msg(id=3, parent=2, content="q2"), msg(id=4, parent=q2b_parent, content="q2b")]
        return doc(*messages, selected=3, created_at=1767225000.0)

    (first,) = import_json(store, tree(2))  # q2b a version of q2
    assert [m.content for m in store.get_conversation(first).messages] == ["q1", "a1", "q2"]
    assert import_json(store, tree(2), skip_existing=True).skipped == 1
    (second,) = import_json(store, tree(None), skip_existing=True)  # q2b a version of q1: another conversation
    assert [m.content for m in store.get_conversation(second).messages] == ["q1", "a1", "q2"]
    assert fingerprint(store.get_conversation(first)) != fingerprint(store.get_conversation(second))


def test_markdown_shows_the_selected_path_with_feedback_and_attachments(store: ConversationStore) -> None:
    text = export_markdown(store, [branched(store)])
    assert "a1b" in text and "**Assistant** *(stopped)* 👎" in text and "\n\na1\n" not in text
    assert "*Attached: a.txt (text/plain)*" in text and text.count("*Attached: 图.png (image/png)*") == 2


def test_markdown_shows_a_replys_tool_calls_and_why_it_failed(store: ConversationStore) -> None:
    cid = store.create_conversation("")
    store.add_message(cid, "user", "what is 2+3?")
    steps = [{"id": "c1", "name": "calculate", "arguments": '{"expression": "2+3"}', "result": "5", "error": None}]
    stats = {"tool_steps": steps, "error": "GPU out of memory", "finish_reason": "error"}
    store.add_message(cid, "assistant", "It is", status="error", stats=stats)
    text = export_markdown(store, [cid])
    assert '*Tool call: calculate({"expression": "2+3"})* → 5' in text
    assert "**Assistant** *(error)*" in text and "*Error: GPU out of memory*" in text


def doc(*messages: dict, **conversation: object) -> str:
    conv = {"messages": list(messages), **conversation}
    return json.dumps({"format": export_format.FORMAT, "version": 1, "conversations": [conv]})


def msg(**fields: object) -> dict:
    return {"role": "user", "content": "hi", **fields}


def attached(**fields: object) -> dict:
    return msg(attachments=[{"name": "a.txt", "mime_type": "text/plain", "text": "x", "tokens": 1, **fields}])


BAD_TREES = {
    "some messages with ids, some without": doc(msg(id=1), msg()),
    "parent after the child": doc(msg(id=1, parent=2), msg(id=2, role="assistant")),
    "parent not in the file": doc(msg(id=1), msg(id=2, parent=7)),
    "id used twice": doc(msg(id=1), msg(id=1, parent=1)),
    "own parent": doc(msg(id=1, parent=1)),
    "parent without ids": doc(msg(), msg(parent=1)),
    "selected without ids": doc(msg(), selected=1),
    "selected not a message": doc(msg(id=1), selected=2),
    "negative id": doc(msg(id=-1)),
    "id as string": doc(msg(id="1")),
    "feedback 2": doc(msg(role="assistant", feedback=2)),
    "feedback as bool": doc(msg(role="assistant", feedback=True)),
    "feedback on a user message": doc(msg(feedback=1)),
    "attachment without a name": doc(attached(name="")),
    "attachment name too long": doc(attached(name="n" * (export_format.MAX_FILE_NAME_CHARS + 1))),
    "attachment MIME type too long": doc(attached(mime_type="t" * (export_format.MAX_MIME_CHARS + 1))),
    "attachment text too long": doc(attached(text="x" * (export_format.MAX_ATTACHMENT_CHARS + 1))),
    "negative token count": doc(attached(tokens=-1)),
    "unknown attachment field": doc(attached(path="/etc/passwd")),
    "too many attachments": doc(
        msg(attachments=[{"name": "a", "mime_type": "b"}] * (export_format.MAX_ATTACHMENTS + 1))
    ),
}


@pytest.mark.parametrize("data", BAD_TREES.values(), ids=BAD_TREES.keys())
def test_a_bad_tree_is_rejected_and_nothing_changes(store: ConversationStore, data: str) -> None:
    branched(store)
    before = export_json(store)
    with pytest.raises(ImportValidationError) as info:
        import_json(store, data)
    assert len(str(info.value)) < 2000
    assert json.loads(export_json(store))["conversations"] == json.loads(before)["conversations"]


def test_a_tree_without_selected_shows_its_last_message(store: ConversationStore) -> None:
    (cid,) = import_json(store, doc(msg(id=10), msg(id=20, parent=10, role="assistant"), msg(id=5, content="edit")))
    conv = store.get_conversation(cid)
    assert [m.content for m in conv.messages] == ["edit"] and len(conv.tree) == 3 and conv.title == "edit"
    assert store.versions(conv.messages[0].id).index == 1


def test_a_reply_with_tool_calls_round_trips_and_bad_steps_are_refused(tmp_path):
    from internlm_app.store.db import ConversationStore

    store = ConversationStore(tmp_path / "c.db")
    cid = store.create_conversation("")
    store.add_message(cid, "user", "what is 1+1?")
    steps = [{"id": "c1", "name": "calculate", "arguments": '{"expression": "1+1"}', "text": "", "result": "2"}]
    store.add_message(cid, "assistant", "2", stats={"completion_tokens": 9, "tool_steps": steps})
    data = export_json(store, [cid])
    (copy,) = import_json(store, data)
    assert store.get_conversation(copy).messages[1].stats["tool_steps"][0]["result"] == "2"
    bad = data.replace('"name": "calculate"', '"name": ""')
    with pytest.raises(ImportValidationError, match="tool_steps"):
        import_json(store, bad)


def test_long_tool_arguments_and_results_round_trip(store):
    # A tool's arguments and result are kept whole, as long as a message may be.
    cid = store.create_conversation("")
    store.add_message(cid, "user", "go")
    long = "x" * 12_000
    steps = [{"id": "c1", "name": "echo", "arguments": long, "text": "", "result": long}]
    store.add_message(cid, "assistant", "done", stats={"tool_steps": steps})
    (copy,) = import_json(store, export_json(store, [cid]))
    assert store.get_conversation(copy).messages[1].stats["tool_steps"][0]["arguments"] == long


def test_an_imported_selection_of_an_inner_message_goes_on_to_a_leaf(store):
    cid = store.create_conversation("")
    store.add_message(cid, "user", "q")
    store.add_message(cid, "assistant", "a")
    doc = json.loads(export_json(store, [cid]))
    doc["conversations"][0]["selected"] = doc["conversations"][0]["messages"][0]["id"]  # the question, not the reply
    (copy,) = import_json(store, json.dumps(doc))
    assert [m.content for m in store.get_conversation(copy).messages] == ["q", "a"]  # as select() shows it
