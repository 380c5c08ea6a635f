"""The one-port server's parts in-process: which requests go to the API, the web login and its gate, the API over a
shared loader (503 while loading, the failure, then the real engine), and exports leaving the media store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient as StarletteClient
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

from internlm_app.api import create_app
from internlm_app.backends.factory import BackendLoader
from internlm_app.load_progress import LoadStep
from internlm_app.runtime.loader import ModelLoadError
from internlm_app.server.routing import WebGate, api_mounts, api_paths, is_api_request, safe_next
from internlm_app.server.web_login import COOKIE_NAME, WebLogin
from internlm_app.web import history
from internlm_app.web.auth import LoginThrottle
from tests.api_helpers import API_KEY, api_settings
from tests.app_helpers import ROOT

PASSWORD = "correct horse"


def test_api_requests_are_told_from_the_page_by_method_and_path(tmp_path):
    app = create_app(api_settings(tmp_path))
    paths, prefixes = api_paths(app), api_mounts(app)
    assert {"/health", "/metrics", "/v1/chat/completions", "/v1/models", "/docs", "/openapi.json"} <= paths
    api = [("POST", "/"), ("OPTIONS", "/"), ("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")]
    api += [("GET", "/v1/models"), ("GET", "/v1/anything"), ("GET", "/v1"), ("GET", "/docs"), ("GET", "/redoc")]
    api += [("GET", "/static-offline-docs/swagger-ui-bundle.js")]  # the offline docs' assets
    web = [("GET", "/"), ("HEAD", "/"), ("GET", "/status"), ("GET", "/history"), ("GET", "/_stcore/health")]
    web += [("GET", "/media/abc.json"), ("POST", "/_stcore/upload_file/a/b"), ("GET", "/v1x"), ("GET", "/login")]
    assert all(is_api_request(method, path, paths, prefixes) for method, path in api)
    assert not any(is_api_request(method, path, paths, prefixes) for method, path in web)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/history?c=abc", "/history?c=abc"),
        (None, "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/logout", "/"),
        ("/logout/", "/"),
        ("/login/?next=/x", "/"),
        ("/login?next=/x", "/"),
    ],
)
def test_after_login_the_user_goes_back_only_to_a_path_of_this_server(given, expected):
    assert safe_next(given) == expected


def test_login_tokens_are_signed_expire_and_belong_to_one_server():
    now = [1000.0]
    login = WebLogin(SecretStr(PASSWORD), lifetime=60, clock=lambda: now[0])
    token = login.issue()
    assert login.verify(token)
    token_id, expiry, signature = token.split(".")
    assert not login.verify(f"{token_id}.{int(expiry) + 3600}.{signature}")  # a later expiry, the old signature
    assert not login.verify(f"other.{expiry}.{signature}")
    assert not login.verify(None) and not login.verify("") and not login.verify("garbage") and not login.verify(b"x")
    assert not WebLogin(SecretStr(PASSWORD)).verify(token)  # a server without the state file made another key
    now[0] += 61
    assert not login.verify(token)


def test_logins_survive_a_restart_and_end_with_a_logout_or_a_new_password(tmp_path):
    state = tmp_path / "web_login.json"
    first = WebLogin(SecretStr(PASSWORD), state_file=state)
    kept, logged_out = first.issue(), first.issue()
    assert state.stat().st_mode & 0o777 == 0o600  # the signing secret: owner only
    first.revoke(logged_out)
    assert first.verify(kept) and not first.verify(logged_out)
    restarted = WebLogin(SecretStr(PASSWORD), state_file=state)  # an open tab reconnects after a restart
    assert restarted.verify(kept) and not restarted.verify(logged_out)  # and a logout stays a logout
    assert not WebLogin(SecretStr("a new password"), state_file=state).verify(kept)
    assert not WebLogin(SecretStr(PASSWORD), state_file=state).verify(kept)  # the old password back: still out
    state.chmod(0o644)
    WebLogin(SecretStr(PASSWORD), state_file=state)
    assert state.stat().st_mode & 0o777 == 0o600  # made owner-only again at start
    state.write_text("{damaged")
    fresh = WebLogin(SecretStr(PASSWORD), state_file=state)  # a damaged file: a new secret, everyone logs in again
    assert not fresh.verify(kept) and fresh.verify(fresh.issue())
    (tmp_path / "a_file").write_text("")  # the state file's folder cannot be made: logins last for this process
    unwritable = WebLogin(SecretStr(PASSWORD), state_file=tmp_path / "a_file" / "web_login.json")
    assert unwritable.verify(unwritable.issue())
    (tmp_path / "a_folder.json").mkdir()  # the file's place taken by a folder: no copy of the secret left beside
    WebLogin(SecretStr(PASSWORD), state_file=tmp_path / "a_folder.json")
    assert not (tmp_path / "a_folder.json.partial").exists()


def _gated_web_app(login: WebLogin) -> Starlette:
    async def page(_request):
        return PlainTextResponse("the app")

    routes = [*login.routes(), Route("/", page), Route("/media/{name}", page), Route("/_stcore/metrics", page)]
    return Starlette(routes=routes, middleware=[Middleware(WebGate, login=login)])


def test_the_web_gate_and_the_login_form():
    login = WebLogin(SecretStr(PASSWORD), throttle=LoginThrottle(limit=2, window=60))
    with StarletteClient(_gated_web_app(login), follow_redirects=False) as client:
        page = client.get("/?c=1", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F%3Fc%3D1"
        assert client.get("/media/x.json").status_code == 401
        assert client.get("/_stcore/metrics").status_code == 404
        form = client.get("/login?next=/history")
        assert form.status_code == 200 and 'value="/history"' in form.text and 'type="password"' in form.text

        wrong = client.post("/login", data={"password": "wrong", "next": "/history"})
        assert wrong.status_code == 401 and "Wrong password" in wrong.text and COOKIE_NAME not in wrong.cookies
        right = client.post("/login", data={"password": PASSWORD, "next": "/history"})
        assert right.status_code == 303 and right.headers["location"] == "/history"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=604800" in cookie
        assert client.get("/media/x.json").text == "the app"  # the client now sends the cookie
        assert client.get("/_stcore/metrics").status_code == 404  # closed with a login too
        token = client.cookies[COOKIE_NAME]
        out = client.get("/logout?next=/history%3Flang%3Den")  # back to the page's language after the next login
        assert out.headers["location"] == "/login?next=%2Fhistory%3Flang%3Den"
        assert client.get("/media/x.json").status_code == 401
        client.cookies.set(COOKIE_NAME, token)  # a copy of the cookie (another tab's session): revoked too
        assert client.get("/media/x.json").status_code == 401 and not login.verify(token)
        client.cookies.clear()

        assert client.post("/login", data={"password": "wrong again"}).status_code == 401
        limited = client.post("/login", data={"password": PASSWORD})  # 2 wrong a minute: even the right one waits
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        assert client.post("/login", content=b"password=" + b"x" * 5000).status_code == 413


def test_the_api_over_a_shared_loader_says_loading_then_failed_then_serves(engine, tmp_path):
    attempts, release = [], threading.Event()

    def create(settings, progress=None):
        attempts.append(1)
        progress(LoadStep("convert", 1, 4, detail="pytorch_model-00002-of-00008.bin"))
        release.wait(30)
        if len(attempts) == 1:
            raise ModelLoadError("no CUDA GPU visible: check nvidia-smi")
        return engine

    settings = api_settings(tmp_path, api_keys=[API_KEY])
    loader = BackendLoader(settings, create=create)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with TestClient(create_app(settings, loader=loader)) as client:  # the lifespan starts the load, and waits not
        assert client.get("/health").json() == {"status": "loading", "model_loaded": False}
        health = client.get("/health", headers=auth).json()
        step = "converting the checkpoint: shard 1/4 (pytorch_model-00002-of-00008.bin)"
        assert health["step"] == step and health["status"] == "loading"
        busy = client.post("/", json={"prompt": "hi"}, headers=auth)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
        assert "converting the checkpoint" in busy.json()["error"]
        models = client.get("/v1/models", headers=auth)
        assert models.status_code == 503 and models.json()["error"]["code"] == "model_loading"
        assert client.post("/", json={"prompt": "hi"}).status_code == 401  # the key is checked first

        release.set()
        while loader.status().state == "loading":
            time.sleep(0.01)
        failed = client.get("/health", headers=auth)
        assert failed.status_code == 503 and failed.json()["error"] == "no CUDA GPU visible: check nvidia-smi"
        assert client.get("/health").json() == {"status": "failed", "model_loaded": False}
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        refused = client.post("/v1/chat/completions", json=chat, headers=auth)
        assert refused.status_code == 503 and "Retry-After" not in refused.headers
        assert "nvidia-smi" in refused.json()["error"]["message"] and "Retry" in refused.json()["error"]["message"]

        loader.retry()  # what the page's Retry button does
        while loader.status().state == "loading":
            time.sleep(0.01)
        reply = client.post("/", json={"prompt": "你好", "max_new_tokens": 4}, headers=auth)
        assert reply.status_code == 200 and reply.json()["response"]
        assert client.get("/health", headers=auth).json()["model"] == engine.info.name
        assert len(attempts) == 2


def test_a_made_export_leaves_the_media_store():
    manager = MediaFileManager(MemoryMediaFileStorage("/media"))
    placeholder = manager.add_deferred(lambda: "export", "application/json", "coords", file_name="all.json")
    url = manager.execute_deferred(placeholder)
    file_id = url.rsplit("/", 1)[1].split(".")[0]
    assert manager.read_file(file_id) is not None
    history.remove_unreferenced_media(manager)
    assert manager.read_file(file_id) is None
    assert manager.execute_deferred(placeholder)  # the button still works: a click makes the file again


def test_under_serve_a_page_without_the_login_cookie_shows_only_the_way_to_log_in(app_env):
    from internlm_app.settings import Settings
    from internlm_app.web.hosting import Hosting, hosting
    from tests.app_helpers import run_page, texts

    def never(settings, progress=None):
        raise AssertionError("a page without the login must not touch the model")

    settings = Settings(web_password=PASSWORD)
    loader = BackendLoader(settings, create=never)
    with hosting(Hosting(settings, loader, WebLogin(SecretStr(PASSWORD)))):
        at = run_page()  # AppTest sends no cookie, like a websocket that got past no gate
    assert "logged out" in texts(at.warning) and not at.chat_input and not at.text_input
    (link,) = [h.proto.body for h in at.get("html")]  # the way to log in opens here, not in a new tab
    assert 'href="/login?next=%2F"' in link and 'target="_self"' in link
    assert loader.status().state == "idle"


def test_serve_applies_the_apps_streamlit_options_wherever_it_starts(tmp_path):
    # An installed package run from another directory has no .streamlit/config.toml beside it: serve sets the app's
    # options itself (upload limit, no tracebacks for users, ...), keeping any option the user's own config sets.
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "config.toml").write_text("[server]\nmaxUploadSize = 7\n")
    code = (
        "from streamlit import config; from internlm_app.server import apply_streamlit_config; "
        "applied = apply_streamlit_config(); "
        "print(config.get_option('server.maxUploadSize'), config.get_option('client.showErrorDetails'), "
        "config.get_option('client.showSidebarNavigation'), 'server.maxUploadSize' in applied)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "none", "True", "False"]


def test_no_folder_named_pages_beside_the_entry_script():
    """Streamlit runs a script of a `pages/` folder beside the entry script directly on the first visit to its URL
    after a start (its old multipage mode), without our navigation: the sidebar listed "app, chat, history,
    status", untranslated (seen on a screenshot of /history). The pages live in web/views/."""
    from internlm_app.server import APP_SCRIPT
    from internlm_app.web.page import PAGES

    assert not (APP_SCRIPT.parent / "pages").exists()
    assert all(path.exists() and path.parent.name == "views" for path, *_ in PAGES)


def test_what_a_page_had_typed_when_its_login_went_is_put_back_after_the_login(app_env):
    """Logged out in another tab (or the login expired): the message sent in the run the gate refuses is not lost.
    It is kept in the process under an id the way back to /login names, and put back in the chat box when the page
    opens again logged in: once, and only there. A page that was never logged in keeps nothing."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    from internlm_app.settings import Settings
    from internlm_app.web import drafts
    from internlm_app.web.hosting import Hosting, hosting
    from internlm_app.web.i18n import t
    from tests.app_helpers import run_page, send, texts

    class Login:  # the one-port server's cookie check, its verdict set here (AppTest sends no cookie)
        cookie_name = COOKIE_NAME
        valid = True

        def verify(self, token: object) -> bool:
            return self.valid

    def way_back(at) -> tuple[str, dict[str, str]]:
        (link,) = [h.proto.body for h in at.get("html")]
        target = unquote(link.split('href="/login?next=', 1)[1].split('"', 1)[0])
        return urlsplit(target).path, dict(parse_qsl(urlsplit(target).query))

    settings, login = Settings(web_password=PASSWORD), Login()
    with hosting(Hosting(settings, BackendLoader(settings), login)):
        at = run_page()
        login.valid = False  # logged out in another tab
        at.chat_input(key="prompt").set_value("typed before the logout").run()
        assert "logged out" in texts(at.warning) and not at.chat_message  # nothing was sent
        path, query = way_back(at)
        assert path == "/" and drafts.DRAFT_PARAM in query
        assert at.query_params[drafts.DRAFT_PARAM] == query[drafts.DRAFT_PARAM]  # this page's URL names it too
        at.run()  # a later refused run (the box is gone from the page) keeps naming the same draft
        assert way_back(at)[1] == query
        reloaded = run_page(query=query)  # a reload of this tab, still logged out: its login link names it still
        assert way_back(reloaded)[1] == query
        login.valid = True  # logged in again: /login sends the browser to `next`, a new page
        again = run_page(query=query)
        assert again.chat_input(key="prompt").proto.value == "typed before the logout"
        assert t("draft_restored", "zh") in texts(again.info) and drafts.DRAFT_PARAM not in again.query_params
        assert not again.chat_message  # still not sent: the user sends it
        assert run_page(query=query).chat_input(key="prompt").proto.value == ""  # taken back once only
        again.chat_input(key="prompt").set_value("typed before the logout").run()  # sent, once back in its box
        login.valid = False
        again.run()
        assert drafts.DRAFT_PARAM not in way_back(again)[1] and not again.info  # nothing of it is kept again
        login.valid = True
        again.run()
        # The same for an edit of a sent message: it opens again in its box, with its text.
        send(again, "hello")
        again.button(key="edit_last").click().run()
        again.text_area(key="edit_text").set_value("hello, edited")
        login.valid = False
        again.button(key="edit_send").click().run()
        path, query = way_back(again)
        login.valid = True
        edited = run_page(query=query)
        assert edited.text_area(key="edit_text").value == "hello, edited" and len(edited.chat_message) == 4
        login.valid = False
        stranger = run_page()  # never logged in: nothing of it is kept
        assert drafts.DRAFT_PARAM not in way_back(stranger)[1]
