"""Nothing typed is lost and no interaction but Stop ends a reply (issue: a message typed while a regenerated reply
streamed was dropped and cancelled the reply). On every path (send, regenerate, edit), with a slow model (10 tokens
a second), while the reply streams: sidebar buttons, the language and a typed message. The reply runs to its end,
the typed message is queued, shown, then sent, and both are in the database."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.browser_helpers import CHROMIUM, button, chromium, send, streamlit_server, tiny_model_env, wait_for_text
from tests.browser_helpers import SLOW_REPLY_ENV as SERVER_ENV

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("typing")
    with streamlit_server(tiny_model_env(tmp, **SERVER_ENV), tmp / "server.log") as url:
        yield url, tmp / "conversations.db"


def _rows(db) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()


def _start(page, path: str) -> None:
    """Begin a reply the way `path` does; returns while it streams."""
    if path == "send":
        send(page, "hello")
    elif path == "regenerate":
        button(page, "regenerate").click()
    else:
        button(page, "edit_last").click()
        page.locator(".st-key-edit_text textarea").fill("hello")
        button(page, "edit_send").click()


@pytest.mark.parametrize("path", ["send", "regenerate", "edit"])
def test_interactions_while_a_reply_streams_neither_end_it_nor_lose_text(server, path):
    from playwright.sync_api import expect

    url, db = server
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        box = page.locator(".st-key-prompt textarea")
        expect(box).to_be_enabled(timeout=60_000)
        bubbles = page.locator('[data-testid="stChatMessage"]')
        if path != "send":  # regenerate and edit need a conversation first
            send(page, "hi")
            expect(page.get_by_text("tokens ·")).to_have_count(1, timeout=60_000)
        before = len(_rows(db))
        _start(page, path)
        wait_for_text(page, 1, min_chars=3)  # it streams
        expect(button(page, "edit_last")).not_to_be_visible()  # no stale edit or regenerate buttons
        expect(button(page, "regenerate")).not_to_be_visible()
        button(page, "clear_gpu").click()  # sidebar buttons and the language: each reruns the page
        time.sleep(0.5)
        page.locator(".st-key-lang").get_by_text("English").click()
        time.sleep(0.5)
        send(page, f"NEW MESSAGE after {path}")  # typed while the reply runs
        expect(page.get_by_text("Queued: sent when the current reply ends")).to_be_visible(timeout=10_000)
        page.locator(".st-key-lang").get_by_text("中文").click()
        # The reply runs to its length limit, then the queued message goes out and gets its own reply.
        expect(bubbles).to_have_count(4, timeout=60_000)
        expect(page.get_by_text("tokens ·")).to_have_count(2, timeout=60_000)
        page.screenshot(path=str(db.parent / f"typing-{path}.png"), full_page=True)
        rows = _rows(db)[before - (0 if path == "send" else 1) :] if path != "send" else _rows(db)[before:]
        replies = [r for r in rows if r[0] == "assistant"]
        assert replies[0][2] == "complete" and ("达到长度上限" in bubbles.nth(1).inner_text())
        assert ("user", f"NEW MESSAGE after {path}", "complete") in rows and replies[-1][2] == "complete"
        assert f"NEW MESSAGE after {path}" in bubbles.nth(2).inner_text()
        page.close()


def test_stop_still_stops_a_reply_that_went_to_the_background(server):
    """After an interaction the reply runs on in the background; its Stop button still ends it at once."""
    from playwright.sync_api import expect

    url, db = server
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
        send(page, "hello")
        wait_for_text(page, 1, min_chars=3)
        button(page, "clear_gpu").click()  # the page moves on; the reply is now drawn from the background
        expect(button(page, "stop_live")).to_be_visible(timeout=10_000)
        button(page, "stop_live").click()
        expect(page.get_by_text("已停止 ·")).to_be_visible(timeout=15_000)
        assert _rows(db)[-1][2] == "stopped"
        page.close()


def _conversation_rows(db, first_user_text: str) -> list[tuple[str, str, str]]:
    """(role, content, status) of the conversation whose first message is `first_user_text`, in order."""
    with sqlite3.connect(db) as connection:
        (cid,) = connection.execute(
            "SELECT conversation_id FROM messages WHERE content = ? ORDER BY id LIMIT 1", (first_user_text,)
        ).fetchone()
        sql = "SELECT role, content, status FROM messages WHERE conversation_id = ? ORDER BY id"
        return connection.execute(sql, (cid,)).fetchall()


def test_a_reply_waiting_in_line_and_a_queued_message_survive_interactions_and_reloads(server):
    """Two tabs, one model (the slow replies all decode on the one worker): tab B's reply waits in line behind tab
    A's. B switches the language and reloads while it waits: its reply keeps its place, is shown waiting after the
    reload, and then runs to its end. A message typed in A while A's reply streams is queued; A reloads (the browser
    session is gone): the queued message is still shown, and it is sent once the reply ends."""
    from playwright.sync_api import expect

    url, db = server
    with chromium() as browser:
        tab_a = browser.new_context().new_page()
        tab_b = browser.new_context().new_page()
        for tab in (tab_a, tab_b):
            tab.goto(url)
            expect(tab.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
        send(tab_a, "TAB A first")
        wait_for_text(tab_a, 1, min_chars=3)  # A streams
        send(tab_b, "TAB B waits")
        expect(tab_b.get_by_text("你排在第 1 位")).to_be_visible(timeout=10_000)
        tab_b.locator(".st-key-lang").get_by_text("English").click()  # a rerun while in line
        time.sleep(0.5)
        tab_b.reload()  # a new browser session while in line
        expect(tab_b.get_by_text("number 1 in line").or_(tab_b.get_by_text("你排在第 1 位"))).to_be_visible(
            timeout=10_000
        )
        send(tab_a, "QUEUED in A")
        expect(tab_a.get_by_text("排队中：当前回复结束后发送")).to_be_visible(timeout=10_000)
        tab_a.reload()
        expect(tab_a.get_by_text("排队中：当前回复结束后发送")).to_be_visible(timeout=10_000)  # still queued
        expect(tab_a.get_by_text("tokens ·")).to_have_count(2, timeout=60_000)  # A's reply, then the queued one's
        expect(tab_b.get_by_text("tokens ·")).to_have_count(1, timeout=60_000)
        tab_b.screenshot(path=str(db.parent / "typing-in-line-reload.png"), full_page=True)
        roles = [(role, status) for role, _, status in _conversation_rows(db, "TAB A first")]
        assert roles == [("user", "complete"), ("assistant", "complete")] * 2
        assert ("user", "QUEUED in A", "complete") in _conversation_rows(db, "TAB A first")
        b_rows = _conversation_rows(db, "TAB B waits")
        assert [(role, status) for role, _, status in b_rows] == [("user", "complete"), ("assistant", "complete")]
        assert b_rows[1][1]  # it ran: not "stopped before the first token"
