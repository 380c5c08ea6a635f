"""Browser test helpers: a `streamlit run app.py` server on a free port with the tiny model, and headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import FIXTURE_DIR

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 90.0


# A slow model for tests that act while a reply streams: "hello" with repetition penalty 2 runs to the limit, 5 s at
# 10 tokens a second.
SLOW_REPLY_TOKENS = 50
SLOW_REPLY_ENV = {
    "INTERNLM_TEMPERATURE": "0",
    "INTERNLM_REPETITION_PENALTY": "2.0",
    "INTERNLM_MAX_NEW_TOKENS": str(SLOW_REPLY_TOKENS),
    "BROWSER_TEST_TOKEN_DELAY": "0.1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a server that loads the tiny fixture on the CPU and keeps its files under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERNLM_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "INTERNLM_MODEL_PATH": str(FIXTURE_DIR),
            "INTERNLM_DEVICE": "cpu",
            "INTERNLM_CACHE_DIR": str(tmp_path / "cache"),
            "INTERNLM_DB_PATH": str(tmp_path / "conversations.db"),
            **extra,
        }
    )
    return env


@contextmanager
def local_server(command: list[str], health_path: str, port: int, env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run a server command on 127.0.0.1:port until the block ends, once `health_path` answers 200; yields its URL."""
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[1]} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(url + health_path, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextmanager
def streamlit_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run tests/browser_server.py (streamlit run app.py) until the block ends; yields the base URL."""
    port = free_port()
    command = [sys.executable, "tests/browser_server.py", "--server.port", str(port), "--server.address", "127.0.0.1"]
    with local_server(command, "/_stcore/health", port, env, log_path) as url:
        yield url


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Debian Chromium driven by Playwright (no downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def button(page, key: str):
    """The button of the widget with `key` (Streamlit gives its container the class st-key-<key>)."""
    return page.locator(f".st-key-{key} button").first


def send(page, text: str) -> None:
    """Type `text` in the chat input and press Enter."""
    box = page.locator(".st-key-prompt textarea")
    box.fill(text)
    box.press("Enter")


def wait_for_text(page, index: int, min_chars: int = 1, contains: str = "", timeout_ms: float = 30_000) -> None:
    """Wait until chat bubble `index` shows at least `min_chars` characters of text (and `contains`)."""
    page.wait_for_function(
        """([index, minChars, contains]) => {
            const bubble = document.querySelectorAll('[data-testid="stChatMessage"]')[index];
            const content = bubble && (bubble.querySelector('[data-testid="stChatMessageContent"]') || bubble);
            const text = content ? content.innerText : "";
            return text.trim().length >= minChars && text.includes(contains);
        }""",
        arg=[index, min_chars, contains],
        timeout=timeout_ms,
    )
