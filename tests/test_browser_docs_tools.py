"""Documents and tools in headless Chromium: `streamlit run app.py` on the real tiny model, a user attaching a text
file and a PDF (cost shown before sending) and forcing a tool call from the sidebar."""

from __future__ import annotations

import re

import pytest

from internlm_app.chat.context import model_messages
from internlm_app.store.db import ConversationStore
from tests.browser_helpers import CHROMIUM, button, chromium, streamlit_server, tiny_model_env, wait_for_text
from tests.pdf_helpers import make_pdf

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]

NOTES = "The launch code word is PELICAN.\nThe meeting moved to Thursday.\n"
PDF_PAGES = ["Quarterly report: sales rose by 12 percent.", "Outlook: steady growth, new office in Hangzhou."]
PICK_COLOR = '''
def pick_color(color: str) -> str:
    """Pick a color for the user.

    Args:
        color: The color to pick. (choices: ["red", "blue"])
    """
    return f"picked {color}"
'''
SERVER_ENV = {"INTERNLM_TEMPERATURE": "0", "INTERNLM_MAX_NEW_TOKENS": "100"}


def files() -> list[dict]:
    return [
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": NOTES.encode()},
        {"name": "report.pdf", "mimeType": "application/pdf", "buffer": make_pdf(PDF_PAGES)},
    ]


def attach(page, attached: list[dict], text: str) -> None:
    """Attach files in the chat input, type `text` and press Enter: the confirmation panel opens."""
    from playwright.sync_api import expect

    page.locator(".st-key-prompt input[type=file]").set_input_files(attached)
    for item in attached:  # each file's chip, uploaded
        expect(page.locator(".st-key-prompt").get_by_text(item["name"])).to_be_visible(timeout=15_000)
    box = page.locator(".st-key-prompt textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(".st-key-attach_panel")).to_be_visible(timeout=30_000)


def force_tool(page, tools_label: str, tool: str) -> None:
    """Open the sidebar's tools, switch them on and pick `tool` (its first step calls it)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    page.locator('[data-testid="stSidebar"] summary').get_by_text(tools_label, exact=True).click()
    page.locator(".st-key-tools_on label").click()
    choice = page.locator(".st-key-tool_choice")
    expect(choice.locator("input")).to_be_enabled(timeout=15_000)
    # The switch's rerun may still redraw the sidebar after the box is enabled, closing an open list under the click
    # (Playwright: "element is detached"); open it again then, a few times at most.
    for attempt in range(3):
        choice.click()
        try:
            page.get_by_role("option", name=tool, exact=True).click(timeout=10_000)
            break
        except PlaywrightError:
            if attempt == 2:
                raise
    expect(choice.get_by_role("combobox")).to_have_value(tool)


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    (folder / "colors.py").write_text(PICK_COLOR)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tools_dir):
    tmp = tmp_path_factory.mktemp("browser-docs")
    env = tiny_model_env(tmp, **SERVER_ENV, INTERNLM_TOOLS_DIR=str(tools_dir))
    with streamlit_server(env, tmp / "server.log") as url:
        yield url, tmp / "conversations.db"


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def test_files_show_their_cost_before_sending_and_the_reply_reads_them(server, browser):
    from playwright.sync_api import expect

    url, db = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
    attach(page, files(), "What is the code word?")
    panel = page.locator(".st-key-attach_panel")
    for name in ("notes.txt", "report.pdf"):
        expect(panel).to_contain_text(re.compile(rf"{re.escape(name)}（[^）]+）：[\d,]+ tokens"))
    expect(panel).to_contain_text("放得下")
    expect(page.locator('[data-testid="stChatMessage"]')).to_have_count(0)  # nothing sent yet
    assert not db.exists() or not ConversationStore(db).list_conversations()

    button(page, "attach_send").click()
    bubbles = page.locator('[data-testid="stChatMessage"]')
    expect(bubbles).to_have_count(2, timeout=30_000)
    wait_for_text(page, 1, contains="tokens ·")
    expect(bubbles.nth(0)).to_contain_text("notes.txt")
    expect(bubbles.nth(0)).to_contain_text("report.pdf")
    bubbles.nth(0).locator("summary").filter(has_text="notes.txt").click()  # the text the model read, in the expander
    expect(bubbles.nth(0)).to_contain_text("PELICAN")

    store = ConversationStore(db)
    (summary,) = store.list_conversations()
    conv = store.get_conversation(summary.id)
    user, reply = conv.messages
    assert [a.name for a in user.attachments] == ["notes.txt", "report.pdf"]
    context = model_messages(store, conv.id)
    assert "PELICAN" in context[1]["content"] and "new office in Hangzhou" in context[1]["content"]
    assert context[1]["content"].endswith("What is the code word?")
    # The engine counted the files in its prompt: more prompt tokens than the files' blocks alone.
    assert reply.status == "complete" and reply.stats["prompt_tokens"] > sum(a.tokens for a in user.attachments)


def test_a_tool_picked_in_the_sidebar_is_called_and_its_result_shows(server, browser):
    from playwright.sync_api import expect

    url, db = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
    force_tool(page, "工具", "pick_color")
    box = page.locator(".st-key-prompt textarea")
    box.fill("Pick a color")
    box.press("Enter")
    bubbles = page.locator('[data-testid="stChatMessage"]')
    expect(bubbles).to_have_count(2, timeout=30_000)
    wait_for_text(page, 1, contains="tokens ·")
    step = bubbles.nth(1).locator('[data-testid="stExpander"]')
    expect(step).to_contain_text("调用工具 pick_color")
    step.locator("summary").click()
    expect(step).to_contain_text(re.compile(r"picked (red|blue)"))

    page.reload()  # the step is saved with the reply
    expect(page.locator('[data-testid="stChatMessage"]')).to_have_count(2, timeout=30_000)
    expect(page.locator('[data-testid="stChatMessage"]').nth(1)).to_contain_text("调用工具 pick_color")
