"""Regenerate the screenshots of documents and tools in the chat (python docs/make_screenshot_docs_tools.py), in
headless Chromium on the tiny random-weight test model: the confirmation panel of two attached files with their token
cost, the sent message with its files, and a reply with a tool step opened. English UI."""

# The flows are the browser test's (tests/test_browser_docs_tools.py). The replies are gibberish (random weights);
# the tool call is real: the picked tool is forced by the grammar. Needs /usr/bin/chromium and fonts-noto-cjk.

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser_helpers import button, chromium, streamlit_server, tiny_model_env, wait_for_text  # noqa: E402
from tests.test_browser_docs_tools import PICK_COLOR, SERVER_ENV, attach, files, force_tool  # noqa: E402

DESKTOP = {"viewport": {"width": 1400, "height": 1000}}
TALL = {"width": 1400, "height": 1650}  # the sent files, the tool step and its result on one screen


def main() -> None:
    from playwright.sync_api import expect

    with tempfile.TemporaryDirectory() as tmp:
        tools = Path(tmp) / "tools"
        tools.mkdir()
        (tools / "colors.py").write_text(PICK_COLOR)
        env = tiny_model_env(Path(tmp), **SERVER_ENV, INTERNLM_TOOLS_DIR=str(tools))
        with streamlit_server(env, Path(tmp) / "server.log") as url, chromium() as browser:
            page = browser.new_page(**DESKTOP)
            page.goto(f"{url}/?lang=en")
            expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
            attach(page, files(), "What is the code word, and how did sales do?")
            page.wait_for_timeout(800)
            page.screenshot(path=str(ROOT / "docs" / "screenshot-attach-confirm.png"))
            button(page, "attach_send").click()
            wait_for_text(page, 1, contains="tokens ·")
            bubbles = page.locator('[data-testid="stChatMessage"]')
            bubbles.nth(0).locator("summary").filter(has_text="report.pdf").click()

            force_tool(page, "Tools", "pick_color")
            box = page.locator(".st-key-prompt textarea")
            box.fill("Pick a color for the new office")
            box.press("Enter")
            wait_for_text(page, 3, contains="tokens ·")
            page.set_viewport_size(TALL)
            bubbles.nth(3).locator('[data-testid="stExpander"] summary').first.click()
            page.wait_for_timeout(500)
            bubbles.nth(3).scroll_into_view_if_needed()
            page.wait_for_timeout(800)
            page.screenshot(path=str(ROOT / "docs" / "screenshot-attach-tool.png"))
            print("wrote docs/screenshot-attach-confirm.png and docs/screenshot-attach-tool.png")


if __name__ == "__main__":
    main()
