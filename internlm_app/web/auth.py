"""The optional password gate (INTERNLM_WEB_PASSWORD): nothing of the app renders before it lets the user in."""

from __future__ import annotations

import hmac
import time

import streamlit as st

from ..settings import Settings

AUTH_KEY = "_web_authenticated"
FAILURE_DELAY_SECONDS = 0.5  # slows down password guessing


def password_matches(given: str, expected: str) -> bool:
    """Compare in constant time (no early exit on the first differing character)."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def login_gate(settings: Settings) -> bool:
    """True when no password is set or this session logged in; otherwise draw only the login form."""
    if settings.web_password is None or st.session_state.get(AUTH_KEY):
        return True
    st.title("InternLM2 Chat")
    given = st.text_input("密码 / Password", type="password", key="password")
    if st.button("登录 / Log in", key="login", type="primary"):
        if password_matches(given or "", settings.web_password.get_secret_value()):
            st.session_state[AUTH_KEY] = True
            del st.session_state["password"]
            st.rerun()
        time.sleep(FAILURE_DELAY_SECONDS)
        st.error("密码错误 / Wrong password")
    return False
