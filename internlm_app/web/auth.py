"""The optional password gate (INTERNLM_WEB_PASSWORD): nothing of the app renders before it lets the user in.

Web-only mode draws a login form in the page. The one-port server logs users in over HTTP (/login sets a cookie that
also guards media, downloads and uploads); the page then only checks that cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import threading
import time
from collections import deque
from urllib.parse import quote, urlencode, urlsplit

import streamlit as st

from internlm_app.settings import Settings
from internlm_app.web import drafts
from internlm_app.web.hosting import CookieCheck
from internlm_app.web.process_wide import process_wide

AUTH_KEY = "_web_authenticated"
FAILURE_DELAY_SECONDS = 0.5  # slows down password guessing within one session
FAILURE_LIMIT, FAILURE_WINDOW_SECONDS = 5, 60.0  # wrong passwords the whole process takes per window, from anyone


class LoginThrottle:
    """Wrong passwords across every session of the process: after `limit` of them within `window` seconds, nobody
    may try again until the oldest leaves the window. A new session or tab gets no fresh tries, so guessing runs at
    `limit` per `window` at most; the price is that someone guessing also delays a real login. Thread-safe."""

    def __init__(self, limit: int = FAILURE_LIMIT, window: float = FAILURE_WINDOW_SECONDS, clock=time.monotonic):
        self.limit, self.window, self._clock = limit, window, clock
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    def wait_seconds(self) -> float:
        """0 when a try is allowed now, else how long until one is."""
        with self._lock:
            now = self._clock()
            while self._failures and self._failures[0] <= now - self.window:
                self._failures.popleft()
            return 0.0 if len(self._failures) < self.limit else self._failures[0] + self.window - now

    def failed(self) -> None:
        with self._lock:
            self._failures.append(self._clock())


@process_wide
def _throttle(password_digest: str) -> LoginThrottle:
    return LoginThrottle()


def login_throttle(settings: Settings) -> LoginThrottle:
    """The process-wide throttle for the configured password (a new password starts afresh)."""
    secret = settings.web_password.get_secret_value() if settings.web_password else ""
    return _throttle(hashlib.sha256(secret.encode("utf-8")).hexdigest())


def password_matches(given: str, expected: str) -> bool:
    """Compare in constant time (no early exit on the first differing character)."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _here() -> str:
    """This page's path and query (`/history?lang=en&c=…`): where /login returns to."""
    path = urlsplit(st.context.url or "/").path or "/"
    query = urlencode(st.query_params.to_dict())
    return f"{path}?{query}" if query else path


def same_tab_link(label: str, path: str, primary: bool = False) -> None:
    """A link styled as a button that opens `path` in this tab (Streamlit's link button always opens a new tab,
    which would leave this one logged in)."""
    colours = "color:#fff;background:#ff4b4b;border-color:#ff4b4b" if primary else "color:inherit"
    st.html(
        f'<a href="{html.escape(path, quote=True)}" target="_self" style="display:inline-block;padding:.5rem .75rem;'
        "font-size:.875rem;line-height:1.6;border:1px solid rgba(49,51,63,.2);border-radius:.5rem;"
        f'text-decoration:none;{colours}">'
        f"{html.escape(label)}</a>"
    )


def logout_control(settings: Settings, label: str, hosted_login: bool) -> None:
    """A log-out control in the sidebar when a password is set: under `serve` a link to /logout in this tab (it
    revokes the login on the server and comes back to this page's login form), under `streamlit run` a button that
    forgets this session's login."""
    if settings.web_password is None:
        return
    if hosted_login:
        same_tab_link(label, f"/logout?next={quote(_here(), safe='')}")
    elif st.button(label, key="logout", icon=":material/logout:"):
        st.session_state.pop(AUTH_KEY, None)
        st.rerun()


def is_logged_in(settings: Settings, cookie_check: CookieCheck | None = None) -> bool:
    """True when no password is set, or this browser logged in (the one-port server's cookie, else this session)."""
    if settings.web_password is None:
        return True
    if cookie_check is not None:  # one-port server: the login is the /login cookie, checked again on every run
        return cookie_check.verify(st.context.cookies.get(cookie_check.cookie_name))
    return bool(st.session_state.get(AUTH_KEY))


def login_gate(settings: Settings, cookie_check: CookieCheck | None = None) -> bool:
    """True when no password is set or this session logged in; otherwise draw only the login form (or a link to it)."""
    if is_logged_in(settings, cookie_check):
        return True
    if cookie_check is not None:  # logged out in another tab, or the login expired while this page was open
        draft = drafts.keep_typed()  # a message sent in this run, an edit: back in its box after the login
        st.title("InternLM2 Chat")
        st.warning("已退出登录或登录已过期 / You are logged out, or your login has expired")
        if draft is not None:
            st.info(
                "你输入的内容已保留，重新登录后会放回原处 / What you typed is kept: it is put back after you log in"
            )
            st.query_params[drafts.DRAFT_PARAM] = draft  # (in this page's URL too: a reload of it finds it as well)
        back = _here()
        same_tab_link("登录 / Log in", f"/login?next={quote(back, safe='')}", primary=True)
        return False
    st.title("InternLM2 Chat")
    with st.form("login_form", border=False):  # a form: Enter in the password field logs in
        given = st.text_input("密码 / Password", type="password", key="password")
        submitted = st.form_submit_button("登录 / Log in", key="login", type="primary")
    if submitted:
        throttle = login_throttle(settings)
        if (wait := throttle.wait_seconds()) > 0:  # not even checked: a right guess would not show either
            st.error(f"密码错误次数过多，请 {wait:.0f} 秒后再试 / Too many wrong passwords: try again in {wait:.0f} s")
            return False
        if password_matches(given or "", settings.web_password.get_secret_value()):
            st.session_state[AUTH_KEY] = True
            del st.session_state["password"]
            st.rerun()
        throttle.failed()
        time.sleep(FAILURE_DELAY_SECONDS)
        st.error("密码错误 / Wrong password")
    return False
