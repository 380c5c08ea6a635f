"""The model load as the page shows it: each step translated with its real progress (bytes, shards), and a failure
as one translated sentence with what to do, the English details behind an expander, and a retry button."""

from __future__ import annotations

import time

import streamlit as st

from internlm_app.backends.factory import BackendLoader, LoadStatus
from internlm_app.chat_types import ChatBackend
from internlm_app.load_progress import LoadStep, human_bytes
from internlm_app.web.context import PageContext

POLL_SECONDS = 0.25


def step_text(ctx: PageContext, step: LoadStep | None) -> str:
    """The step in the page's language: `load_step_<stage>` filled with sizes, counts and the file name."""
    if step is None:
        return ctx.t("loading_start")
    values = {"detail": step.detail, "done": step.done, "total": step.total}
    if step.stage == "download":
        size = human_bytes(step.done)
        values["size"] = ctx.t("load_of", done=size, total=human_bytes(step.total)) if step.total else size
        values["files"] = f"{step.files_done}/{step.files_total}" if step.files_total else "…"
    return ctx.t(f"load_step_{step.stage}", **values)


def show_progress(ctx: PageContext, box, status: LoadStatus) -> None:
    """A bar where the step has a real fraction (download bytes, converted shards), else the step and the time."""
    text = ctx.t("loading_model", seconds=int(status.elapsed), step=step_text(ctx, status.progress))
    fraction = status.progress.fraction if status.progress else None
    with box.container():
        if fraction is None:
            st.info(text, icon=":material/hourglass_top:")
        else:
            st.progress(fraction, text=text)


def show_failure(ctx: PageContext, status: LoadStatus) -> None:
    """One translated sentence with what to do; the English message behind an expander; a retry button."""
    st.error(ctx.t(f"load_error_{status.error_reason or 'unexpected'}"))
    with st.expander(ctx.t("load_error_details")):
        st.code(status.error or "", language=None, wrap_lines=True)
    st.info(ctx.t("load_failed_hint"))
    if st.button(ctx.t("retry"), key="retry_load", type="primary"):
        ctx.loader().retry()
        st.rerun()


def wait_for_backend(ctx: PageContext, loader: BackendLoader) -> LoadStatus:
    """Start loading if needed and show progress until it ends; on failure show the error and a retry button."""
    loader.start()
    status = loader.status()
    if status.state == "loading":
        box = st.empty()
        while (status := loader.status()).state == "loading":
            show_progress(ctx, box, status)
            time.sleep(POLL_SECONDS)
        box.empty()
    if status.state == "failed":
        show_failure(ctx, status)
    return status


def require_backend(ctx: PageContext) -> ChatBackend:
    """The shared backend, after the load's progress; a failure stops the page with what to do."""
    loader = ctx.loader()
    if wait_for_backend(ctx, loader).state == "failed":
        st.stop()
    return loader.backend
