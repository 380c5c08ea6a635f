"""AppTest tests of the status and history pages against the real tiny model and a real store."""

from __future__ import annotations

import json

import pytest

from internlm_app.store import export
from internlm_app.store.db import ConversationStore
from tests.app_helpers import chat, run_page, send, set_app_env, texts

STATUS, HISTORY = "internlm_app/web/views/status.py", "internlm_app/web/views/history.py"


@pytest.fixture
def store(app_env):
    return ConversationStore(app_env / "conversations.db")


def _conversation(store: ConversationStore, title: str, *turns: str) -> str:
    cid = store.create_conversation("You are helpful.", {"temperature": 0.5}, title=title)
    for i, text in enumerate(turns):
        store.add_message(cid, "user" if i % 2 == 0 else "assistant", text)
    return cid


def _table(at) -> str:
    return "\n".join(str(t.value.to_dict()) for t in at.table)


def test_status_page_shows_the_model_memory_queue_and_doctor_report(app_env):
    at = run_page(STATUS)
    table = _table(at)
    for fact in ("internlm2-tiny", "float32", "cpu", "上下文窗口", "512", "加载耗时"):
        assert fact in table
    assert "CPU" in texts(at.info)  # GPU memory: none on this machine
    assert "引擎：空闲" in texts(at.caption)
    assert "看不到 CUDA GPU" not in texts(at.warning)  # INTERNLM_DEVICE=cpu asks for the CPU: not a problem
    assert "None" not in table  # one device: no device map, shown as a dash
    assert "transformers" in table and "streamlit" in table
    decoding = table  # how replies decode and why, both in the page's language
    assert "动态 KV 缓存" in decoding and "最多 8 个回复同时解码" in decoding
    assert "在 CPU 上，编译的静态缓存只会更慢" in decoding and "分页 KV 缓存" in decoding
    assert "on the CPU" not in decoding and "replies at once" not in decoding


def test_history_search_lists_matching_conversations(app_env, store):
    _conversation(store, "Sea", "tell me about the sea", "it is blue")
    _conversation(store, "Mountains", "and the mountains?", "they are high")
    at = run_page(HISTORY)
    assert len(at.selectbox(key="selected").options) == 2
    at.text_input(key="search").set_value("blue").run()
    (only,) = at.selectbox(key="selected").options
    assert only.startswith("Sea")
    (link,) = [p.proto for p in at.main.get("page_link")]  # "open": the chat page with ?c=<id>
    assert link.query_string == f"c={store.search('blue')[0].id}"


def test_history_export_then_import_reproduces_the_conversations(app_env, store):
    chat_page = send(run_page(), "你好，大海")
    cid = chat_page.query_params["c"]
    at = run_page(HISTORY)
    for key in ("export_one_json", "export_one_md", "export_all_json", "export_all_md"):
        assert at.get("download_button") and any(b.proto.id.endswith(key) for b in at.get("download_button"))
    data = export.export_json(store)  # what the export-all button serves
    assert "你好，大海" in export.export_markdown(store, [cid])
    at.file_uploader(key="import_file_0").set_value(("export.json", data.encode(), "application/json"))
    at.button(key="import_button").click().run()  # the same conversation is here already: skipped by default
    assert "已导入 0 个对话；1 个已存在，已跳过" in texts(at.success) and len(store.list_conversations()) == 1
    assert not at.file_uploader(key="import_file_1").value  # the uploader was emptied: no second import by mistake
    at.radio(key="import_keep_both").set_value(True).run()
    at.file_uploader(key="import_file_1").set_value(("export.json", data.encode(), "application/json"))
    at.button(key="import_button").click().run()
    assert "已导入 1 个对话" in texts(at.success)
    ids = sorted((s.id for s in store.list_conversations()), key=lambda i: i != cid)  # the original first
    original, copy = (store.get_conversation(i) for i in ids)
    assert copy.id != original.id
    fields = [[(m.role, m.content, m.status, m.stats) for m in c.messages] for c in (original, copy)]
    assert fields[0] == fields[1] and copy.system_prompt == original.system_prompt
    assert chat(run_page(query={"c": copy.id})) == chat(chat_page)


def test_a_malformed_import_shows_a_clear_error_and_changes_nothing(app_env, store):
    _conversation(store, "Kept", "hello", "hi")
    before = export.export_json(store)
    at = run_page(HISTORY)
    bad = json.dumps({"format": "internlm-chat-export", "version": 1, "conversations": [{"messages": [{"role": "x"}]}]})
    at.file_uploader(key="import_file_0").set_value(("bad.json", bad.encode(), "application/json"))
    at.button(key="import_button").click().run()
    assert "导入失败，未做任何更改：文件中有无效或超出限制的内容" in texts(at.error)  # translated, what to do
    assert "role" in at.expander[0].text[0].value  # the English details: which field
    at.button(key="import_button").click().run()  # the rejected file is gone: nothing is imported, and it says so
    assert "请先选择一个导出文件" in texts(at.warning)
    at.file_uploader(key="import_file_1").set_value(("x.json", b"not json", "application/json"))
    at.button(key="import_button").click().run()
    assert "这不是 JSON 文件" in texts(at.error) and "not a JSON file" in at.expander[0].text[0].value
    assert json.loads(export.export_json(store))["conversations"] == json.loads(before)["conversations"]


def test_clearing_a_search_that_found_nothing_brings_the_picker_back(app_env, store):
    _conversation(store, "Kept", "hello", "hi")
    at = run_page(HISTORY)
    at.text_input(key="search").set_value("no such words").run()
    assert at.selectbox(key="selected").value is None
    at.text_input(key="search").set_value("").run()
    assert at.selectbox(key="selected").value is not None and at.toggle(key="delete_one")


def test_history_delete_needs_confirmation(app_env, store):
    kept = _conversation(store, "Kept", "hello", "hi")
    doomed = _conversation(store, "Doomed", "hello", "hi")  # the newest: selected first
    at = run_page(HISTORY)
    at.toggle(key="delete_one").set_value(True).run()
    assert store.get_conversation(doomed) is not None and at.warning
    at.button(key="delete_one_confirm").click().run()
    assert store.get_conversation(doomed) is None and "对话已删除" in texts(at.success)
    assert store.get_conversation(kept) is not None
    assert at.toggle(key="delete_one").value is False  # the next conversation needs its own confirmation


def test_an_armed_delete_never_moves_to_another_conversation(app_env, store):
    """Delete switched on for one conversation, then a search (or the feedback filter) changes which one is selected:
    the switch goes off, so "Yes, delete" never aims at a conversation nobody confirmed (reviewer)."""
    other = _conversation(store, "Other", "oddC words", "hi")
    armed = _conversation(store, "Armed", "hello", "hi")  # the newest: selected first
    at = run_page(HISTORY)
    at.toggle(key="delete_one").set_value(True).run()
    at.text_input(key="search").set_value("oddC").run()
    assert at.selectbox(key="selected").value == other
    assert at.toggle(key="delete_one").value is False and not [b for b in at.button if b.key == "delete_one_confirm"]
    assert store.get_conversation(armed) is not None and store.get_conversation(other) is not None


def test_export_all_of_a_store_too_large_for_one_file_is_a_zip_that_imports(app_env, store, monkeypatch):
    """Past what one import takes, "Export all" serves a ZIP of parts, and the import takes that ZIP back whole."""
    from internlm_app.store import export_format

    for i in range(4):
        _conversation(store, f"Chat {i}", f"question {i}", f"answer {i}")
    at = run_page(HISTORY)
    assert any(b.proto.id.endswith("export_all_json") for b in at.get("download_button"))
    monkeypatch.setattr(export_format, "MAX_TOTAL_MESSAGES", 3)
    at.run()
    buttons = {b.proto.id.rsplit("-", 1)[-1]: b.proto for b in at.get("download_button")}
    assert "export_all_zip" in buttons and "export_all_json" not in buttons
    assert "ZIP" in buttons["export_all_zip"].label
    archive = export.export_archive(store)
    fresh = ConversationStore(app_env / "fresh.db")
    assert len(export.import_json(fresh, archive)) == 4
    at.file_uploader(key="import_file_0").set_value(("backup.zip", archive, "application/zip"))
    at.radio(key="import_keep_both").set_value(True).run()
    at.button(key="import_button").click().run()
    assert "已导入 4 个对话" in texts(at.success) and len(store.list_conversations(limit=None)) == 8


def test_exporting_a_conversation_deleted_in_another_tab_gives_a_file_that_says_so(store):
    from internlm_app.web import history

    cid = _conversation(store, "Gone", "hello", "hi")
    markdown, document = (history.exporter(store, kind, [cid], gone="(deleted)") for kind in ("md", "json"))
    store.delete(cid)
    assert markdown() == "(deleted)" and json.loads(document())["conversations"] == []


def test_pages_are_behind_the_password_gate(app_env, monkeypatch, app_cache):
    set_app_env(monkeypatch, app_env, app_cache, INTERNLM_WEB_PASSWORD="pw")
    for page in (STATUS, HISTORY):
        at = run_page(page)
        assert at.text_input(key="password") and not at.table and not at.get("selectbox") and not at.sidebar.children


def _shown_text(at) -> str:
    """Every label and text the page shows (widgets, Markdown, captions, alerts, headings, table headers)."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "subheader", "title", "header"):
        parts += [str(element.value) for element in getattr(at, kind)]
    for kind in (
        "button",
        "slider",
        "radio",
        "text_input",
        "text_area",
        "selectbox",
        "expander",
        "toggle",
        "number_input",
    ):
        parts += [str(getattr(element, "label", "") or "") for element in getattr(at, kind)]
    for table in at.table:
        parts += [str(column) for column in table.value.columns]
        parts += [str(cell) for cell in table.value.iloc[:, 0]]
    return "\n".join(parts)


@pytest.mark.parametrize("page", ["app.py", "internlm_app/web/views/status.py", "internlm_app/web/views/history.py"])
def test_each_page_shows_one_language(app_env, page):
    """In 中文 no English label of this app shows, and in English no Chinese one (the language switch's own label,
    '语言 / Language', and each language's name are meant for both)."""
    from internlm_app.web.i18n import LABELS

    both = {"language_name"}
    for lang, other in (("zh", 1), ("en", 0)):
        at = run_page(page, query={"lang": lang})
        shown = _shown_text(at).replace("语言 / Language", "")
        foreign = [
            texts[other]
            for key, texts in LABELS.items()
            if key not in both
            and texts[0] != texts[1]
            and "{" not in texts[other]
            and len(texts[other]) > 3
            and texts[other] in shown.split("\n")
        ]
        assert not foreign, (lang, foreign)
