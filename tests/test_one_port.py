"""`python -m internlm_app serve` end to end: one process on one free port, the real tiny model, a real browser, the
tutorial's `requests` client and the `openai` client, all at once on one engine; the password and the API keys."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.browser_helpers import CHROMIUM, chromium, free_port, local_server, send, tiny_model_env, wait_for_text

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
]

PASSWORD, KEY = "one-port-password", "sk-one-port"  # the key in its plain form: INTERNLM_API_KEYS=sk-...
AUTH = {"Authorization": f"Bearer {KEY}"}
# What tests/browser_server.py reports while the gate is closed: in English for /health, translated on the page.
LOAD_GATE_STEP = "downloading the model: 1.6 GB of 15.5 GB, file 1/8 (model-00002-of-00008.bin)"
LOAD_GATE_PAGE = "从 ModelScope 下载模型：1.6 GB / 15.5 GB，文件 1/8"
# Greedy with repetition penalty 2, the tiny model writes ~200 tokens for "hello" and "Write a poem" and ~60 for
# "书生浦语"; at 20 ms a forward pass (a GPU-like pace) the browser's reply takes seconds, so the API requests run
# while it streams.
SERVER_ENV = {
    "INTERNLM_TEMPERATURE": "0",
    "INTERNLM_REPETITION_PENALTY": "2.0",
    "INTERNLM_MAX_NEW_TOKENS": "240",
    "BROWSER_TEST_TOKEN_DELAY": "0.02",
    "INTERNLM_WEB_PASSWORD": PASSWORD,
    "INTERNLM_API_KEYS": KEY,
    "ONE_PORT_EXPORT_LIFETIME": "2",
}
API_TOKENS = 60


@contextmanager
def one_port_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """tests/one_port_server.py (`server.serve`, as `python -m internlm_app serve` runs it, on the paced tiny model) on
    a free port until the block ends."""
    port = free_port()
    env = {**env, "INTERNLM_HOST": "127.0.0.1", "INTERNLM_PORT": str(port)}
    with local_server([sys.executable, "tests/one_port_server.py"], "/health", port, env, log_path) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-port")
    gate = tmp / "load-gate"
    with one_port_server(tiny_model_env(tmp, ONE_PORT_LOAD_GATE=str(gate), **SERVER_ENV), tmp / "server.log") as url:
        yield url, gate


@pytest.fixture(scope="module")
def loaded(server) -> str:
    """The server once its model has loaded (the gate opened)."""
    url, gate = server
    gate.touch()
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/health", headers=AUTH, timeout=5).json()["status"] != "ok":
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)
    return url


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def log_in(browser, url: str, path: str = "/", viewport: dict | None = None):
    """A new page that asked for `path`, logged in through /login (the form the one-port server serves) and got it."""
    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
    page.goto(url + path)
    assert "/login?next=" in page.url  # nothing of the app without the password
    page.locator("#password").fill(PASSWORD)
    page.get_by_role("button", name="登录 / Log in").click()
    page.wait_for_url(url + path)
    return page


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_while_loading_health_reports_the_step_the_api_says_retry_and_the_page_shows_progress(server, browser):
    from playwright.sync_api import expect

    url, gate = server
    assert not gate.exists()
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "loading", "model_loaded": False}
    health = requests.get(f"{url}/health", headers=AUTH, timeout=5).json()
    assert health["status"] == "loading" and health["step"] == LOAD_GATE_STEP and health["elapsed_seconds"] > 0

    classic = requests.post(url, json={"prompt": "你好"}, headers=AUTH, timeout=10)
    assert classic.status_code == 503 and int(classic.headers["Retry-After"]) > 0
    body = classic.json()
    assert body["status"] == 503 and body["response"] is None and LOAD_GATE_STEP in body["error"]
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503 and refused.value.body["code"] == "model_loading"

    page = log_in(browser, url)
    expect(page.get_by_text(LOAD_GATE_PAGE)).to_be_visible(timeout=30_000)  # the page's progress bar, same step
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "10")  # 1.55 of 15.5 GB
    expect(page.get_by_text("正在加载模型")).to_be_visible()
    gate.touch()  # the model loads now; the page goes on to the chat without a reload
    expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
    page.close()


def test_browser_requests_and_openai_share_one_engine_at_once(loaded, browser, tmp_path):
    from playwright.sync_api import expect

    url = loaded
    page = log_in(browser, url)
    expect(page.locator(".st-key-prompt textarea")).to_be_enabled(timeout=60_000)
    send(page, "hello")
    wait_for_text(page, 1, min_chars=2)  # the browser's reply is streaming

    results: dict[str, object] = {}
    most_active, done = [0], threading.Event()

    # The browser's reply has the server's repetition penalty, which only the worker applies; the API requests ask
    # for none, so the batch decodes them beside it (greedy, "书生浦语" runs past API_TOKENS).
    def classic() -> None:  # the InternLM tutorial's requests client
        body = {"prompt": "书生浦语", "max_new_tokens": API_TOKENS, "repetition_penalty": 1.0}
        response = requests.post(url, json=body, headers=AUTH, timeout=120)
        results["classic"] = (response.status_code, response.json())

    def streamed() -> None:  # the official openai client, streaming
        chunks = openai_client(url).chat.completions.create(
            model="internlm2-chat-7b",
            messages=[{"role": "user", "content": "书生浦语"}],
            max_tokens=API_TOKENS,
            stream=True,
            extra_body={"repetition_penalty": 1.0},
        )
        results["openai"] = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]

    def watch_queue() -> None:  # the engine's own count of replies generating, as /health reports it
        while not done.is_set():
            queue = requests.get(f"{url}/health", headers=AUTH, timeout=10).json()["queue"]
            most_active[0] = max(most_active[0], queue["active"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_queue)
    watcher.start()
    clients = [threading.Thread(target=classic), threading.Thread(target=streamed)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(180)
    wait_for_text(page, 1, contains="tokens ·", timeout_ms=120_000)  # the browser's reply ended with its stats line
    done.set()
    watcher.join(30)

    status, body = results["classic"]
    assert status == 200 and set(body) >= {"response", "status", "time"} and body["status"] == 200
    assert body["response"] and body["history"] == [["书生浦语", body["response"]]]
    assert len([text for text in results["openai"] if text]) > 1  # streamed in several chunks
    # All three replies generated at the same time in one engine, the browser's on the worker and the API's two in the
    # batch: the browser's tab is not a second model.
    assert most_active[0] >= 3, most_active[0]
    health = requests.get(f"{url}/health", headers=AUTH, timeout=10).json()
    assert health["models_loaded_by_process"] == 1 and health["queue"]["active"] == 0

    page.get_by_text("状态").click()  # the Status page says the same: one process, one model
    expect(page.get_by_text("网页 + API，同一进程")).to_be_visible(timeout=30_000)
    row = page.locator("tr", has_text="本进程加载的模型数")
    expect(row).to_contain_text("1")

    page.go_back()
    expect(page.locator('[data-testid="stChatMessage"]')).to_have_count(2, timeout=30_000)
    page.screenshot(path=str(tmp_path / "one-port-desktop.png"))
    phone = log_in(browser, url, page.url.removeprefix(url), viewport={"width": 390, "height": 844})
    expect(phone.locator('[data-testid="stChatMessage"]')).to_have_count(2, timeout=30_000)
    expect(phone.locator(".st-key-prompt textarea")).to_be_enabled(timeout=30_000)
    phone.screenshot(path=str(tmp_path / "one-port-390.png"))
    phone.close()
    page.close()


def test_the_password_and_the_keys_guard_their_own_side_only(loaded, browser):
    url = loaded
    session = requests.Session()
    assert session.post(f"{url}/login", data={"password": "wrong"}, timeout=10).status_code == 401
    login = session.post(f"{url}/login", data={"password": PASSWORD}, allow_redirects=False, timeout=10)
    assert login.status_code == 303
    cookie = {"internlm_web": session.cookies["internlm_web"]}

    # The web login opens no API route, and an API key opens no web path.
    assert requests.post(url, json={"prompt": "hi"}, cookies=cookie, timeout=10).status_code == 401
    assert requests.get(f"{url}/v1/models", cookies=cookie, timeout=10).status_code == 401
    assert requests.get(f"{url}/metrics", cookies=cookie, timeout=10).status_code == 401
    assert requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
    page = requests.get(url, headers={**AUTH, "Accept": "text/html"}, allow_redirects=False, timeout=10)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    for path in ("/_stcore/host-config", "/media/0123456789abcdef.json", "/_stcore/upload_file/x/y", "/status"):
        assert requests.get(url + path, headers=AUTH, timeout=10).status_code == 401, path
    assert requests.get(f"{url}/_stcore/host-config", cookies=cookie, timeout=10).status_code == 200
    assert requests.get(f"{url}/_stcore/metrics", cookies=cookie, timeout=10).status_code == 404  # closed for all
    with pytest.raises(InvalidStatus) as refused:  # the page's websocket: refused at the handshake
        connect(url.replace("http", "ws") + "/_stcore/stream", subprotocols=["streamlit"], additional_headers=AUTH)
    assert refused.value.response.status_code == 403
    with connect(
        url.replace("http", "ws") + "/_stcore/stream",
        subprotocols=["streamlit"],
        additional_headers={"Cookie": f"internlm_web={cookie['internlm_web']}"},
    ):
        pass
    forged = {"internlm_web": "9999999999." + "0" * 64}
    assert requests.get(f"{url}/_stcore/host-config", cookies=forged, timeout=10).status_code == 401

    # /health: liveness only without a key; everything with one.
    assert requests.get(f"{url}/health", cookies=cookie, timeout=10).json() == {"status": "ok", "model_loaded": True}
    assert "queue" in requests.get(f"{url}/health", headers=AUTH, timeout=10).json()
    # GET / is the page for a browser; the classic contract is POST / (routed by method).
    assert requests.post(url, json={"prompt": ""}, headers=AUTH, timeout=10).status_code == 422
    assert requests.get(f"{url}/login?next=https://evil.example/", timeout=10).text.count("evil.example") == 0


def test_log_out_ends_the_login_in_this_tab_and_in_the_others(loaded, browser, tmp_path):
    from playwright.sync_api import expect

    url = loaded
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{url}/?lang=en")
        page.locator("#password").fill(PASSWORD)
        page.get_by_role("button", name="登录 / Log in").click()
        other = context.new_page()  # a second tab of the same browser, logged in by the same cookie
        other.goto(f"{url}/?lang=en")
        expect(other.locator(".st-key-prompt textarea")).to_be_enabled(timeout=30_000)
        page.get_by_role("link", name="Log out").click()
        page.wait_for_url(f"{url}/login?next=%2F%3Flang%3Den")  # here, in this tab, and the language kept
        page.screenshot(path=str(tmp_path / "logged-out.png"))
        assert len(context.pages) == 2  # no new tab was opened
        other.locator(".st-key-prompt textarea").fill("hello")  # the other tab's next run is logged out too
        other.locator(".st-key-prompt textarea").press("Enter")
        expect(other.get_by_text("You are logged out")).to_be_visible(timeout=30_000)
        other.screenshot(path=str(tmp_path / "other-tab-logged-out.png"))
        page.locator("#password").fill(PASSWORD)  # logging in again returns to the English page
        page.get_by_role("button", name="登录 / Log in").click()
        page.wait_for_url(f"{url}/?lang=en")
        expect(page.get_by_role("link", name="Log out")).to_be_visible(timeout=30_000)
        # The other tab's message was not lost: it is back in its box once that tab has logged in again.
        other.get_by_role("link", name="登录 / Log in").click()  # (the cookie is back: /login sends it straight on)
        expect(other.locator(".st-key-prompt textarea")).to_have_value("hello", timeout=30_000)
        assert "draft=" not in other.url and "lang=en" in other.url
        other.screenshot(path=str(tmp_path / "other-tab-back.png"))
    finally:
        context.close()


def test_an_export_is_served_only_with_the_login_and_only_briefly(loaded, browser):
    from playwright.sync_api import expect

    url = loaded
    page = log_in(browser, url, "/history")
    button = page.get_by_text("全部导出为 JSON")
    expect(button).to_be_visible(timeout=30_000)
    with page.expect_download() as download:
        button.click()
    file_url = download.value.url
    assert "/media/" in file_url
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["conversations"], exported  # the chats of the earlier tests
    cookie = {c["name"]: c["value"] for c in page.context.cookies()}
    assert requests.get(file_url, timeout=10).status_code == 401  # the URL alone is not enough
    deadline = time.monotonic() + 15
    while requests.get(file_url, cookies=cookie, timeout=10).status_code != 404:
        assert time.monotonic() < deadline, "the export stayed in the media store"
        time.sleep(0.5)
    page.close()


def test_a_failed_load_is_shown_by_health_the_api_and_the_page(tmp_path, browser):
    from playwright.sync_api import expect

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    env = tiny_model_env(tmp_path, INTERNLM_MODEL_PATH=str(empty))
    with one_port_server(env, tmp_path / "server.log") as url:
        deadline = time.monotonic() + 60
        while (health := requests.get(f"{url}/health", timeout=5)).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = health.json()
        assert health.status_code == 503 and body["status"] == "failed"
        assert "not a model directory" in body["error"] and "Retry" in body["what_to_do"]
        classic = requests.post(url, json={"prompt": "hi"}, timeout=10)
        assert classic.status_code == 503 and "Retry-After" not in classic.headers
        assert "not a model directory" in classic.json()["error"] and "doctor" in classic.json()["error"]
        page = browser.new_page()
        page.goto(url)
        expect(page.get_by_text("模型加载失败")).to_be_visible(timeout=30_000)
        expect(page.get_by_text("not a model directory")).to_be_hidden()  # the details wait behind the expander
        page.get_by_text("详细信息（英文）").click()
        expect(page.get_by_text("not a model directory")).to_be_visible()
        expect(page.get_by_role("button", name="重试")).to_be_visible()
        page.close()
