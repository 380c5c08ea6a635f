"""End to end: the web app in remote-backend mode (INTERNLM_BACKEND=openai) against this project's API on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.browser_helpers import CHROMIUM, chromium, free_port, local_server, send, streamlit_server, tiny_model_env

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`python -m internlm_app api` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "internlm_app", "api", "--host", "127.0.0.1", "--port", str(port)]
    with local_server(command, "/health", port, env, log_path) as url:
        yield url


def test_web_app_talks_to_the_api_as_a_remote_backend(tmp_path, reference):
    from playwright.sync_api import expect

    case = reference["chat"][0]  # "hello" with the default system prompt, greedy, 24 new tokens
    api_env = tiny_model_env(tmp_path / "api")
    with api_server(api_env, tmp_path / "api.log") as api_url:
        web_env = tiny_model_env(
            tmp_path / "web",
            INTERNLM_BACKEND="openai",
            INTERNLM_OPENAI_BASE_URL=f"{api_url}/v1",
            INTERNLM_MODEL_PATH=str(tmp_path / "no-model-here"),  # proves the web process loads no model itself
            INTERNLM_TEMPERATURE="0",
            INTERNLM_MAX_NEW_TOKENS=str(case["max_new_tokens"]),
        )
        with streamlit_server(web_env, tmp_path / "web.log") as web_url, chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(web_url)
            expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
            send(page, case["query"])
            reply = page.locator('[data-testid="stChatMessage"]').nth(1)
            expect(reply).to_contain_text(case["response"], timeout=30_000)
            expect(reply).to_contain_text("tokens ·")
        api_log = (tmp_path / "api.log").read_text(errors="replace")
        assert "POST /v1/chat/completions 200" in api_log
