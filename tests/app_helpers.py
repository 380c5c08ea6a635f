"""Helpers for the AppTest tests of app.py and pages/: environment for the tiny model, running pages, reading chats."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.conftest import FIXTURE_DIR

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 60  # seconds for one script run (the first one loads the model)
MAX_NEW_TOKENS = 24


def set_app_env(monkeypatch, tmp_path: Path, cache_dir: Path, **extra: str) -> None:
    """INTERNLM_* for the real tiny model on the CPU; one cache dir for all tests, so the model loads once."""
    values = {
        "INTERNLM_MODEL_PATH": str(FIXTURE_DIR),
        "INTERNLM_DEVICE": "cpu",
        "INTERNLM_CACHE_DIR": str(cache_dir),
        "INTERNLM_DB_PATH": str(tmp_path / "conversations.db"),
        "INTERNLM_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        **extra,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def run_page(page: str = "app.py", query: dict[str, str] | None = None) -> AppTest:
    """Run app.py (and switch to `page` when it is another one) and check that no exception was shown."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=RUN_TIMEOUT)
    at.query_params.update(query or {})
    at.run()
    if page != "app.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chat(at: AppTest) -> list[tuple[str, str]]:
    """(role, first Markdown text) of every chat bubble."""
    return [(m.name, m.markdown[0].value if len(m.markdown) else "") for m in at.chat_message]


def send(at: AppTest, text: str) -> AppTest:
    """Submit `text` in the chat input and wait for the reply."""
    at.chat_input(key="prompt").set_value(text).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> str:
    """All values of an element list, one per line (for `in` checks)."""
    return "\n".join(str(e.value) for e in elements)
