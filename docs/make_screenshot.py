"""Regenerate the chat page screenshots in docs/ (python docs/make_screenshot.py): Chinese and English, desktop and a
390 px phone, in headless Chromium."""

# The server is `streamlit run app.py` on the tiny random-weight test model, so its replies are gibberish. To show
# how a real answer renders (Markdown, a code block, LaTeX), the first turn is a stored example conversation; the
# last reply is generated live by the fixture model. Needs /usr/bin/chromium and fonts-noto-cjk.

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internlm_app.settings import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from internlm_app.store.db import ConversationStore  # noqa: E402
from tests.browser_helpers import chromium, send, streamlit_server, tiny_model_env, wait_for_text  # noqa: E402

OUTPUT = ROOT / "docs" / "screenshot-chat.png"
QUESTION = "用 Python 计算斐波那契数列，并写出通项公式。"
ANSWER = r"""斐波那契数列满足 \(F_n = F_{n-1} + F_{n-2}\)，其通项公式（比内公式）为：

\[F_n = \frac{\varphi^n - \psi^n}{\sqrt{5}}, \quad \varphi = \frac{1+\sqrt{5}}{2}, \quad \psi = \frac{1-\sqrt{5}}{2}\]

```python
def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
```"""
EXAMPLES = {  # lang -> (title, question, answer): the stored first turn of each shot's conversation
    "zh": ("斐波那契数列", QUESTION, ANSWER),
    "en": (
        "Fibonacci numbers",
        "Compute the Fibonacci numbers in Python, and give the closed form.",
        ANSWER.replace("斐波那契数列满足", "The Fibonacci numbers satisfy").replace(
            "，其通项公式（比内公式）为：", "; their closed form (Binet's formula) is:"
        ),
    ),
}


PHONE = {  # a phone as Chromium emulates one (Streamlit closes the sidebar after a tap on a phone)
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "user_agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 "
    "Mobile Safari/537.36",
}
DESKTOP = {"viewport": {"width": 1400, "height": 1000}}
LABELS = {"zh": ("生成参数", "你好，请介绍一下你自己。"), "en": ("Generation", "Hello, please introduce yourself.")}


def shoot(browser, url: str, cid: str, lang: str, device: dict, name: str) -> None:
    """The chat page with the example turn and one live reply; on desktop the sampling panel is open."""
    sampling, question = LABELS[lang]
    page = browser.new_page(**device)
    page.goto(f"{url}/?c={cid}&lang={lang}")
    page.locator(".st-key-prompt textarea").wait_for(timeout=60_000)
    send(page, question)
    wait_for_text(page, 3, contains="tokens")
    if device is DESKTOP:
        page.get_by_text(sampling).click()
    page.wait_for_timeout(800)
    page.screenshot(path=str(OUTPUT.with_name(name)))
    page.close()


SHOTS = ["screenshot-chat.png", "screenshot-chat-en.png", "screenshot-phone-zh.png", "screenshot-phone-en.png"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = tiny_model_env(Path(tmp), INTERNLM_TEMPERATURE="0", INTERNLM_MAX_NEW_TOKENS="24")
        store = ConversationStore(env["INTERNLM_DB_PATH"])
        conversations = []
        for lang in ("zh", "en", "zh", "en"):  # one conversation per shot
            title, question, answer = EXAMPLES[lang]
            cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT, title=title)
            store.add_message(cid, "user", question)
            store.add_message(cid, "assistant", answer)  # an example: no stats, since no model produced it
            conversations.append(cid)
        store.close()
        with streamlit_server(env, Path(tmp) / "server.log") as url, chromium() as browser:
            langs, devices = ("zh", "en", "zh", "en"), (DESKTOP, DESKTOP, PHONE, PHONE)
            for name, cid, lang, device in zip(SHOTS, conversations, langs, devices, strict=True):
                shoot(browser, url, cid, lang, device, name)
                print(f"wrote {OUTPUT.with_name(name)}")


if __name__ == "__main__":
    main()
