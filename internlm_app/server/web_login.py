"""The one-port server's web login: a small HTML form at /login that sets a signed, HttpOnly cookie.

The cookie (not a Streamlit session) is what the web gate checks, so the password also guards what the page serves
over plain HTTP: media, downloads, uploads. Tokens are signed with a key made from a random secret kept beside the
conversations database and the password, so a restart keeps everyone logged in (an open tab reconnects) and a new
password logs everyone out. /logout revokes the token on the server too (kept in the same file until it expires), so a
copied cookie and the other tabs of that browser are logged out as well. Wrong passwords share the process-wide limit
of the web-only login (5 a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, quote

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from internlm_app.server.routing import LOGIN_PATH, LOGOUT_PATH, safe_next
from internlm_app.web.auth import FAILURE_DELAY_SECONDS, LoginThrottle, password_matches

log = logging.getLogger(__name__)

COOKIE_NAME = "internlm_web"
SESSION_SECONDS = 7 * 24 * 3600  # a login lasts a week, or until it logs out or the password changes
MAX_FORM_BYTES = 4096
STATE_FILE = "web_login.json"  # beside the conversations database: the signing secret and the revoked tokens


class WebLogin:
    """Issues and checks login cookies for one password; serves /login and /logout. Thread-safe."""

    cookie_name = COOKIE_NAME

    def __init__(
        self,
        password: SecretStr,
        *,
        state_file: Path | None = None,
        throttle: LoginThrottle | None = None,
        lifetime: float = SESSION_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        """`state_file` keeps the signing secret and the revoked tokens across restarts (None: this process only)."""
        self._password = password
        self._state_file, self._lock = state_file, threading.Lock()
        loaded = self._load_state()
        # A new password gets a new secret: the logins of the old one stay out even if it comes back later.
        if loaded is not None and not hmac.compare_digest(loaded[2], self._password_check(loaded[0])):
            log.info("the web password changed: every earlier login has ended")
            loaded = None
        self._secret, self._revoked = (loaded[0], loaded[1]) if loaded else (secrets.token_bytes(32), {})
        self._save_state()  # a new secret, or the same one in an owner-only file
        # The password is part of the key as well.
        secret, word = self._secret, password.get_secret_value().encode()
        self._key = hmac.new(secret, b"web-login-key:" + word, hashlib.sha256).digest()
        self.throttle = throttle or LoginThrottle()
        self.lifetime, self._clock = lifetime, clock

    def issue(self) -> str:
        """A new token: `<id>.<expiry>.<HMAC of both>`; the id is what a logout revokes."""
        body = f"{secrets.token_hex(8)}.{int(self._clock() + self.lifetime)}"
        return f"{body}.{self._sign(body)}"

    def verify(self, token: object) -> bool:
        """True for a token this server issued that has not expired and was not logged out."""
        parts = self._parts(token)
        if parts is None:
            return False
        token_id, expiry = parts
        with self._lock:
            return expiry > self._clock() and token_id not in self._revoked

    def revoke(self, token: object) -> None:
        """Log a token out for good (every tab and copy of it); an invalid token is ignored."""
        parts = self._parts(token)
        if parts is None:
            return
        with self._lock:
            now = self._clock()
            self._revoked = {i: e for i, e in self._revoked.items() if e > now}  # expired ones fail anyway
            self._revoked[parts[0]] = parts[1]
            self._save_state()

    def _parts(self, token: object) -> tuple[str, int] | None:
        """(id, expiry) of a token signed with this key; None for anything else."""
        if not isinstance(token, str):
            return None
        body, _, signature = token.rpartition(".")
        token_id, _, expiry = body.partition(".")
        if not token_id or not expiry.isdigit():
            return None
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        return token_id, int(expiry)

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, f"web-login:{body}".encode(), hashlib.sha256).hexdigest()

    def _password_check(self, secret: bytes) -> str:
        """What the state file keeps to tell whether the password changed (an HMAC: not the password)."""
        word = self._password.get_secret_value().encode()
        return hmac.new(secret, b"web-login-password:" + word, hashlib.sha256).hexdigest()

    def _load_state(self) -> tuple[bytes, dict[str, int], str] | None:
        """The secret, revoked tokens and password check from the state file; None when there is none or it is
        damaged (a new secret then replaces it, logging everyone out, with a warning)."""
        if self._state_file is None or not self._state_file.exists():
            return None
        try:
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
            secret = bytes.fromhex(state["secret"])
            revoked = {str(i): int(e) for i, e in state.get("revoked", {}).items()}
            if len(secret) == 32:
                return secret, revoked, str(state.get("password_check", ""))
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            log.warning("%s cannot be read (%s): web logins start afresh", self._state_file, exc)
            return None
        log.warning("%s holds no usable secret: web logins start afresh", self._state_file)
        return None

    def _save_state(self) -> None:
        """Write the secret and revoked tokens (owner-only file, replaced whole); a file that cannot be written
        leaves logins to this process, with a warning."""
        if self._state_file is None:
            return
        state = {
            "secret": self._secret.hex(),
            "password_check": self._password_check(self._secret),
            "revoked": self._revoked,
        }
        partial = self._state_file.with_name(self._state_file.name + ".partial")
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            partial.unlink(missing_ok=True)  # made anew, so that its mode is ours
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the secret: owner only
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(state, out)
            os.replace(partial, self._state_file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)  # never a copy of the secret left behind
            log.warning("cannot keep web logins in %s (%s): a restart will log everyone out", self._state_file, exc)

    def routes(self) -> list[Route]:
        return [Route(LOGIN_PATH, self.login, methods=["GET", "POST"]), Route(LOGOUT_PATH, self.logout)]

    async def login(self, request: Request) -> Response:
        """GET: the form. POST: check the password (rate-limited), set the cookie and go back where the user was."""
        target = safe_next(request.query_params.get("next"))
        if request.method == "GET":
            if self.verify(request.cookies.get(COOKIE_NAME)):
                return RedirectResponse(target, status_code=303)
            return login_page(target)
        body = await _read_form(request)
        if body is None:
            return login_page(target, "表单过大 / The form is too large", status=413)
        target = safe_next(body.get("next", target))
        if (wait := self.throttle.wait_seconds()) > 0:  # not even checked: a right guess would not show either
            message = f"密码错误次数过多，请 {wait:.0f} 秒后再试 / Too many wrong passwords: try again in {wait:.0f} s"
            return login_page(target, message, status=429, headers={"Retry-After": str(int(wait) + 1)})
        if not password_matches(body.get("password", ""), self._password.get_secret_value()):
            self.throttle.failed()
            await asyncio.sleep(FAILURE_DELAY_SECONDS)
            return login_page(target, "密码错误 / Wrong password", status=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            self.issue(),
            max_age=int(self.lifetime),
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        """Revoke this browser's token on the server, clear the cookie, and show the login form (which returns to
        `next`, so the page's language and conversation are kept)."""
        self.revoke(request.cookies.get(COOKIE_NAME))
        target = safe_next(request.query_params.get("next"))
        response = RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='')}", status_code=303)
        response.delete_cookie(COOKIE_NAME, httponly=True, samesite="lax")
        return response


async def _read_form(request: Request) -> dict[str, str] | None:
    """The urlencoded form's first value per field, or None when the body is over MAX_FORM_BYTES."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def login_page(target: str, error: str = "", status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """The login form: bilingual like the app, readable on a phone, no script and nothing loaded from elsewhere."""
    notice = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    page = _PAGE.format(next=html.escape(target, quote=True), notice=notice)
    headers = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", **(headers or {})}
    return HTMLResponse(page, status_code=status, headers=headers)


_PAGE = """<!doctype html>
<html lang="zh">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>登录 / Log in · InternLM2 Chat</title>
<style>
  body {{ font-family: "Source Sans Pro", "Noto Sans CJK SC", sans-serif; background: #fff; color: #31333f;
         display: flex; justify-content: center; margin: 0; padding: 12vh 1rem 0; }}
  main {{ width: 100%; max-width: 22rem; }}
  h1 {{ font-size: 1.75rem; margin: 0 0 1.5rem; }}
  label {{ display: block; font-size: .875rem; margin-bottom: .4rem; }}
  input[type=password] {{ box-sizing: border-box; width: 100%; padding: .6rem .75rem; font-size: 1rem;
         border: 1px solid #d5d6da; border-radius: .5rem; background: #f0f2f6; }}
  button {{ margin-top: 1rem; padding: .55rem 1.1rem; font-size: 1rem; color: #fff; background: #ff4b4b;
           border: 0; border-radius: .5rem; cursor: pointer; }}
  .error {{ color: #7d353b; background: #ffecec; padding: .75rem 1rem; border-radius: .5rem; }}
</style>
</head>
<body>
<main>
<h1>InternLM2 Chat</h1>
{notice}
<form method="post" action="/login">
  <input type="hidden" name="next" value="{next}">
  <label for="password">密码 / Password</label>
  <input type="password" id="password" name="password" autocomplete="current-password" autofocus required>
  <button type="submit">登录 / Log in</button>
</form>
</main>
</body>
</html>
"""
