"""AppTest tests of the chat page (app.py) against the real tiny model."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from internlm_app.sampling import BOUNDS, INT_PARAMS, SamplingParams
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT, MAX_LENGTH_BOUNDS
from internlm_app.store.db import ConversationStore
from internlm_app.web.i18n import t
from internlm_app.web.safe_markdown import plain
from tests.app_helpers import MAX_NEW_TOKENS, ROOT, chat, run_page, send, set_app_env, texts
from tests.conftest import FIXTURE_DIR


@pytest.fixture
def store(app_env):
    return ConversationStore(app_env / "conversations.db")


def test_sliders_have_the_bounds_of_sampling_bounds(app_env):
    at = run_page()
    for name, bound in BOUNDS.items():
        cast = int if name in INT_PARAMS else float
        slider = at.slider(key=name)
        assert (slider.min, slider.max, slider.step) == (cast(bound.low), cast(bound.high), cast(bound.step))
    defaults = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    assert {name: at.slider(key=name).value for name in BOUNDS} == defaults.model_dump()
    budget = at.slider(key="max_length")
    assert (budget.min, budget.max, budget.value) == (MAX_LENGTH_BOUNDS[0], 512, 512)  # the fixture's window
    assert not budget.disabled
    assert at.text_area(key="system_prompt").value == DEFAULT_SYSTEM_PROMPT


def test_a_message_gets_a_streamed_reply_with_stats_saved_under_the_url_id(app_env, store, engine):
    at = run_page()
    at.slider(key="temperature").set_value(0.0)  # greedy: the same reply on every run
    send(at, "你好")
    (user_role, user_text), (bot_role, reply) = chat(at)
    assert (user_role, user_text, bot_role) == ("user", "你好", "assistant") and reply
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "你好"}]
    expected, stats = engine.reply(messages, SamplingParams.greedy_params(MAX_NEW_TOKENS))
    assert reply == expected
    caption = at.chat_message[1].caption[0].value
    assert "tokens" in caption and "首字" in caption and "tokens/秒" in caption
    assert t("stat_finish", "zh", reason=t(f"finish_{stats.finish_reason}", "zh")) in caption and "(" not in caption
    conv = store.get_conversation(at.query_params["c"])
    assert [(m.role, m.status) for m in conv.messages] == [("user", "complete"), ("assistant", "complete")]
    assert conv.messages[1].content == reply and conv.messages[1].stats["completion_tokens"] == stats.completion_tokens
    assert conv.system_prompt == DEFAULT_SYSTEM_PROMPT and conv.settings["max_new_tokens"] == MAX_NEW_TOKENS
    assert conv.settings["temperature"] == 0.0


def test_temperature_zero_gives_the_engines_greedy_reply(app_env, engine):
    at = run_page()
    at.slider(key="temperature").set_value(0.0)
    reply = chat(send(at, "hello"))[1][1]
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "hello"}]
    expected, _ = engine.reply(messages, SamplingParams.greedy_params(MAX_NEW_TOKENS))
    assert reply == expected


def test_reload_with_the_conversation_id_restores_it_and_its_settings(app_env):
    at = run_page()
    at.slider(key="top_k").set_value(7)
    at.text_area(key="system_prompt").set_value("Be brief.")
    send(at, "first")
    cid = at.query_params["c"]
    again = run_page(query={"c": cid})  # a refresh, or the URL opened in another tab
    assert chat(again) == chat(at)
    assert again.slider(key="top_k").value == 7 and again.text_area(key="system_prompt").value == "Be brief."


def test_new_chat_clears_the_screen_and_keeps_the_old_conversation(app_env, store):
    at = send(run_page(), "hello")
    at.button(key="new_chat").click().run()
    assert chat(at) == [] and "c" not in at.query_params
    assert len(store.list_conversations()) == 1


def test_regenerate_replaces_the_last_reply(app_env, store):
    at = run_page()
    at.slider(key="temperature").set_value(0.0)
    first = chat(send(at, "hello"))[1][1]
    at.button(key="regenerate").click().run()
    assert chat(at) == [("user", "hello"), ("assistant", first)]  # greedy: the same text again
    conv = store.list_conversations()[0]
    assert conv.message_count == 2


def test_edit_the_last_message_and_resend(app_env, store):
    at = send(run_page(), "helo")
    at.button(key="edit_last").click().run()
    assert at.text_area(key="edit_text").value == "helo"
    at.text_area(key="edit_text").set_value("hello")
    at.button(key="edit_send").click().run()
    assert [role for role, _ in chat(at)] == ["user", "assistant"] and chat(at)[0][1] == "hello"
    (summary,) = store.list_conversations()
    assert [m.content for m in store.get_conversation(summary.id).messages][0] == "hello"


def test_old_turns_left_out_of_the_context_are_reported(app_env, store):
    cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT)
    for i in range(8):
        store.add_message(cid, "user", f"question {i}: " + "tell me about the sea " * 6)
        store.add_message(cid, "assistant", f"answer {i}: " + "the sea is large and blue " * 6)
    at = send(run_page(query={"c": cid}), "and now?")
    assert "最早的" in texts(at.chat_message[-1].info)
    assert store.get_conversation(cid).messages[-1].stats["dropped_messages"] > 0


def test_an_error_during_a_reply_is_shown_in_the_chat_and_the_conversation_kept(app_env, store):
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    stats = {"finish_reason": "error", "error": "GPU out of memory: CUDA out of memory. Tried to allocate 2 GiB"}
    store.add_message(cid, "assistant", "partial", status="error", stats=stats)
    at = run_page(query={"c": cid})
    assert chat(at) == [("user", "hello"), ("assistant", "partial")]
    assert "GPU out of memory" in texts(at.error)
    assert "hello" in chat(send(at, "hello again"))[2][1]


def test_clear_gpu_cache_works_on_a_cpu_only_machine(app_env):
    at = run_page()
    assert "CPU" in texts(at.sidebar.caption)
    at.button(key="clear_gpu").click().run()
    assert not at.exception and "CPU" in texts(at.sidebar.info)


def test_rename_and_delete_with_confirmation(app_env, store):
    at = send(run_page(), "hello")
    at.text_input(key="rename_title").set_value("Greetings")
    at.button(key="rename").click().run()
    assert store.list_conversations()[0].title == "Greetings"
    at.button(key="delete_chat").click().run()
    assert len(store.list_conversations()) == 1  # not before the confirmation
    at.button(key="delete_confirm").click().run()
    assert store.list_conversations() == [] and chat(at) == []


def test_english_labels(app_env):
    at = run_page()
    at.radio(key="lang").set_value("en").run()
    assert at.slider(key="temperature").label == "Temperature"
    assert at.button(key="new_chat").label == "New chat (clear)"
    assert at.query_params["lang"] in ("en", ["en"])  # in the URL: a refresh or a copied link keeps it


def test_the_language_comes_from_the_url_and_survives_a_new_session(app_env):
    at = run_page(query={"lang": "en"})  # a refresh or a new tab with the link: a new session
    assert at.radio(key="lang").value == "en" and at.button(key="new_chat").label == "New chat (clear)"
    assert run_page(query={"lang": "xx"}).radio(key="lang").value == "zh"  # an unknown one: the default


def test_a_page_switch_keeps_the_language_and_the_open_conversation(app_env):
    """Streamlit's page navigation drops the URL's parameters: each page puts ?lang= back (a reload after a switch
    stays in English), and the chat page reopens this session's conversation rather than a new one (reviewer)."""
    at = send(run_page(query={"lang": "en"}), "hello")
    cid = at.query_params["c"]
    at.query_params.clear()  # what a click on "History" in the sidebar does to the URL
    at.switch_page("internlm_app/web/views/history.py").run()
    assert at.query_params["lang"] in ("en", ["en"])
    at.query_params.clear()
    at.switch_page("internlm_app/web/views/chat.py").run()
    assert at.query_params["c"] in (cid, [cid]) and at.query_params["lang"] in ("en", ["en"])
    assert [role for role, _ in chat(at)] == ["user", "assistant"] and chat(at)[0][1] == "hello"
    at.button(key="new_chat").click().run()  # New chat forgets it: the next switch back opens an empty one
    at.query_params.clear()
    at.switch_page("internlm_app/web/views/chat.py").run()
    assert "c" not in at.query_params and chat(at) == []
    # The open conversation deleted elsewhere (History, another tab): back on the chat page, a new one, no warning.
    send(at, "to be deleted")
    store = ConversationStore(app_env / "conversations.db")
    store.delete(at.query_params["c"])
    store.close()
    at.query_params.clear()
    at.switch_page("internlm_app/web/views/history.py").run()
    at.query_params.clear()
    at.switch_page("internlm_app/web/views/chat.py").run()
    assert "c" not in at.query_params and chat(at) == [] and not at.warning, [w.value for w in at.warning]
    assert "找不到对话 nope" in texts(run_page(query={"c": "nope"}).warning)  # an id in the URL is still named


def test_logout_forgets_the_login(app_env, monkeypatch, app_cache):
    set_app_env(monkeypatch, app_env, app_cache, INTERNLM_WEB_PASSWORD="s3cret")
    at = run_page()
    at.text_input(key="password").set_value("s3cret")
    at.button(key="login").click().run()
    assert at.chat_input(key="prompt")
    at.button(key="logout").click().run()
    assert not at.chat_input and at.text_input(key="password")


def test_a_model_path_that_does_not_exist_gives_a_clear_error_and_retry_works_once_fixed(
    app_env, monkeypatch, app_cache
):
    model_dir = app_env / "model"
    set_app_env(monkeypatch, app_env, app_cache, INTERNLM_MODEL_PATH=str(model_dir))
    at = run_page()
    assert "INTERNLM_MODEL_PATH 指向的不是模型目录" in texts(at.error)  # one translated sentence with what to do
    details = at.expander[0]  # the English message, behind an expander
    assert details.label == "详细信息（英文）" and "no config.json" in details.code[0].value
    assert str(model_dir) in details.code[0].value
    assert not at.chat_input  # nothing else of the page
    shutil.copytree(FIXTURE_DIR, model_dir)
    at.button(key="retry_load").click().run()
    assert not at.error and at.chat_input(key="prompt")


def test_password_gate_renders_nothing_before_login(app_env, monkeypatch, app_cache):
    set_app_env(monkeypatch, app_env, app_cache, INTERNLM_WEB_PASSWORD="s3cret")
    at = run_page()
    assert not at.chat_input and not at.sidebar.children and not at.slider
    at.text_input(key="password").set_value("wrong")
    at.button(key="login").click().run()
    assert not at.chat_input and "Wrong password" in texts(at.error)
    at.text_input(key="password").set_value("s3cret")
    at.button(key="login").click().run()
    assert at.chat_input(key="prompt") and at.slider(key="temperature")


def test_wrong_passwords_are_limited_for_the_whole_process(app_env, monkeypatch, app_cache):
    set_app_env(monkeypatch, app_env, app_cache, INTERNLM_WEB_PASSWORD="throttled-s3cret")
    first = run_page()
    for _ in range(5):
        first.text_input(key="password").set_value("wrong")
        first.button(key="login").click().run()
        assert "Wrong password" in texts(first.error)
    second = run_page()  # another tab: no fresh tries
    second.text_input(key="password").set_value("throttled-s3cret")
    second.button(key="login").click().run()
    assert "Too many wrong passwords" in texts(second.error) and not second.chat_input  # even the right one waits


def test_the_login_throttle_lets_tries_through_again_after_its_window():
    from internlm_app.web import auth

    now = [100.0]
    throttle = auth.LoginThrottle(limit=2, window=60.0, clock=lambda: now[0])
    throttle.failed(), throttle.failed()
    assert throttle.wait_seconds() == 60.0
    now[0] += 30
    assert throttle.wait_seconds() == 30.0
    now[0] += 30
    assert throttle.wait_seconds() == 0.0


def test_python_app_py_prints_the_commands_that_serve_it():
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "python -m internlm_app serve" in result.stderr and "streamlit run app.py" in result.stderr


def test_invalid_settings_are_reported_without_a_traceback(app_env, monkeypatch):
    monkeypatch.setenv("INTERNLM_TEMPERATURE", "hot")
    at = run_page()
    assert "INTERNLM_" in texts(at.error) and "temperature" in texts(at.error) and not at.chat_input


def test_no_gpu_for_a_cuda_setting_is_a_clear_message(app_env, monkeypatch, app_cache):
    set_app_env(monkeypatch, app_env, app_cache, INTERNLM_DEVICE="cuda")
    at = run_page(query={"lang": "en"})
    assert "no CUDA GPU is visible" in texts(at.error) and "nvidia-smi" in texts(at.error)
    assert "no CUDA GPU is visible" in at.expander[0].code[0].value and at.expander[0].label == "Details"
    assert at.button(key="retry_load")


def _chat_with_queue(db, *queued: str) -> str:
    """A conversation of one exchange, with `queued` messages typed during a reply that has just ended."""
    store = ConversationStore(db)
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    store.add_message(cid, "assistant", "hi there")
    for text in queued:
        store.queue_message(cid, text)
    store.close()
    return cid


def _stored(db, cid) -> tuple[list[str], list[tuple[str, str]]]:
    store = ConversationStore(db)
    try:
        queued = [q.content for q in store.queued_messages(cid)]
        return queued, [(m.role, m.content) for m in store.get_conversation(cid).messages]
    finally:
        store.close()


def test_queued_messages_are_sent_after_a_reload_in_order_and_never_overtaken(app_env):
    """A message queued during a reply is in the file: a new session (a reload) sends it once no reply runs. A
    message typed while older ones wait goes behind them, also in the moment between a reply's end and the page
    noticing it."""
    db = app_env / "conversations.db"
    cid = _chat_with_queue(db, "queued first")
    at = run_page(query={"c": cid})  # a reload: the queued message goes out and gets its reply
    queued, messages = _stored(db, cid)
    assert queued == [] and [role for role, _ in messages] == ["user", "assistant"] * 2
    assert messages[2] == ("user", "queued first") and chat(at)[2] == ("user", "queued first")
    store = ConversationStore(db)
    store.queue_message(cid, "queued second")  # typed during a reply that has just ended
    store.close()
    at.chat_input(key="prompt").set_value("typed third").run()
    users = [text for role, text in _stored(db, cid)[1] if role == "user"]
    assert users == ["hello", "queued first", "queued second", "typed third"]


def test_two_tabs_never_start_two_replies_of_one_conversation(app_env):
    """Tab A sends the first queued message; before its reply has started, tab B's page runs: B sees the reply
    starting (A's claim) and leaves the second queued message waiting, which goes out after A's reply. Never two
    user turns in a row, never two replies of one conversation at once."""
    import threading

    from streamlit.runtime import Runtime

    from internlm_app.web import attachments_view

    db = app_env / "conversations.db"
    cid = _chat_with_queue(db, "first queued", "second queued")
    run_page()  # the model loads once for both tabs
    real_sent, calls = attachments_view.sent, []

    def tab_b_runs_now() -> None:  # tab A has saved its message and is about to draw its reply
        calls.append(1)
        if len(calls) == 1:
            outer = Runtime._instance  # AppTest clears the (mock) runtime when its run ends: tab A's is still on
            tab_b = threading.Thread(target=lambda: run_page(query={"c": cid}))
            tab_b.start()
            tab_b.join(120)
            Runtime._instance = outer
        real_sent()

    with pytest.MonkeyPatch.context() as mp:  # (app_env's own patches, the model's settings, stay)
        mp.setattr(attachments_view, "sent", tab_b_runs_now)
        run_page(query={"c": cid})
    run_page(query={"c": cid})  # after A's reply: the second one goes out
    queued, messages = _stored(db, cid)
    roles = [role for role, _ in messages]
    assert queued == [] and roles == ["user", "assistant"] * 3, messages
    assert [text for role, text in messages if role == "user"] == ["hello", "first queued", "second queued"]


def test_a_queued_message_whose_send_fails_stays_queued(app_env):
    """Out of the queue and into the conversation is one write: when the file fails on it, the message is still
    queued and never in the conversation half-way; the page says why, and does not try again in a loop (the next
    message typed, or a reload, does)."""
    from internlm_app.store import queued as queued_module
    from internlm_app.store.errors import StoreFault

    db = app_env / "conversations.db"
    cid = _chat_with_queue(db, "typed while a reply ran")

    def full_disk(*args, **kwargs):
        raise StoreFault("full", db, "database or disk is full")

    with pytest.MonkeyPatch.context() as mp:  # (app_env's own patches, the model's settings, stay)
        mp.setattr(queued_module, "append_message", full_disk)
        at = run_page(query={"c": cid})
    stored = _stored(db, cid)
    assert at.error and stored == (["typed while a reply ran"], [("user", "hello"), ("assistant", "hi there")])
    # The disk has room again: the next message typed goes behind it, and the queued one is sent first.
    at.chat_input(key="prompt").set_value("typed after").run()
    queued, messages = _stored(db, cid)
    assert queued == [] and [text for role, text in messages if role == "user"] == [
        "hello",
        "typed while a reply ran",
        "typed after",
    ]


def test_a_queued_message_can_be_edited_in_its_place_or_removed_and_an_edit_is_never_lost(app_env):
    """While a reply runs, each queued message has Edit (in place: it keeps its place in the queue, and waits while
    edited) and Remove (never sent). A queued message another tab sends while it is edited here does not take the
    edit with it: the edited text opens as an edit of the sent message, to send as a new version."""
    from internlm_app.web import i18n
    from internlm_app.web.resources import live_replies

    def t(key: str) -> str:
        return i18n.t(key, "zh")  # the page's default language

    db = app_env / "conversations.db"
    cid = _chat_with_queue(db, "first queued", "second queued", "third queued")
    store = ConversationStore(db)
    first, second, third = (q.id for q in store.queued_messages(cid))
    live = live_replies()
    ticket = live.claim(cid)  # a reply of the conversation runs (another tab's)
    assert ticket
    try:
        at = run_page(query={"c": cid})
        assert [m.markdown[0].value for m in at.chat_message[2:]] == ["first queued", "second queued", "third queued"]
        at.button(key=f"queued_edit_{first}").click().run()
        at.text_area(key="queued_edit_text").set_value("first, edited")
        at.button(key="queued_save").click().run()
        at.button(key=f"queued_remove_{second}").click().run()
        assert [(q.id, q.content) for q in store.queued_messages(cid)] == [
            (first, "first, edited"),
            (third, "third queued"),
        ]
        assert not at.exception and at.toast[0].value == t("queued_removed")
        at.button(key=f"queued_edit_{third}").click().run()  # an edit left open when the reply ends
        at.text_area(key="queued_edit_text").set_value("third, being edited")
    finally:
        live.release(cid, ticket)
    at.run()  # no reply runs: the first queued message goes out; the third waits while it is edited
    queued, messages = _stored(db, cid)
    assert [text for role, text in messages if role == "user"] == ["hello", "first, edited"] and len(messages) == 4
    assert queued == ["third queued"] and at.text_area(key="queued_edit_text").value == "third, being edited"
    # Another tab sends the third meanwhile (its edit here was not saved yet): Save finds it gone.
    store.send_queued_message(third)
    at.button(key="queued_save").click().run()
    assert at.warning[0].value == t("queued_sent_while_edited")
    assert at.text_area(key="edit_text").value == "third, being edited"  # the sent message's edit box, with it
    assert _stored(db, cid)[0] == [] and not at.exception
    # One removed in another tab while edited here: the edited text goes back in the chat box.
    at.button(key="edit_cancel").click().run()
    fourth = store.queue_message(cid, "fourth queued")
    ticket = live.claim(cid)
    try:
        at.run()
        at.button(key=f"queued_edit_{fourth}").click().run()
        at.text_area(key="queued_edit_text").set_value("fourth, being edited")
        store.remove_queued_message(fourth)
        at.button(key="queued_save").click().run()
    finally:
        live.release(cid, ticket)
    assert at.warning[0].value == t("queued_gone_while_edited")
    assert at.text_area(key="set_aside_text").value == "fourth, being edited" and not at.exception
    store.close()


def _only_conversation(db) -> tuple[str, list[tuple[str, str]]]:
    store = ConversationStore(db)
    try:
        (summary,) = store.list_conversations()
        return summary.id, [(m.role, m.content) for m in store.get_conversation(summary.id).messages]
    finally:
        store.close()


def test_an_edit_is_never_dropped_by_an_interaction_or_another_tabs_reply(app_env):
    """An edit's reply starts once nothing else runs: a run that ends before it started (any click) and a reply of
    the conversation another tab is starting at that moment only delay it. A message typed while it is pending
    goes behind it. Each edit gets exactly one reply."""
    import streamlit as st

    from internlm_app.web import chat as chat_module
    from internlm_app.web.resources import live_replies

    db = app_env / "conversations.db"
    at = send(run_page(), "helo")
    cid, _ = _only_conversation(db)
    # 1. Another tab is starting a reply of this conversation as the edit is sent: the edit waits, then gets its own.
    at.button(key="edit_last").click().run()
    at.text_area(key="edit_text").set_value("hello edited")
    live = live_replies()
    ticket = live.claim(cid)
    assert ticket
    try:
        at.button(key="edit_send").click().run()
        assert _only_conversation(db)[1][-1] == ("user", "hello edited")  # saved, its reply not started yet
    finally:
        live.release(cid, ticket)
    at.run()  # the page's next redraw (its watcher's, once the other tab's claim is gone)
    assert [role for role, _ in _only_conversation(db)[1]] == ["user", "assistant"]
    # 2. A click ends the run that was to start the edit's reply: the next run starts it.
    at.button(key="edit_last").click().run()
    at.text_area(key="edit_text").set_value("hello again")
    real_show_queued, interrupted = chat_module.show_queued, []

    def a_click_now(ctx, store, conv, waiting):  # in the run that has the edit pending: the user clicks something
        if not interrupted and st.session_state.get("_pending_reply") is not None:
            interrupted.append(1)
            st.rerun()
        real_show_queued(ctx, store, conv, waiting)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chat_module, "show_queued", a_click_now)
        at.button(key="edit_send").click().run()
    at.run()
    _, messages = _only_conversation(db)
    assert interrupted and messages[0][1] == "hello again" and [role for role, _ in messages] == ["user", "assistant"]
    # 3. A message submitted in the run that has an edit pending goes behind the edit's reply.
    store = ConversationStore(db)
    first = store.get_conversation(cid).messages[0].id
    store.add_version(first, "hello once more")  # what act() saves for an edit
    store.close()
    at.session_state["_pending_reply"] = chat_module.Pending(cid)
    at.chat_input(key="prompt").set_value("typed meanwhile").run()
    at.run()
    _, messages = _only_conversation(db)
    assert [role for role, _ in messages] == ["user", "assistant", "user", "assistant"], messages
    assert [text for role, text in messages if role == "user"] == ["hello once more", "typed meanwhile"]


def test_a_reply_that_ends_while_the_page_reads_it_is_shown_ended_not_interrupted(app_env):
    """A Stop (or the reply's end) saved between the page's read of the conversation and its look at the live
    replies: the page read the reply as "streaming" and then found it not live. It must read the conversation again
    and show it stopped, never "interrupted (server restarted?)" with nothing left to redraw it (CI caught this in the
    browser: the inline Stop of a regenerated reply)."""
    from internlm_app.web.resources import live_replies

    db = app_env / "conversations.db"
    run_page()  # the model and the process's live replies
    store = ConversationStore(db)
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    mid = store.add_message(cid, "assistant", "", status="streaming")
    stale = store.get_conversation(cid)  # what the page read, a moment before the reply's end was saved
    store.update_message(mid, "partial", "stopped")  # the reply's thread: its end saved, then out of the live ones
    store.close()
    live = live_replies()
    live.start(cid, mid)
    live.finish(cid, mid)
    reads = []

    def read_once_stale(self, conversation_id):
        reads.append(conversation_id)
        return stale if len(reads) == 1 else real_get(self, conversation_id)

    real_get = ConversationStore.get_conversation
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConversationStore, "get_conversation", read_once_stale)
        at = run_page(query={"c": cid})
    captions = [c.value for c in at.chat_message[1].caption]
    assert len(reads) >= 2 and t("interrupted", "zh") not in captions, captions
    assert any(t("stopped_mark", "zh") in c for c in captions), captions


def test_a_reply_whose_end_was_never_saved_shows_as_interrupted(app_env):
    """The other side: a reply left "streaming" with no reply of this process behind it (the server restarted, or
    its end could not be saved) is shown as interrupted, once, without a redraw loop."""
    from internlm_app.web.resources import live_replies

    db = app_env / "conversations.db"
    run_page()
    store = ConversationStore(db)
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    mid = store.add_message(cid, "assistant", "half a rep", status="streaming")
    store.close()
    live = live_replies()
    live.start(cid, mid)
    live.finish(cid, mid, saved=False)  # (a reply of the same id in another file did end: ids are per file)
    live.start("another-conversation", mid)
    live.finish("another-conversation", mid)
    at = run_page(query={"c": cid})
    assert [c.value for c in at.chat_message[1].caption] == [t("interrupted", "zh")]


def test_a_page_following_a_reply_of_another_run_shows_its_tool_calls_a_running_one_too(app_env):
    """A reload, another tab or the run after a click follows a reply it did not start: its tool calls show with
    its text, the one whose tool still runs as running (no text comes while a tool runs)."""
    from internlm_app.web.resources import live_replies

    db = app_env / "conversations.db"
    run_page()
    store = ConversationStore(db)
    cid = store.create_conversation("")
    store.add_message(cid, "user", "hello")
    mid = store.add_message(cid, "assistant", "", status="streaming")
    store.close()
    live = live_replies()
    live.start(cid, mid)
    steps = [{"id": "c1", "name": "slow", "arguments": "{}", "text": ""}]  # called; its tool has not returned
    live.set_steps(cid, mid, steps)
    try:
        at = run_page(query={"c": cid})
        labels = [e.label for e in at.expander]
        assert plain(t("tool_step_running", "zh", name="slow")) in labels, labels
        steps[0].update(result="done", error=None, seconds=0.5)
        assert live.steps_of(cid)[0]["result"] == "done" and live.steps_of("elsewhere") == []
    finally:
        live.stop(cid)
        live.finish(cid, mid)
    assert live.steps_of(cid) == []


def test_an_edit_under_way_is_kept_while_another_tabs_reply_runs(app_env, store):
    from internlm_app.web.resources import live_replies

    at = run_page()
    at.slider(key="temperature").set_value(0.0)
    cid = send(at, "helo").query_params["c"]
    at.button(key="edit_last").click().run()
    at.text_area(key="edit_text").set_value("My long carefully written edit")
    live = live_replies()
    mid = store.get_conversation(cid).messages[-1].id
    live.start(cid, mid)  # another tab's reply starts on this conversation
    try:
        at.run()  # any interaction here (a thumbs click, the language ...)
        assert at.text_area(key="edit_text").value == "My long carefully written edit"
        assert at.button(key="edit_send").disabled and t("edit_waits", "zh") in texts(at.caption)
    finally:
        live.finish(cid, mid)
    at.run()
    at.button(key="edit_send").click().run()  # the reply ended: the kept edit sends
    assert chat(at)[0] == ("user", "My long carefully written edit")


def test_a_regenerate_clicked_on_a_path_another_tab_changed_regenerates_nothing_unseen(app_env, store):
    at = run_page()
    at.slider(key="temperature").set_value(0.0)
    cid = send(at, "hello").query_params["c"]
    shown = chat(at)
    store.add_message(cid, "user", "from the other tab")  # the path the page drew is no longer the stored one
    store.add_message(cid, "assistant", "its reply")
    at.button(key="regenerate").click().run()  # the click of the reply this page showed
    assert t("changed_elsewhere", "zh") in texts(at.warning)
    replies = [m for m in store.get_conversation(cid).messages if m.role == "assistant"]
    assert [m.content for m in replies] == [shown[1][1], "its reply"]  # nothing regenerated


def test_a_message_sent_on_a_path_another_tab_changed_goes_back_in_the_box(app_env, store):
    at = run_page()
    at.slider(key="temperature").set_value(0.0)
    cid = send(at, "hello").query_params["c"]
    store.add_message(cid, "user", "from the other tab")  # after this page drew its path
    store.add_message(cid, "assistant", "its reply")
    at.chat_input(key="prompt").set_value("my next question").run()
    assert t("changed_before_send", "zh") in texts(at.warning)
    box = at.chat_input(key="prompt").proto
    assert box.set_value and box.value == "my next question"  # back in the box, not lost
    assert [m.content for m in store.get_conversation(cid).messages][-1] == "its reply"  # nothing sent
    at.chat_input(key="prompt").set_value("my next question").run()  # now the user has seen the path: it sends
    assert [m.content for m in store.get_conversation(cid).messages][-2] == "my next question"


def test_an_edit_being_typed_is_never_dropped(app_env):
    """Streamlit drops a text box's state at the end of any run that does not draw it: an edit reopened empty after a
    visit to another conversation or page, and vanished when another tab moved the path or deleted the
    conversation. Its text is kept; when its message is gone it goes into the chat box, with the reason."""
    from internlm_app.web import i18n

    def t(key: str) -> str:
        return i18n.t(key, "zh")

    db = app_env / "conversations.db"
    at = send(run_page(), "hello")
    cid, _ = _only_conversation(db)
    store = ConversationStore(db)
    other = store.create_conversation("")
    store.add_message(other, "user", "elsewhere")
    at.button(key="edit_last").click().run()
    at.text_area(key="edit_text").set_value("hello, carefully rewritten")
    at.run()
    # 1. Another conversation, another page, and back: the edit is still open, with its text.
    at.query_params["c"] = other
    at.run()
    assert not _boxes(at, "edit_text")
    at.query_params["c"] = cid
    at.run()
    assert at.text_area(key="edit_text").value == "hello, carefully rewritten"
    at.switch_page("internlm_app/web/views/history.py").run()
    at.switch_page("internlm_app/web/views/chat.py").run()
    at.query_params["c"] = cid
    at.run()
    assert at.text_area(key="edit_text").value == "hello, carefully rewritten"
    # 2. Another tab edits the message: a new version, so the one edited here leaves the path.
    first = store.get_conversation(cid).messages[0].id
    store.add_version(first, "hello from the other tab")
    at.run()
    assert at.warning[0].value == t("edit_message_left_path") and not _boxes(at, "edit_text")
    assert at.text_area(key="set_aside_text").value == "hello, carefully rewritten" and not at.exception
    at.query_params["c"] = other  # it belongs to its conversation: not shown (nor sent) in another
    at.run()
    assert not _boxes(at, "set_aside_text")
    at.query_params["c"] = cid
    at.run()
    at.button(key="set_aside_send").click().run()  # sent as a new message, on the path as it is now
    users = [m.content for m in store.get_conversation(cid).messages if m.role == "user"]
    assert users == ["hello from the other tab", "hello, carefully rewritten"] and not _boxes(at, "set_aside_text")
    # 3. Another tab deletes the conversation while an edit of it is open.
    at.button(key="edit_last").click().run()
    at.text_area(key="edit_text").set_value("one more rewrite")
    at.run()
    store.delete(cid)
    at.run()
    assert t("edit_conversation_deleted") in [w.value for w in at.warning]
    assert at.text_area(key="set_aside_text").value == "one more rewrite" and not at.exception
    at.button(key="set_aside_discard").click().run()
    assert not _boxes(at, "set_aside_text")
    store.close()


def test_a_removed_queued_message_is_not_taken_for_an_earlier_one_with_its_text(app_env):
    """ "hello" sent, then "hello" queued and edited here while another tab removed it: Save opened the edit on the
    first "hello" (matched by its text), which would branch the conversation from its first message."""
    from internlm_app.web import i18n
    from internlm_app.web.resources import live_replies

    db = app_env / "conversations.db"
    cid = _chat_with_queue(db, "hello")
    store = ConversationStore(db)
    (queued,) = store.queued_messages(cid)
    live = live_replies()
    ticket = live.claim(cid)
    try:
        at = run_page(query={"c": cid})
        at.button(key=f"queued_edit_{queued.id}").click().run()
        at.text_area(key="queued_edit_text").set_value("hello, rewritten")
        store.remove_queued_message(queued.id)  # another tab
        at.button(key="queued_save").click().run()
    finally:
        live.release(cid, ticket)
    assert at.warning[0].value == i18n.t("queued_gone_while_edited", "zh") and not _boxes(at, "queued_edit_text")
    assert at.text_area(key="set_aside_text").value == "hello, rewritten"
    store.close()


def _boxes(at, key: str) -> list:
    return [box for box in at.text_area if box.key == key]
