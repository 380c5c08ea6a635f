"""Shared fixtures: the tiny InternLM2 checkpoint, its reference outputs, and an engine on it (CPU, float32)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "internlm2-tiny"

torch.set_num_threads(1)  # the references were computed with one thread; it also keeps CI's 2 cores calm


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((FIXTURE_DIR / "reference.json").read_text())


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    """The fixture converted once per test session with the real converter."""
    from internlm_app.runtime.convert import convert_checkpoint

    return convert_checkpoint(FIXTURE_DIR, tmp_path_factory.mktemp("converted") / "internlm2-tiny-llama")


def tiny_settings(tmp_path: Path, **overrides):
    """Settings that load the tiny fixture on the CPU and keep every file under tmp_path."""
    from internlm_app.settings import Settings

    values = {
        "model_path": FIXTURE_DIR,
        "cache_dir": tmp_path / "cache",
        "db_path": tmp_path / "conversations.db",
        "device": "cpu",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A ChatEngine on the tiny model, loaded through the real path (resolve, convert, load)."""
    from internlm_app.backends.engine import ChatEngine

    return ChatEngine.load(tiny_settings(tmp_path_factory.mktemp("engine")))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's INTERNLM_* variables or writes to their home."""
    for key in list(os.environ):
        if key.startswith("INTERNLM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("INTERNLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("INTERNLM_DB_PATH", str(tmp_path / "conversations.db"))


@pytest.fixture(scope="session")
def app_cache(tmp_path_factory):
    """One conversion of the tiny model shared by the web app's tests."""
    return tmp_path_factory.mktemp("app-cache")


@pytest.fixture
def app_env(monkeypatch, tmp_path, app_cache):
    """The web app's environment: the tiny model on the CPU, a fresh conversation database per test."""
    from tests.app_helpers import set_app_env

    set_app_env(monkeypatch, tmp_path, app_cache)
    return tmp_path


@pytest.fixture
def store(tmp_path):
    """An empty conversation store in a fresh file (closed after the test)."""
    from internlm_app.store.db import ConversationStore

    s = ConversationStore(tmp_path / "chats.db")
    yield s
    s.close()
