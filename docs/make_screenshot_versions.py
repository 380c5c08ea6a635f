"""Regenerate the reply-versions screenshots in docs/ (python docs/make_screenshot_versions.py): a reply with three
versions, the second shown (‹ 2/3 ›) with a thumbs up, in Chinese and English, in headless Chromium."""

# As in make_screenshot.py the model is the tiny random-weight test model. The question and two answers are stored
# examples (the second with a thumbs up, as if given earlier); the third version is generated live by a click on
# Regenerate, then ‹ goes back to the second. Needs /usr/bin/chromium and fonts-noto-cjk.

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from make_screenshot import DESKTOP, EXAMPLES, OUTPUT

from internlm_app.settings import DEFAULT_SYSTEM_PROMPT
from internlm_app.store.db import ConversationStore
from tests.browser_helpers import button, chromium, streamlit_server, tiny_model_env

SHORT = {  # lang -> the second stored answer: shorter, without the code
    "zh": r"斐波那契数列：\(F_0 = 0,\ F_1 = 1,\ F_n = F_{n-1} + F_{n-2}\)。用 Python 循环相加即可，时间 \(O(n)\)。",
    "en": r"The Fibonacci numbers: \(F_0 = 0,\ F_1 = 1,\ F_n = F_{n-1} + F_{n-2}\). A Python loop adding the last "
    r"two computes them in \(O(n)\).",
}
SHOTS = {"zh": "screenshot-versions.png", "en": "screenshot-versions-en.png"}


def seed(store: ConversationStore, lang: str) -> tuple[str, int]:
    """The example question with two stored answers, the second liked; returns the conversation and that answer."""
    title, question, answer = EXAMPLES[lang]
    cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT, title=title)
    store.add_message(cid, "user", question)
    first = store.add_message(cid, "assistant", answer)
    second = store.add_version(first, SHORT[lang])
    store.set_feedback(second, 1)
    return cid, second


def shoot(browser, url: str, db: str, cid: str, second: int, lang: str) -> None:
    page = browser.new_page(**DESKTOP)
    page.goto(f"{url}/?c={cid}&lang={lang}")
    page.locator(".st-key-prompt textarea").wait_for(timeout=60_000)
    button(page, "regenerate").click()  # the third version, generated live
    page.get_by_text("3 / 3").wait_for(timeout=60_000)
    page.get_by_text("tokens ·").wait_for(timeout=60_000)
    with sqlite3.connect(db) as connection:
        third = connection.execute("SELECT max(id) FROM messages").fetchone()[0]
    button(page, f"version_prev_{third}").click()  # back to the liked second version
    page.get_by_text("2 / 3").wait_for(timeout=10_000)
    page.locator(f".st-key-feedback_{second} [data-testid='stFeedbackButtonActive']").wait_for(timeout=10_000)
    page.mouse.move(0, 0)
    page.wait_for_timeout(800)
    page.screenshot(path=str(OUTPUT.with_name(SHOTS[lang])))
    page.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = tiny_model_env(Path(tmp), INTERNLM_TEMPERATURE="0", INTERNLM_MAX_NEW_TOKENS="24")
        store = ConversationStore(env["INTERNLM_DB_PATH"])
        seeded = {lang: seed(store, lang) for lang in SHOTS}
        store.close()
        with streamlit_server(env, Path(tmp) / "server.log") as url, chromium() as browser:
            for lang, (cid, second) in seeded.items():
                shoot(browser, url, env["INTERNLM_DB_PATH"], cid, second, lang)
                print(f"wrote {OUTPUT.with_name(SHOTS[lang])}")


if __name__ == "__main__":
    main()
