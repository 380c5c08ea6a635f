"""AppTest tests of reply versions, branches, fork and feedback on the chat page, and History's feedback filter,
against the real tiny model and a real store."""

from __future__ import annotations

import pytest

from internlm_app.sampling import SamplingParams
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT
from internlm_app.store.db import ConversationStore
from tests.app_helpers import MAX_NEW_TOKENS, chat, run_page, send, texts

GREEDY = {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}  # a conversation's settings: the same reply each run


@pytest.fixture
def store(app_env):
    return ConversationStore(app_env / "conversations.db")


def _conversation(store: ConversationStore, *turns: str) -> tuple[str, list[int]]:
    """A greedy conversation of alternating user and assistant turns; its id and the messages' ids."""
    cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT, GREEDY)
    ids = [store.add_message(cid, "user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(turns)]
    return cid, ids


def _model_reply(engine, *turns: str) -> str:
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return engine.reply(messages, SamplingParams.greedy_params(MAX_NEW_TOKENS))[0]


def _click(at, key: str):
    at.button(key=key).click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_regenerate_keeps_the_old_reply_as_a_version_and_the_switcher_picks_the_context(app_env, store, engine):
    cid, (_, old) = _conversation(store, "hello", "an earlier answer")
    at = _click(run_page(query={"c": cid}), "regenerate")
    regenerated = _model_reply(engine, "hello")
    assert chat(at) == [("user", "hello"), ("assistant", regenerated)]
    conv = store.get_conversation(cid)
    new = conv.messages[-1].id
    assert [m.content for m in conv.tree] == ["hello", "an earlier answer", regenerated]
    assert store.versions(new).ids == (old, new) and "2 / 2" in texts(at.chat_message[1].caption)
    assert at.button(key=f"version_next_{new}").disabled and not at.button(key=f"version_prev_{new}").disabled

    _click(at, f"version_prev_{new}")  # back to the first reply: on screen, and in what the model reads next
    assert chat(at) == [("user", "hello"), ("assistant", "an earlier answer")]
    assert "1 / 2" in texts(at.chat_message[1].caption)
    send(at, "and then?")
    expected = _model_reply(engine, "hello", "an earlier answer", "and then?")
    assert store.get_conversation(cid).messages[-1].content == expected and chat(at)[-1][1] == expected.strip()

    _click(at, f"version_next_{old}")  # the other version: its branch ends at it (nothing was said after it)
    assert chat(at) == [("user", "hello"), ("assistant", regenerated)]
    assert store.messages_for_model(cid)[1:] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": regenerated},
    ]


def test_editing_an_earlier_message_starts_a_branch_and_the_old_one_stays_reachable(app_env, store, engine):
    cid, (q1, a1, q2, a2) = _conversation(store, "helo", "what?", "tell me more", "about what?")
    at = run_page(query={"c": cid})
    assert at.button(key=f"edit_{q1}") and at.button(key="edit_last")  # every user message can be edited
    _click(at, f"edit_{q1}")
    assert at.text_area(key="edit_text").value == "helo"
    at.text_area(key="edit_text").set_value("hello")
    _click(at, "edit_send")
    assert chat(at) == [("user", "hello"), ("assistant", _model_reply(engine, "hello"))]
    edited = store.get_conversation(cid).messages[0].id
    assert store.versions(edited).ids == (q1, edited) and "2 / 2" in texts(at.chat_message[0].caption)

    _click(at, f"version_prev_{edited}")  # the old branch, whole
    assert [text for _, text in chat(at)] == ["helo", "what?", "tell me more", "about what?"]
    assert [m.id for m in store.get_conversation(cid).messages] == [q1, a1, q2, a2]


def test_fork_copies_the_path_up_to_a_reply_into_a_new_conversation_and_opens_it(app_env, store):
    cid, (_, a1, _, _) = _conversation(store, "first", "one", "second", "two")
    at = _click(run_page(query={"c": cid}), f"fork_{a1}")
    new = at.query_params["c"]
    assert new != cid and chat(at) == [("user", "first"), ("assistant", "one")]
    assert [m.content for m in store.get_conversation(new).messages] == ["first", "one"]
    assert len(store.get_conversation(cid).messages) == 4  # the original is untouched
    assert chat(run_page(query={"c": new})) == chat(at)  # a refresh keeps the fork


def test_feedback_is_saved_and_shown_after_a_reload(app_env, store):
    cid, (_, a1, _, a2) = _conversation(store, "first", "one", "second", "two")
    at = run_page(query={"c": cid})
    at.feedback(key=f"feedback_{a1}").set_value(1).run()
    at.feedback(key=f"feedback_{a2}").set_value(0).run()
    assert [m.feedback for m in store.get_conversation(cid).messages] == [None, 1, None, 0]
    again = run_page(query={"c": cid})  # a refresh: a new session reads it from the store
    assert again.feedback(key=f"feedback_{a1}").value == 1 and again.feedback(key=f"feedback_{a2}").value == 0
    again.feedback(key=f"feedback_{a1}").set_value(None).run()  # taken back
    assert store.get_conversation(cid).messages[1].feedback is None


def test_a_reply_has_a_copy_of_its_whole_text_in_a_code_block(app_env, store):
    cid, _ = _conversation(store, "code please", "Here:\n\n```python\nprint(1)\n```")
    at = run_page(query={"c": cid})
    # Streamlit's own code block (its copy button) with the reply's whole text, in the reply's "Copy" popover
    assert [c.value for c in at.chat_message[1].code] == ["Here:\n\n```python\nprint(1)\n```"]


def test_history_filters_by_feedback(app_env, store):
    liked, (_, a1) = _conversation(store, "the sea", "it is blue")
    disliked, (_, a2) = _conversation(store, "the sky", "it is blue too")
    _conversation(store, "the hills", "they are green")
    store.set_feedback(a1, 1)
    store.set_feedback(a2, 0)
    at = run_page("internlm_app/web/views/history.py")
    assert len(at.selectbox(key="selected").options) == 3
    at.radio(key="feedback_filter").set_value(1).run()
    assert [o.split(" · ")[0] for o in at.selectbox(key="selected").options] == ["the sea"]
    at.radio(key="feedback_filter").set_value(0).run()
    assert [o.split(" · ")[0] for o in at.selectbox(key="selected").options] == ["the sky"]
    at.text_input(key="search").set_value("blue").run()  # with a search too
    assert [o.split(" · ")[0] for o in at.selectbox(key="selected").options] == ["the sky"]
    at.radio(key="feedback_filter").set_value(None).run()
    assert len(at.selectbox(key="selected").options) == 2
