"""When the conversation database fails as a file: say what, where and what to do; keep what the user typed.

A read-only database or a full disk still lets every page read; a write that fails shows the reason at the top of
the page on a rerun, with the typed text back in its box. A damaged file is never written to: the page offers a
fresh database beside it instead.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import streamlit as st

from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.web.context import PageContext
from internlm_app.web.process_wide import process_wide
from internlm_app.web.resources import conversation_store
from internlm_app.web.safe_markdown import code_span, plain

P = ParamSpec("P")
R = TypeVar("R")

_FAULT_KEY = "_store_fault"  # (kind, path, detail) of a failed write, shown once at the top of the next run
_KEEP_KEY = "_store_keep"  # {widget key: text} put back into their widgets on the next run
DETAIL_CHARS = 300


class FreshDatabases:
    """Which configured database paths this process has replaced by a fresh file beside them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[Path, Path] = {}

    def use(self, configured: Path, fresh: Path) -> None:
        with self._lock:
            self._paths[configured] = fresh

    def path_for(self, configured: Path) -> Path:
        with self._lock:
            return self._paths.get(configured, configured)


@process_wide
def fresh_databases() -> FreshDatabases:
    return FreshDatabases()


def fresh_path(path: Path) -> Path:
    """Where a fresh database goes beside a damaged one (the damaged file keeps its name and bytes)."""
    return path.with_name(f"{path.stem}-fresh{path.suffix or '.db'}")


def configured_path(ctx: PageContext) -> Path:
    return Path(ctx.settings.db_path).expanduser()


def open_store(ctx: PageContext) -> ConversationStore:
    """The store every session shares; a database that cannot be opened stops the page with what to do."""
    configured = configured_path(ctx)
    path = fresh_databases().path_for(configured)
    try:
        store = conversation_store(ctx.settings.model_copy(update={"db_path": path}))
    except StoreFault as fault:
        show_fault(ctx, fault)
        st.stop()
    if path != configured:
        st.info(ctx.t("store_fresh_in_use", path=code_span(str(path)), damaged=code_span(str(configured))))
    _show_last_write_fault(ctx)
    return store


def _show_last_write_fault(ctx: PageContext) -> None:
    """The failed write of the previous run (once), and its typed text back in the box it came from."""
    fault = st.session_state.pop(_FAULT_KEY, None)
    if fault is not None:
        show_fault(ctx, StoreFault(*fault))
    kept = st.session_state.pop(_KEEP_KEY, {})
    for key, text in kept.items():
        st.session_state[key] = text
    if kept:
        st.caption(ctx.t("store_kept"))


def message(ctx: PageContext, fault: StoreFault) -> str:
    """What went wrong with the database, where, and what to do, in the page's language."""
    detail = fault.detail if len(fault.detail) <= DETAIL_CHARS else fault.detail[: DETAIL_CHARS - 1] + "…"
    return ctx.t(
        f"store_{fault.kind}",
        path=code_span(str(fault.path)),
        detail=plain(detail),
        fresh=code_span(str(fresh_path(fault.path))),
    )


def show_fault(ctx: PageContext, fault: StoreFault) -> None:
    """The fault as an error box; for a damaged file, a button that starts a fresh database beside it."""
    st.error(message(ctx, fault), icon=":material/database:")
    configured = configured_path(ctx)
    if fault.kind == "corrupt" and fault.path == configured:  # a damaged fresh database gets no further offer
        st.button(
            ctx.t("store_start_fresh"),
            key="store_start_fresh",
            type="primary",
            on_click=fresh_databases().use,
            args=(configured, fresh_path(configured)),
        )


def stops_on_fault(step: Callable[P, R]) -> Callable[P, R]:
    """Decorate a page step (its first argument the PageContext) that reads the store: a fault shows what to do
    and ends this run of the page."""

    @functools.wraps(step)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        except StoreFault as fault:
            show_fault(args[0], fault)  # type: ignore[arg-type]
            st.stop()

    return guarded


def remember(fault: StoreFault, keep: dict[str, str] | None = None) -> None:
    """Show `fault` at the top of the next run, with `keep` ({widget key: text}) back in those widgets.

    Callbacks use it directly: they run just before the page, which then shows the fault."""
    st.session_state[_FAULT_KEY] = (fault.kind, fault.path, fault.detail)
    if keep:
        st.session_state[_KEEP_KEY] = dict(keep)


@contextmanager
def writing(keep: dict[str, str] | None = None) -> Iterator[None]:
    """Around a write of the page: if the file fails, rerun the page with the reason on top and `keep` back in
    its widgets, so a typed message is never lost."""
    try:
        yield
    except StoreFault as fault:
        remember(fault, keep)
        st.rerun()
