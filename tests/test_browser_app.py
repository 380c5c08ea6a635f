"""End to end in headless Chromium: `streamlit run app.py` on the real tiny model, driven like a user would."""

from __future__ import annotations

import pytest

from tests.browser_helpers import CHROMIUM, button, chromium, send, streamlit_server, tiny_model_env, wait_for_text

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]

# Greedy with repetition penalty 2 makes the tiny model write ~275 tokens for this prompt; at 20 ms a token
# (BROWSER_TEST_TOKEN_DELAY, a GPU-like pace) that is ~5 s, so "stop" lands mid-reply.
LONG_PROMPT = "写一个很长的故事"
SERVER_ENV = {"INTERNLM_TEMPERATURE": "0", "INTERNLM_MAX_NEW_TOKENS": "280", "BROWSER_TEST_TOKEN_DELAY": "0.02"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    with streamlit_server(tiny_model_env(tmp, **SERVER_ENV), tmp / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def test_chat_stop_busy_tab_clear_and_reload(server, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    bubbles = page.locator('[data-testid="stChatMessage"]')
    expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)  # after the model loaded

    send(page, "hello")  # a reply streams in, with its stats caption
    expect(bubbles).to_have_count(2, timeout=30_000)
    wait_for_text(page, 1, contains="tokens ·")
    expect(page.get_by_text("结束：完成")).to_be_visible()

    page.get_by_text("生成参数").click()  # a slider: repetition penalty to its maximum (2.00)
    penalty = page.locator(".st-key-repetition_penalty input[type=range]")
    penalty.focus()
    penalty.press("End")
    assert penalty.get_attribute("aria-valuetext") == "2.00"

    send(page, LONG_PROMPT)  # stop a long reply right after its first chunk
    wait_for_text(page, 3, min_chars=2)
    button(page, "stop_reply").click()  # the reply's own stop button
    expect(page.get_by_text("已停止 ·")).to_be_visible(timeout=15_000)
    stopped = bubbles.nth(3).inner_text()
    assert "结束：已停止" in stopped and int(stopped.split("已停止 · ")[1].split(" tokens")[0]) < 280

    other = browser.new_page()  # a second tab asks while the first one generates: it joins the batch at once
    other.goto(server)
    expect(other.locator(".st-key-prompt textarea")).to_be_enabled(timeout=30_000)
    button(page, "regenerate").click()
    expect(button(page, "stop_reply")).to_be_visible(timeout=15_000)
    wait_for_text(page, 3, min_chars=2)
    send(other, "hi")
    wait_for_text(other, 1, contains="tokens ·")  # its whole reply came while the first tab's still streamed
    expect(other.get_by_text("你排在第")).to_have_count(0)
    expect(button(page, "stop_reply")).to_be_visible()
    button(page, "stop_reply").click()  # the inline stop of a regenerated reply
    expect(page.get_by_text("已停止 ·")).to_be_visible(timeout=15_000)
    other.close()

    url = page.url
    assert "?c=" in url
    button(page, "new_chat").click()  # clear: an empty chat, the old conversation stays saved
    expect(bubbles).to_have_count(0, timeout=15_000)
    page.goto(url)  # reload the conversation's URL: it is all there, the stopped reply marked
    expect(bubbles).to_have_count(4, timeout=30_000)
    expect(page.get_by_text(LONG_PROMPT)).to_be_visible()
    expect(page.get_by_text("已停止 ·")).to_be_visible()
    page.screenshot(path=str(tmp_path / "chat.png"))
    page.close()


PHONE = {  # a phone as Chromium emulates one: Streamlit closes the sidebar after a tap on a phone (by user agent)
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "user_agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 "
    "Mobile Safari/537.36",
}


@pytest.mark.parametrize(("label", "path", "title"), [("历史", "/history", "历史"), ("状态", "/status", "状态")])
def test_on_a_phone_the_sidebar_closes_after_going_to_another_page(server, browser, label, path, title):
    from playwright.sync_api import expect

    page = browser.new_page(**PHONE)
    page.goto(server)
    expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
    sidebar = page.locator('[data-testid="stSidebar"]')
    page.locator('[data-testid="stExpandSidebarButton"]').tap()
    expect(sidebar).to_be_in_viewport()
    page.locator('[data-testid="stSidebarNav"]').get_by_text(label).tap()
    expect(page.get_by_role("heading", name=title)).to_be_visible(timeout=30_000)
    assert page.url.endswith(path)
    expect(sidebar).not_to_be_in_viewport()  # closed: the page is not covered
    page.close()
