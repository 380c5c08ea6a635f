"""What every page does first: page config, settings, the password gate, the language switch and navigation."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import streamlit as st
from pydantic import ValidationError

from internlm_app.settings import Settings, describe_settings_error
from internlm_app.web import drafts, hosting
from internlm_app.web.auth import is_logged_in, login_gate, logout_control
from internlm_app.web.context import PageContext
from internlm_app.web.i18n import LANGUAGES, t

log = logging.getLogger(__name__)

LANG_PARAM = "lang"  # ?lang=en keeps the language across refreshes and in shared links
_LANG_KEY = "_lang"  # the session's language (not the widget's own state, which a page switch drops)

RUN_COMMAND = "python -m internlm_app serve"  # the web app, the API and one model on one port
PAGES_DIR = Path(__file__).with_name("views")  # not "pages": see server.APP_SCRIPT
CHAT_PAGE = PAGES_DIR / "chat.py"
# (script, title label, icon, URL path); the first is the default page, at "/". Absolute paths: the same pages serve
# from the package's entry script (`serve`) and from the checkout's app.py (`streamlit run app.py`).
PAGES = (
    (CHAT_PAGE, "nav_chat", ":material/chat:", ""),
    (PAGES_DIR / "status.py", "nav_status", ":material/monitor_heart:", "status"),
    (PAGES_DIR / "history.py", "nav_history", ":material/history:", "history"),
)
# A file, not ":material/chat:": Streamlit fetches a Material icon for the tab from fonts.gstatic.com, a request to
# elsewhere from every viewer's browser (and blocked on Chinese networks).
PAGE_ICON = str(Path(__file__).with_name("icon.png"))


def exit_unless_streamlit(script: str = "app.py") -> None:
    """`python app.py` does nothing useful: say how to start the web app instead."""
    from streamlit import runtime

    if not runtime.exists():
        sys.exit(
            f"{script} is a Streamlit page. Start the app from the repository root with:\n\n"
            f"    {RUN_COMMAND}    # the web app and the HTTP API on 0.0.0.0:6006, one model\n"
            "    streamlit run app.py            # the web app alone\n\n"
            "Set INTERNLM_WEB_PASSWORD to require a password (and INTERNLM_API_KEYS for the API)."
        )


def _first_language() -> str:
    """The language a new session starts in: the URL's `?lang=` (set by the switch), else Chinese."""
    asked = st.query_params.get(LANG_PARAM)
    return asked if asked in LANGUAGES else LANGUAGES[0]


def _keep_language() -> None:
    """The switch's choice, kept for the whole session (every page) and in the URL (a refresh, a copied link)."""
    st.session_state[_LANG_KEY] = st.session_state["lang"]
    st.query_params[LANG_PARAM] = st.session_state["lang"]


def _settings_or_none() -> Settings | None:
    hosted = hosting.current()
    try:
        return hosted.settings if hosted is not None else Settings()
    except ValidationError:
        return None  # the page itself says what is wrong


def navigate() -> None:
    """Run the page the URL names, with Streamlit's own navigation in the sidebar (titles in the session's language).

    Streamlit's links, unlike `st.page_link`, close the sidebar on a phone after a tap. Before the password gate
    opens (or with invalid settings) the links are hidden and the chat page shows the gate.
    """
    lang = st.session_state.get(_LANG_KEY) or _first_language()
    # The tab's icon is this file before the navigation names pages with Material icons: else the browser fetches
    # the page's icon from fonts.gstatic.com.
    st.set_page_config(page_icon=PAGE_ICON)
    settings = _settings_or_none()
    hosted = hosting.current()
    visible = settings is not None and is_logged_in(settings, hosted.login if hosted is not None else None)
    pages = [
        st.Page(path, title=t(label, lang), icon=icon, url_path=url or None, default=not url)
        for path, label, icon, url in PAGES
    ]
    st.navigation(pages, position="sidebar" if visible else "hidden").run()


def start_page(title_key: str) -> PageContext:
    """Set up the page; stops the script while the password gate is closed or the settings are invalid."""
    lang = st.session_state.setdefault(_LANG_KEY, _first_language())
    st.session_state["lang"] = lang  # the switch shows it on every page (a page switch drops widget state)
    if lang != LANGUAGES[0] and st.query_params.get(LANG_PARAM) != lang:
        st.query_params[LANG_PARAM] = lang  # back in the URL after a page switch, which drops it: a reload keeps it
    st.set_page_config(page_title=f"{t(title_key, lang)} · InternLM2 Chat", page_icon=PAGE_ICON, layout="centered")
    hosted = hosting.current()
    try:
        settings = hosted.settings if hosted is not None else Settings()
    except ValidationError as exc:
        log.error("invalid settings: %s", exc)
        # Before the password gate the details only go to the server log (values are never quoted, names are).
        details = "" if os.environ.get("INTERNLM_WEB_PASSWORD") else describe_settings_error(exc)
        st.error(t("settings_invalid", lang, error=details))
        st.stop()
    if not login_gate(settings, hosted.login if hosted is not None else None):
        st.stop()
    drafts.logged_in()
    if drafts.restore_typed():  # what this page had typed when it found its login gone
        st.info(t("draft_restored", lang))
    with st.sidebar:
        lang = st.radio(
            "语言 / Language",
            LANGUAGES,
            format_func=lambda code: t("language_name", code),
            key="lang",
            horizontal=True,
            persist_state="session",
            on_change=_keep_language,
        )
        logout_control(settings, t("logout", lang), hosted is not None and hosted.login is not None)
    return PageContext(settings, lang)


def queue_caption(ctx: PageContext, queue) -> str:
    """The engine's line: how many replies generate of how many at once, and how many wait."""
    if not queue.active:
        return ctx.t("queue_idle")
    return ctx.t("queue_active", active=queue.active, slots=queue.slots, waiting=queue.waiting())
