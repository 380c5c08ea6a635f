"""AppTest tests of documents, tools and prompt presets in the chat page, on the real tiny model."""

from __future__ import annotations

import json

import pytest

from internlm_app.chat.context import model_messages
from internlm_app.sampling import SamplingParams
from internlm_app.store import export, export_format
from internlm_app.store.db import ConversationStore
from internlm_app.store.presets import PRESET_NAME_LIMIT
from internlm_app.web.i18n import t
from internlm_app.web.safe_markdown import plain
from tests.app_helpers import MAX_NEW_TOKENS, chat, run_page, set_app_env, texts
from tests.pdf_helpers import make_pdf

NOTES = "The launch code word is PELICAN.\nThe meeting moved to Thursday.\n"
PICK_COLOR = '''
def pick_color(color: str) -> str:
    """Pick a color for the user.

    Args:
        color: The color to pick. (choices: ["red", "blue"])
    """
    return f"picked {color}"
'''


@pytest.fixture
def store(app_env):
    return ConversationStore(app_env / "conversations.db")


def attach(at, text: str, *files: tuple[str, bytes, str]):
    box = at.chat_input(key="prompt")
    for name, data, mime in files:
        box.upload(name, data, mime)
    box.set_value(text).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_file_shows_its_cost_before_sending_and_the_model_reads_it(app_env, store, engine):
    at = run_page()
    at.slider(key="temperature").set_value(0.0)
    attach(at, "What is the code word?", ("notes.txt", NOTES.encode(), "text/plain"))
    assert chat(at) == [] and store.list_conversations() == []  # nothing sent yet
    panel = texts(at.markdown) + texts(at.success)
    assert "notes.txt" in panel and "tokens" in panel and "放得下" in panel
    assert at.text_area(key="attach_text").value == "What is the code word?"

    at.button(key="attach_send").click().run()
    assert not at.exception
    (summary,) = store.list_conversations()
    conv = store.get_conversation(summary.id)
    user = conv.messages[0]
    assert user.content == "What is the code word?" and [a.name for a in user.attachments] == ["notes.txt"]
    assert user.attachments[0].text.startswith("File: notes.txt\n```\nThe launch code word is PELICAN.")
    assert user.attachments[0].tokens > 0
    # What the model read: the file's block, then the message (and so again on a reload or regenerate).
    messages = model_messages(store, conv.id)[:2]
    assert messages[1]["content"] == user.attachments[0].text + "\n\nWhat is the code word?"
    expected, _ = engine.reply(messages, SamplingParams.greedy_params(MAX_NEW_TOKENS))
    assert chat(at)[1] == ("assistant", expected)
    label = t("attachment_label", "zh", name=plain("notes.txt"), note="全文", n=user.attachments[0].tokens)
    assert at.chat_message[0].expander[0].label == label  # shown under the message, with its tokens

    at.button(key="regenerate").click().run()  # the regenerated reply reads the file too
    assert chat(at)[1] == ("assistant", expected)
    again = run_page(query={"c": conv.id})  # a reload shows the attachment
    assert again.chat_message[0].expander[0].label == label


def test_cancel_saves_nothing_and_gives_the_text_back(app_env, store):
    at = attach(run_page(), "Summarize this", ("a.md", b"# Title\n\nSome text.", "text/markdown"))
    at.text_area(key="attach_text").set_value("Summarize this, briefly")
    at.button(key="attach_cancel").click().run()
    assert store.list_conversations() == [] and chat(at) == []
    assert at.chat_input(key="prompt").proto.value == "Summarize this, briefly"  # back in the box, to edit
    assert "attach_text" not in [box.key for box in at.text_area]  # the panel is gone


def test_an_oversized_pdf_offers_what_fits(app_env, store):
    pages = [
        f"Page {i} is about {'rivers' if i == 7 else 'mountains'}. " + "Filler words here. " * 30 for i in range(1, 13)
    ]
    at = attach(run_page(), "Which one mentions rivers?", ("big.pdf", make_pdf(pages), "application/pdf"))
    assert "超出预算" in texts(at.warning)
    at.radio(key="attach_strategy").set_value("best_matching").run()
    assert "第 7 页" in texts(at.caption)  # the part sent, in the page's language
    at.button(key="attach_send").click().run()
    (summary,) = store.list_conversations()
    (sent,) = store.get_conversation(summary.id).messages[0].attachments
    assert sent.text.startswith("File: big.pdf (page 7") and "Page 7 is about rivers" in sent.text
    assert (
        "（共 12 页）" in at.chat_message[0].expander[0].label and "pages" not in at.chat_message[0].expander[0].label
    )


def test_unreadable_files_are_named_in_the_page_language(app_env, store):
    at = attach(run_page(), "look", ("data.txt", b"\x00\x01\x02\xff\xfe\x00", "text/plain"))
    assert t("attach_error_not_text", "zh", name=plain("data.txt")) in texts(at.error)
    assert "data.txt" not in texts(at.markdown)


def test_a_file_that_fails_to_read_keeps_the_message_and_the_other_files(app_env, store):
    """Any failure reading a file (a damaged PDF's odd error, a fault of ours) refuses that file only, in the page's
    language: the typed message and the other files stay in the panel, to send or cancel (a reviewer's damaged PDF
    once crashed the page and lost the message)."""
    from internlm_app.chat import attachments
    from internlm_app.web import attachments_view

    real_read = attachments.read_attachment

    def read(name, data):
        if name == "odd.md":
            raise RuntimeError("a bug while reading")
        return real_read(name, data)

    damaged = make_pdf(["hello"]).replace(b"trailer\n<<", b"trailer\n0<<")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attachments_view, "read_attachment", read)
        at = attach(
            run_page(),
            "my typed question",
            ("damaged.pdf", damaged, "application/pdf"),
            ("odd.md", b"# fine text", "text/markdown"),
            ("good.md", b"# Title\n\nSome text.", "text/markdown"),
        )
    errors = texts(at.error)
    assert t("attach_error_pdf_unreadable", "zh", name=plain("damaged.pdf")) in errors
    assert t("attach_error_unreadable", "zh", name=plain("odd.md")) in errors
    assert at.text_area(key="attach_text").value == "my typed question"
    at.button(key="attach_send").click().run()
    (summary,) = store.list_conversations()
    first = store.get_conversation(summary.id).messages[0]
    assert first.content == "my typed question" and [a.name for a in first.attachments] == ["good.md"]


def test_a_forced_tool_call_runs_shows_and_is_in_the_next_context(monkeypatch, tmp_path, app_cache, store):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "colors.py").write_text(PICK_COLOR)
    set_app_env(monkeypatch, tmp_path, app_cache, INTERNLM_TOOLS_DIR=str(tools))
    at = run_page()
    at.toggle(key="tools_on").set_value(True).run()
    assert at.selectbox(key="tool_choice").options == [
        t("tool_choice_auto", "zh"),
        *["current_time", "calculate", "convert_units", "pick_color"],
    ]
    at.selectbox(key="tool_choice").set_value("pick_color")  # offered alone; the first step must call it
    at.slider(key="max_new_tokens").set_value(100)  # room for the call and a reply after it
    at.chat_input(key="prompt").set_value("Pick a color").run()
    assert not at.exception, [e.value for e in at.exception]
    (summary,) = store.list_conversations()
    conv = store.get_conversation(summary.id)
    reply = conv.messages[1]
    (step,) = reply.stats["tool_steps"]
    color = json.loads(step["arguments"])["color"]
    assert step["name"] == "pick_color" and step["result"] == f"picked {color}" and reply.status == "complete"
    expander = at.chat_message[1].expander[0]
    assert expander.label == plain(t("tool_step", "zh", name="pick_color"))
    assert f"picked {color}" in texts(expander.code)
    context = model_messages(store, conv.id)
    assert context[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": step["id"], "name": "pick_color", "arguments": step["arguments"]}],
    }
    assert context[3] == {"role": "environment", "name": "plugin", "content": f"picked {color}"}
    assert context[4] == {"role": "assistant", "content": reply.content}


def test_presets_fill_the_system_prompt_save_and_delete(app_env, store):
    at = run_page()
    picker = at.selectbox(key="preset_pick")
    names = picker.options
    assert "翻译" in names and "Translator" not in names  # this language's presets (and those for both)
    translator = next(p for p in store.list_presets("zh") if p.name == "翻译")
    picker.set_value(translator.id).run()
    assert at.text_area(key="system_prompt").value == translator.system_prompt

    at.text_area(key="system_prompt").set_value("Answer in rhymes.")
    at.text_input(key="preset_name").set_value("Poet")
    at.button(key="preset_save").click().run()
    saved = next(p for p in store.list_presets() if p.name == "Poet")
    assert saved.system_prompt == "Answer in rhymes." and at.selectbox(key="preset_pick").value == saved.id

    at.button(key="preset_delete").click().run()
    at.button(key="preset_delete_confirm").click().run()
    assert "Poet" not in [p.name for p in store.list_presets()]
    assert at.selectbox(key="preset_pick").value is None
    assert at.text_area(key="system_prompt").value == "Answer in rhymes."  # the prompt itself stays


def test_a_preset_saved_under_a_shown_name_replaces_it_and_the_picker_shows_names_as_written(app_env, store):
    at = run_page()
    assert at.selectbox(key="preset_pick").proto.placeholder == "（不用预设）"  # not Streamlit's English one
    assert at.text_input(key="preset_name").proto.max_chars == PRESET_NAME_LIMIT
    at.text_area(key="system_prompt").set_value("只把中文译成法语。")
    at.text_input(key="preset_name").set_value("翻译")  # the default preset's name
    at.button(key="preset_save").click().run()
    assert at.selectbox(key="preset_pick").options.count("翻译") == 1
    # Typing on (a new prompt, then a new name) keeps what was typed: no other preset gets picked behind it.
    at.text_area(key="system_prompt").set_value("只把中文译成德语。").run()
    at.text_input(key="preset_name").set_value("德语翻译").run()
    assert at.text_area(key="system_prompt").value == "只把中文译成德语。"
    assert at.text_input(key="preset_name").value == "德语翻译"
    at.text_input(key="preset_name").set_value("C++ reviewer (v1.0)")
    at.button(key="preset_save").click().run()
    assert "C++ reviewer (v1.0)" in at.selectbox(key="preset_pick").options  # plain text, no Markdown escapes
    # A page saves for its own language: the English "Translator" is not this list's, so it stays as it was.
    english = next(p for p in store.list_presets("en") if p.name == "Translator")
    at.text_input(key="preset_name").set_value("Translator")
    at.button(key="preset_save").click().run()
    assert next(p for p in store.list_presets("en") if p.name == "Translator") == english
    mine = next(p for p in store.list_presets("zh") if p.name == "Translator")
    assert mine.language == "zh" and at.selectbox(key="preset_pick").value == mine.id  # saved, and picked


def test_what_the_chat_keeps_an_export_can_carry_back(app_env, store, engine):
    # Every input is bounded by what an export imports again: 20 files a message, the message and system prompt
    # lengths; a conversation made in the page always survives export -> import.
    at = run_page()
    assert at.chat_input(key="prompt").proto.max_chars == export_format.MAX_CONTENT_CHARS
    assert at.text_area(key="system_prompt").proto.max_chars == export_format.MAX_PROMPT_CHARS
    at.text_area(key="system_prompt").set_value("")  # room for 20 small files in the tiny model's 512 tokens
    at.slider(key="max_new_tokens").set_value(8)
    files = [(f"n{i}.txt", b"x", "text/plain") for i in range(export_format.MAX_ATTACHMENTS + 1)]
    attach(at, "hi", *files)
    assert plain("n20.txt") + "：一条消息最多附加 20 个文件" in texts(at.error)
    at.button(key="attach_send").click().run()
    (summary,) = store.list_conversations()
    assert len(store.get_conversation(summary.id).messages[0].attachments) == export_format.MAX_ATTACHMENTS
    (copy,) = export.import_json(store, export.export_json(store, [summary.id]))
    assert len(store.get_conversation(copy).messages[0].attachments) == export_format.MAX_ATTACHMENTS


def test_a_tool_call_shows_as_running_while_its_tool_runs_and_a_cut_off_call_is_a_translated_error(
    monkeypatch, tmp_path, app_cache, store
):
    from streamlit.testing.v1 import AppTest

    def running_steps():
        from internlm_app.web.i18n import t
        from internlm_app.web.tools_view import show_steps

        steps = [{"name": "calculate", "arguments": "{}", "result": "14", "seconds": 0.1}, {"name": "slow"}]
        show_steps(steps, lambda key, **v: t(key, "zh", **v), running=True)

    live = AppTest.from_function(running_steps).run()
    labels = [e.label for e in live.expander]
    assert labels == [plain(t("tool_step", "zh", name="calculate")), plain(t("tool_step_running", "zh", name="slow"))]
    assert t("tool_running", "zh") in texts(live.caption)

    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "colors.py").write_text(PICK_COLOR)
    set_app_env(monkeypatch, tmp_path, app_cache, INTERNLM_TOOLS_DIR=str(tools))
    at = run_page()
    at.toggle(key="tools_on").set_value(True).run()
    at.selectbox(key="tool_choice").set_value("pick_color")
    at.slider(key="max_new_tokens").set_value(3)  # too few for the call
    at.chat_input(key="prompt").set_value("Pick a color").run()
    (summary,) = store.list_conversations()
    reply = store.get_conversation(summary.id).messages[1]
    assert reply.status == "error" and reply.content == "" and reply.stats["error_code"] == "tool_call_cut_off"
    assert reply.stats["completion_tokens"] == 3  # the step's tokens still count
    assert t("error_tool_call_cut_off", "zh") in texts(at.error) and "详情" in texts(at.error)


def test_any_file_goes_to_the_panel_where_one_that_cannot_be_read_says_why_in_the_page_language(app_env, store):
    """The chat box accepted only some suffixes: a picture, or a Makefile, was refused by Streamlit's uploader with
    an English message on its chip (also in Chinese) and then dropped without a word in the panel."""
    at = attach(
        run_page(),
        "look",
        ("pic.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png"),
        ("Makefile", b"all:\n\techo hi\n", "application/octet-stream"),
    )
    refused = texts(at.error)
    assert t("attach_error_unsupported_type", "zh", name=plain("pic.png")) in refused
    assert "Makefile" in texts(at.markdown) and "Makefile" not in refused  # read as the text it is
