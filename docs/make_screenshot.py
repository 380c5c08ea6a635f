"""Regenerate docs/screenshot-chat.png (python docs/make_screenshot.py): the chat page in headless Chromium."""

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
from internlm_app.store import ConversationStore  # noqa: E402
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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = tiny_model_env(Path(tmp), INTERNLM_TEMPERATURE="0", INTERNLM_MAX_NEW_TOKENS="24")
        store = ConversationStore(env["INTERNLM_DB_PATH"])
        cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT, title="斐波那契数列")
        store.add_message(cid, "user", QUESTION)
        store.add_message(cid, "assistant", ANSWER)  # an example: no stats, since no model produced it
        store.close()
        with streamlit_server(env, Path(tmp) / "server.log") as url, chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/?c={cid}")
            page.locator(".st-key-prompt textarea").wait_for(timeout=60_000)
            send(page, "你好，请介绍一下你自己。")
            wait_for_text(page, 3, contains="tokens ·")
            page.get_by_text("生成参数").click()
            page.wait_for_timeout(500)
            page.screenshot(path=str(OUTPUT))
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
