"""Feedback never ends a reply: thumbs given on an earlier reply while another one streams (a slow model, 10 tokens
a second) are saved, and the streaming reply runs to its end. Code blocks and the whole reply have Streamlit's own
copy button; the version switcher works in a browser."""

from __future__ import annotations

import sqlite3

import pytest

from internlm_app.settings import DEFAULT_SYSTEM_PROMPT
from internlm_app.store.db import ConversationStore
from tests.api_helpers import wait_until
from tests.browser_helpers import CHROMIUM, button, chromium, send, streamlit_server, tiny_model_env, wait_for_text
from tests.browser_helpers import SLOW_REPLY_ENV as SERVER_ENV
from tests.browser_helpers import SLOW_REPLY_TOKENS as MAX_TOKENS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]

ANSWER = "Like this:\n\n```python\nprint('hi')\n```"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    env = tiny_model_env(tmp, **SERVER_ENV)
    store = ConversationStore(env["INTERNLM_DB_PATH"])
    cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT, {"temperature": 0.0})
    store.add_message(cid, "user", "show me code")
    reply = store.add_message(cid, "assistant", ANSWER)
    store.close()
    with streamlit_server(env, tmp / "server.log") as url:
        yield url, tmp / "conversations.db", cid, reply


def _row(db, mid: int) -> tuple[str, str, int | None]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT content, status, feedback FROM messages WHERE id = ?", (mid,)).fetchone()


def _last_reply(db) -> tuple[int, str, str]:
    with sqlite3.connect(db) as connection:
        sql = "SELECT id, status, stats FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1"
        return connection.execute(sql).fetchone()


def test_feedback_on_an_earlier_reply_while_another_streams_leaves_it_running(server):
    from playwright.sync_api import expect

    url, db, cid, earlier = server
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/?c={cid}")
        expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
        bubbles = page.locator('[data-testid="stChatMessage"]')
        # The code block in the Markdown has Streamlit's copy button (shown on hover), as st.code has.
        bubbles.nth(1).locator("pre").first.hover()
        expect(bubbles.nth(1).get_by_label("Copy to clipboard")).to_have_count(1)

        send(page, "hello")
        wait_for_text(page, 3, min_chars=3)  # it streams
        thumbs_up = page.locator(f".st-key-feedback_{earlier} button").first
        thumbs_up.click()
        expect(page.locator(f".st-key-feedback_{earlier} [data-testid='stFeedbackButtonActive']")).to_have_count(
            1, timeout=10_000
        )
        # The button lights up in the browser at once; the page's run that saves it follows.
        assert wait_until(lambda: _row(db, earlier)[2] == 1, timeout=15)  # saved while the reply runs on
        mid, status, _ = _last_reply(db)
        assert status == "streaming"  # not ended by the click
        # It runs to its length limit, then the page redraws it as saved.
        expect(page.get_by_text("tokens ·")).to_have_count(1, timeout=60_000)
        assert "达到长度上限" in bubbles.nth(3).inner_text()
        _, status, stats = _last_reply(db)
        assert status == "complete" and f'"completion_tokens": {MAX_TOKENS}' in stats
        expect(page.locator(f".st-key-feedback_{earlier} [data-testid='stFeedbackButtonActive']")).to_have_count(1)

        # The whole reply in Streamlit's own code block, with its copy button, behind "复制".
        page.locator(f".st-key-copy_{earlier} button").first.click()
        popover = page.locator('[data-testid="stPopoverBody"]')
        expect(popover.locator("code")).to_contain_text("print('hi')")
        page.keyboard.press("Escape")

        button(page, "regenerate").click()  # a second version of the last reply: ‹ 2/2 ›
        expect(page.get_by_text("2 / 2")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("tokens ·")).to_have_count(1, timeout=60_000)
        new = _last_reply(db)[0]
        button(page, f"version_prev_{new}").click()
        expect(page.get_by_text("1 / 2")).to_be_visible(timeout=10_000)
        page.screenshot(path=str(db.parent / "versions.png"), full_page=True)
        page.close()


def test_editing_an_earlier_message_hides_the_old_branch_while_the_new_reply_streams(server):
    """The old branch's later bubbles (with live buttons) leave the screen at once, not when the reply ends; after
    it, ‹ on the edited message brings the old branch back."""
    from playwright.sync_api import expect

    url, db, _, _ = server
    store = ConversationStore(db)
    cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT, {"temperature": 0.0})
    first = store.add_message(cid, "user", "OLD FIRST QUESTION")
    for text in ("OLD FIRST ANSWER", "OLD SECOND QUESTION", "OLD SECOND ANSWER"):
        store.add_message(cid, "assistant" if text.endswith("ANSWER") else "user", text)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/?c={cid}")
        bubbles = page.locator('[data-testid="stChatMessage"]')
        expect(bubbles).to_have_count(4, timeout=60_000)
        button(page, f"edit_{first}").click()
        page.locator(".st-key-edit_text textarea").fill("hello")
        button(page, "edit_send").click()
        wait_for_text(page, 1, min_chars=3)  # the new reply streams right under the edited message
        expect(bubbles).to_have_count(2)
        expect(page.get_by_text("OLD SECOND QUESTION")).to_have_count(0)
        assert _last_reply(db)[1] == "streaming"  # checked while it streams
        expect(page.get_by_text("tokens ·")).to_have_count(1, timeout=60_000)
        edited = store.get_conversation(cid).messages[0].id
        button(page, f"version_prev_{edited}").click()
        expect(page.get_by_text("OLD SECOND ANSWER")).to_be_visible(timeout=10_000)
        expect(bubbles).to_have_count(4)
        page.close()
    store.close()
