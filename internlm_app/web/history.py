"""History page support: labels for conversations, lazy exports, import and delete callbacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial

import streamlit as st
from streamlit import runtime

from internlm_app.store import export, export_format
from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.store.records import ConversationSummary
from internlm_app.web import storage
from internlm_app.web.safe_markdown import plain

_UPLOADS_KEY = "_imports_done"
NOTICE_KEY = "_history_notice"  # (kind, text) shown once after a callback
# An export is a file in Streamlit's media store, served at /media/<id> to whoever has the URL (in web-only mode
# without the password; the one-port server checks the login cookie). The browser fetches it at once, so it is
# removed this many seconds after it was made instead of whenever Streamlit next cleans up.
EXPORT_LIFETIME_SECONDS = 10.0


def when(ts: float) -> str:
    """A timestamp in the server's local time, to the minute."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


FEEDBACK_FILTERS = (None, 1, 0)  # any, thumbs up, thumbs down: the History page's feedback filter


@storage.stops_on_fault
def find(ctx, store: ConversationStore, query: str, feedback: int | None = None) -> list[ConversationSummary]:
    """Every conversation matching `query` (all when it is blank), most recent first; with `feedback` (1 or 0) only
    those with a reply given that feedback."""
    if query.strip():
        return store.search(query, limit=None, feedback=feedback)
    return store.list_conversations(limit=None, feedback=feedback)


def feedback_label(t: Callable[..., str], value: int | None) -> str:
    return t({None: "feedback_any", 1: "feedback_up", 0: "feedback_down"}[value])


def describe(item: ConversationSummary, t: Callable[..., str]) -> str:
    """How a conversation is named in the picker: title, last update, message count (in the page's language)."""
    return f"{item.title or t('untitled')} · {when(item.updated_at)} · {t('message_count', n=item.message_count)}"


@storage.stops_on_fault
def backup_kind(ctx, store: ConversationStore) -> str:
    """How "Export all" makes its JSON: "json", one file, when everything fits what one import takes; else "zip", a
    ZIP of exports that imports whole (a backup must always import again)."""
    return "json" if export.fits_one_file(store) else "zip"


def exporter(
    store: ConversationStore, kind: str, cids: list[str] | None = None, gone: str = ""
) -> Callable[[], str | bytes]:
    """A zero-argument callable for st.download_button, so the export runs only when the user clicks (`kind`: json,
    md, or zip: every conversation, as export_archive); the file it makes is removed from the media store
    EXPORT_LIFETIME_SECONDS later. A conversation deleted meanwhile (another tab) gives a file that says so: `gone`
    as Markdown, an export without it as JSON (the click cannot show a message on the page)."""
    if kind == "zip":
        make: Callable[[], str | bytes] = partial(export.export_archive, store)
    else:
        make = partial(export.export_json if kind == "json" else export.export_markdown, store, cids)

    def export_once() -> str | bytes:
        try:
            text = make()
        except KeyError:  # export._load: a conversation named in `cids` was deleted
            text = gone if kind == "md" else export.export_json(store, [])
        if runtime.exists():
            manager = runtime.get_instance().media_file_mgr
            timer = threading.Timer(EXPORT_LIFETIME_SECONDS, remove_unreferenced_media, args=(manager,))
            timer.daemon = True
            timer.start()
        return text

    return export_once


def remove_unreferenced_media(manager) -> None:
    """Drop the media files no session's page shows (a made export is one: the page only holds its button).
    Streamlit deletes a download in two passes (marked, then deleted), hence two calls."""
    manager.remove_orphaned_files()
    manager.remove_orphaned_files()


def file_name(kind: str, cid: str | None = None) -> str:
    stem = f"conversation-{cid}" if cid else f"conversations-{time.strftime('%Y%m%d-%H%M')}"
    return f"{stem}.{kind}"


def upload_key() -> str:
    """The uploader's key: a new one after each import, so a file once tried is never imported again by mistake."""
    return f"import_file_{st.session_state.get(_UPLOADS_KEY, 0)}"


def import_upload(store: ConversationStore, t: Callable[..., str], skip_existing: bool) -> None:
    """on_click of the import button: validate and import the uploaded file (all or nothing), say what happened, and
    empty the uploader. Without a file it says to choose one."""
    upload = st.session_state.get(upload_key())
    if upload is None:
        st.session_state[NOTICE_KEY] = ("warning", t("import_no_file"))
        return
    st.session_state[_UPLOADS_KEY] = st.session_state.get(_UPLOADS_KEY, 0) + 1
    try:
        ids = export.import_json(store, upload.getvalue(), skip_existing=skip_existing)
    except export_format.ImportValidationError as exc:  # it may quote the file: plain text
        # One translated sentence; the English detail (it may quote the file: plain text) behind an expander.
        st.session_state[NOTICE_KEY] = ("error", t(f"import_error_{exc.reason}"), plain(str(exc)))
    except StoreFault as fault:  # shown at the top of the page, which runs right after this callback
        storage.remember(fault)
    else:
        done = t("imported", n=len(ids)) + (t("import_skipped", n=ids.skipped) if ids.skipped else "")
        st.session_state[NOTICE_KEY] = ("success", done)


def keep_selection_valid(key: str, options: list[str], armed_key: str) -> None:
    """Before the picker is drawn: a selection no longer among the options (a search that found nothing, then
    cleared; a filter) falls back to the first option, so the row of actions comes back. Any change of selection
    switches the `armed_key` toggle (Delete) off, as a choice in the picker does: an armed delete never moves to
    another conversation."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0] if options else None
        st.session_state[armed_key] = False


def delete(store: ConversationStore, cid: str, done: str, toggle_key: str) -> None:
    """on_click of the confirmed delete button; the confirmation toggle goes back off."""
    try:
        store.delete(cid)
    except StoreFault as fault:
        storage.remember(fault)
        return
    st.session_state[toggle_key] = False
    st.session_state[NOTICE_KEY] = ("success", done)


def reset(key: str) -> None:
    """on_change helper: switch a toggle off (a new selection must be confirmed again)."""
    st.session_state[key] = False


def show_notice(details_label: str) -> None:
    """The message left by the last callback, once; its details (if any) behind an expander named `details_label`."""
    notice = st.session_state.pop(NOTICE_KEY, None)
    if notice:
        kind, text, *details = notice
        getattr(st, kind)(text)
        if details:
            with st.expander(details_label):
                st.text(details[0])
