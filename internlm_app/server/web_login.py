"""The one-port server's web login: a small HTML form at /login that sets a signed, HttpOnly cookie.

The cookie (not a Streamlit session) is what the web gate checks, so the password also guards what the page serves
over plain HTTP: media, downloads, uploads. Tokens are signed with a key made at start, so a restart logs everyone
out; wrong passwords share the process-wide limit of the web-only login (5 a minute).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from internlm_app.server.routing import LOGIN_PATH, LOGOUT_PATH, safe_next
from internlm_app.web.auth import FAILURE_DELAY_SECONDS, LoginThrottle, password_matches

COOKIE_NAME = "internlm_web"
SESSION_SECONDS = 7 * 24 * 3600  # a login lasts a week (or until the server restarts)
MAX_FORM_BYTES = 4096


class WebLogin:
    """Issues and checks login cookies for one password; serves /login and /logout. Thread-safe."""

    cookie_name = COOKIE_NAME

    def __init__(
        self,
        password: SecretStr,
        *,
        throttle: LoginThrottle | None = None,
        lifetime: float = SESSION_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self._password = password
        self._key = secrets.token_bytes(32)
        self.throttle = throttle or LoginThrottle()
        self.lifetime, self._clock = lifetime, clock

    def issue(self) -> str:
        """A new token: its expiry time and the HMAC of it."""
        expiry = str(int(self._clock() + self.lifetime))
        return f"{expiry}.{self._sign(expiry)}"

    def verify(self, token: object) -> bool:
        """True for a token this server issued that has not expired."""
        if not isinstance(token, str):
            return False
        expiry, _, signature = token.partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(signature.encode(), self._sign(expiry).encode()):
            return False
        return int(expiry) > self._clock()

    def _sign(self, expiry: str) -> str:
        return hmac.new(self._key, f"web-login:{expiry}".encode(), hashlib.sha256).hexdigest()

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
        response = RedirectResponse(LOGIN_PATH, status_code=303)
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
