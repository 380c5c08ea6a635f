"""Documents in the chat: extraction (text, code, PDF), errors with reasons, token budget fitting, prompt format."""

from __future__ import annotations

import pytest

from internlm_app.chat.attachments import (
    JOIN_TOKENS,
    MAX_FILE_BYTES,
    AttachmentError,
    estimate_tokens,
    fit_attachment,
    fit_attachments,
    format_block,
    read_attachment,
    room_for_attachments,
    search_terms,
    token_counter,
    with_attachments,
)
from internlm_app.sampling import SamplingParams
from tests.pdf_helpers import make_pdf

TOPICS = ["apples and pears", "railway timetables", "volcano eruptions", "chess openings", "tax forms", "bird songs"]


def _report() -> bytes:
    """Six pages, each about one topic, each long enough that the whole file needs a real budget."""
    pages = []
    for number, topic in enumerate(TOPICS, 1):
        lines = [f"Page {number} is about {topic}."] + [f"Line {i} says more about {topic}." for i in range(25)]
        pages.append("\n".join(lines))
    return make_pdf(pages)


def test_pdf_text_per_page():
    attachment = read_attachment("report.pdf", _report())
    assert attachment.kind == "pdf" and len(attachment.pages) == 6
    assert attachment.pages[2].startswith("Page 3 is about volcano eruptions.")
    assert "Line 24 says more about volcano eruptions." in attachment.pages[2]


def test_text_markdown_and_code_files():
    assert read_attachment("notes.md", "# 标题\r\n\r\n正文".encode()).pages == ["# 标题\n\n正文"]
    assert read_attachment("main.py", b"\xef\xbb\xbfprint('hi')\n").text == "print('hi')\n"  # BOM dropped
    assert read_attachment("旧.txt", "你好，世界".encode("gb18030")).text == "你好，世界"
    assert read_attachment("u16.txt", "hi".encode("utf-16")).text == "hi"
    assert read_attachment("../../etc/Makefile", b"all:\n").name == "Makefile"  # a name, never a path


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("photo.png", b"\x89PNG\r\n", "unsupported_type"),
        ("data.txt", b"abc\x00\x01\x02", "not_text"),
        ("data.txt", b"\xff\xfe\x00\xd8", "not_text"),
        ("big.txt", b"a" * (MAX_FILE_BYTES + 1), "too_large"),
        ("empty.md", b"  \n", "empty"),
        ("broken.pdf", b"%PDF-1.7\nnot really", "pdf_unreadable"),
    ],
)
def test_errors_have_a_reason_and_a_message(name, data, reason):
    with pytest.raises(AttachmentError) as caught:
        read_attachment(name, data)
    assert caught.value.reason == reason and name in str(caught.value)


def test_files_in_other_encodings_are_read_as_written_not_as_wrong_chinese():
    """Not UTF-8: GB2312 as it stands; else the most coherent encoding. GB18030 decodes almost any bytes, so a
    Latin-1 file used to come in as "Viele Gr\ue3eae aus M黱chen" (reviewer)."""
    german = "Viele Grüße aus München, schöne Grüße und bis bald in Köln."
    assert read_attachment("brief.txt", german.encode("latin-1")).text == german
    french = "Le café de la gare est fermé le dimanche; la façade a été repeinte cet été."
    assert read_attachment("note.txt", french.encode("cp1252")).text == french
    gbk = "朱镕基在会议上讲话，强调经济改革要稳步推进。报告指出收入增长百分之十五。"  # 镕: a GBK character, not GB2312
    assert read_attachment("新闻.txt", gbk.encode("gbk")).text == gbk
    assert read_attachment("短.txt", "你好".encode("gb2312")).text == "你好"
    # Short GBK text beyond GB2312, which a detector free to pick any encoding read as Korean or Big5 (reviewer)
    shorts = ("朱镕基", "王喆说：你好", "中文文档：陈喆的报告，日期2024年", "name,city\nZhu Rongji 朱镕基,Beijing\n")
    for short in shorts:
        assert read_attachment("短.txt", short.encode("gbk")).text == short
    assert read_attachment("价.txt", "价格：100元€".encode("gb18030")).text == "价格：100元€"
    big5 = "臺灣的天氣很好，今天我們去臺北市參觀博物館，晚上吃了牛肉麵。"  # Traditional Chinese, a longer file
    assert read_attachment("繁體.txt", big5.encode("big5")).text == big5


def test_a_damaged_pdf_of_any_kind_is_unreadable_not_a_crash():
    """pypdf meets a malformed object with whatever plain error follows (here AttributeError: a number where the
    trailer's dictionary should be, a byte changed in an xref offset): the file is damaged, never a page crash."""
    good = make_pdf(["hello world"])
    for damaged in (
        good.replace(b"trailer\n<<", b"trailer\n0<<"),
        good.replace(b"trailer\n<<", b"trailer\n0<<").replace(b"0000000015 00000 n", b"000V000015 00000 n"),
    ):
        with pytest.raises(AttachmentError) as caught:
            read_attachment("damaged.pdf", damaged)
        assert caught.value.reason == "pdf_unreadable"


def test_encrypted_truncated_and_blank_pdfs():
    with pytest.raises(AttachmentError) as caught:
        read_attachment("secret.pdf", make_pdf(["top secret"], password="pw"))
    assert caught.value.reason == "pdf_encrypted"
    with pytest.raises(AttachmentError) as caught:
        read_attachment("cut.pdf", _report()[:300])
    assert caught.value.reason == "pdf_unreadable"
    with pytest.raises(AttachmentError, match="scanned PDF") as caught:
        read_attachment("scan.pdf", make_pdf([""]))
    assert caught.value.reason == "pdf_no_text"  # (an empty text file says only that it holds no text)


def test_too_many_pages(monkeypatch):
    monkeypatch.setattr("internlm_app.chat.attachments.MAX_PDF_PAGES", 5)
    with pytest.raises(AttachmentError) as caught:
        read_attachment("report.pdf", _report())
    assert caught.value.reason == "too_many_pages" and "6 pages" in str(caught.value)


def test_block_format_names_the_file_and_no_backticks_close_it():
    block = format_block("a.md", "text\n````\nmore", "pages 1-2 of 3")
    assert block.splitlines()[0] == "File: a.md (pages 1-2 of 3)"
    assert block.splitlines()[1] == "`````" and block.splitlines()[-1] == "`````"
    assert with_attachments("What is it?", []) == "What is it?"


def test_whole_file_when_it_fits(engine):
    count = token_counter(engine)
    attachment = read_attachment("report.pdf", _report())
    fitted = fit_attachment(attachment, count, 100_000)
    assert fitted.complete and fitted.how == "whole" and fitted.parts == [f"page {i}" for i in range(1, 7)]
    assert fitted.block.startswith("File: report.pdf (6 pages)\n```\n--- page 1 ---\nPage 1 is about apples")
    assert fitted.tokens == len(engine.tokenizer.encode_plain(fitted.block))


def test_leading_pages_that_fit_the_budget(engine):
    count = token_counter(engine)
    attachment = read_attachment("report.pdf", _report())
    whole = fit_attachment(attachment, count, 100_000).tokens
    budget = whole // 2
    fitted = fit_attachment(attachment, count, budget)
    assert not fitted.complete and fitted.how == "leading" and fitted.tokens <= budget
    assert fitted.parts == [f"page {i}" for i in range(1, len(fitted.parts) + 1)] and 1 <= len(fitted.parts) < 6
    assert fitted.block.startswith(f"File: report.pdf ({', '.join(fitted.parts)} of 6 pages)")
    assert "volcano" not in fitted.block or "page 3" in fitted.parts
    start = fit_attachment(attachment, count, 150)  # not one part fits: the start of page 1
    assert len(start.parts) == 1 and start.parts[0].startswith("page 1") and start.parts[0].endswith(", its start")
    assert start.tokens <= 150 and "Page 1 is about" in start.block
    nothing = fit_attachment(attachment, count, 10)
    assert nothing.how == "none" and nothing.block == "" and nothing.tokens == 0


def test_best_matching_pages_for_the_question(engine):
    count = token_counter(engine)
    attachment = read_attachment("report.pdf", _report())
    one_page = fit_attachment(attachment, count, 100_000).tokens // 6 + 120
    fitted = fit_attachment(attachment, count, one_page, "When do volcano eruptions happen?", "best_matching")
    assert fitted.how == "best_matching" and fitted.tokens <= one_page
    assert fitted.parts and all(label.startswith("page 3") for label in fitted.parts)
    assert "volcano eruptions" in fitted.block and "apples" not in fitted.block
    # No word of the question in the file: the leading pages instead.
    fallback = fit_attachment(attachment, count, one_page, "quantum chromodynamics", "best_matching")
    assert fallback.how == "leading" and fallback.parts[0].startswith("page 1")


def test_text_files_are_cut_by_lines_and_chinese_questions_match():
    text = "\n".join(f"第{i}行：关于苹果的说明。" for i in range(300)) + "\n火山爆发发生在夏天。\n" + "结尾。\n" * 200
    attachment = read_attachment("notes.txt", text.encode())
    fitted = fit_attachment(attachment, estimate_tokens, 600, "火山什么时候爆发？", "best_matching")
    assert fitted.how == "best_matching" and "火山爆发发生在夏天。" in fitted.block and fitted.tokens <= 600
    assert all(label.startswith("lines ") for label in fitted.parts)
    assert "火山" in search_terms("火山什么时候") and "volcano" in search_terms("Volcano!")


def test_several_files_share_the_budget(engine):
    count = token_counter(engine)
    small = read_attachment("small.txt", b"tiny file")
    report = read_attachment("report.pdf", _report())
    both = fit_attachments([small, report], count, 600)
    assert both[0].complete and not both[1].complete and both[1].parts
    assert sum(f.tokens for f in both) <= 600
    content = with_attachments("Summarize.", both)
    assert content.startswith("File: small.txt\n```\ntiny file\n```\n\nFile: report.pdf (") and content.endswith(
        "\n\nSummarize."
    )


def test_room_left_in_the_context_window_and_the_prompt_fits(engine):
    params = SamplingParams.greedy_params(32)
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "What is on page 3?"}]
    room = room_for_attachments(engine, messages, params.max_new_tokens)
    prompt_now = len(engine.prepare(messages, params.max_new_tokens).ids)
    assert room == engine.context_window - prompt_now - params.max_new_tokens
    fitted = fit_attachments([read_attachment("report.pdf", _report())], token_counter(engine), room)
    messages[-1]["content"] = with_attachments(messages[-1]["content"], fitted)
    prepared = engine.prepare(messages, params.max_new_tokens)
    assert prepared.dropped_messages == 0 and prepared.max_new_tokens == params.max_new_tokens
    assert len(prepared.ids) + params.max_new_tokens <= engine.context_window


def test_remote_estimate_errs_high(tmp_path):
    from internlm_app.backends.remote import RemoteBackend
    from internlm_app.settings import Settings

    assert estimate_tokens("你好世界") == 4 and estimate_tokens("abcdefg") == 3
    remote = RemoteBackend(Settings(backend="openai", max_length=1000, db_path=tmp_path / "c.db"))  # no request yet
    assert token_counter(remote)("你好世界abcdefg") == 7  # no tokenizer here: the estimate
    assert room_for_attachments(remote, [{"role": "user", "content": "abc"}], 100) == 1000 - 100 - (1 + 5) - 5


def test_what_is_kept_of_a_file_is_never_more_than_an_export_carries(monkeypatch):
    """Tokens are not the only bound: a text of many characters per token could fit the context and still be longer
    than an export's attachment (MAX_ATTACHMENT_CHARS), which an import would refuse. The block is cut to both."""
    from internlm_app.store import export_format

    monkeypatch.setattr(export_format, "MAX_ATTACHMENT_CHARS", 3000)
    text = "\n".join(f"line {i} " + "x" * 60 for i in range(200))  # ~13,000 characters
    attachment = read_attachment("long.txt", text.encode())
    few_tokens = lambda block: len(block) // 100  # noqa: E731 - a tokenizer of 100 characters a token
    fitted = fit_attachment(attachment, few_tokens, budget=10_000)
    assert not fitted.complete and 0 < len(fitted.block) <= 3000 and fitted.block.startswith("File: long.txt")
    short = read_attachment("short.txt", b"fits whole")
    assert fit_attachment(short, few_tokens, budget=10_000).complete


def test_many_small_files_in_a_small_budget_send_what_fits_not_nothing(engine):
    """20 files of ~25 tokens in ~300: each equal share was below a file's header, so every file said "nothing of it
    fits". The first files go (whole), the last make room for them; every file in the split sends something."""
    count = token_counter(engine)
    files = [
        read_attachment(f"note{i:02d}.txt", f"note {i}: the word of the day is river{i}".encode()) for i in range(20)
    ]
    one = fit_attachments(files[:1], count, 10_000)[0].tokens
    budget = 318
    fitted = fit_attachments(files, count, budget)
    sent = [f for f in fitted if f.block]
    assert len(sent) >= (budget // (one + JOIN_TOKENS)) - 1 and all(f.complete for f in sent)
    assert [f.name for f in sent] == [f.name for f in fitted[: len(sent)]]  # the first ones, in order
    assert sum(f.tokens for f in fitted) + JOIN_TOKENS * len(sent) <= budget
