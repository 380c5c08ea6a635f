"""Prompt presets under the sidebar's system prompt: pick one to fill the system prompt, save the prompt as a named
preset, delete one (with confirmation). The store keeps them (`list_presets`, `save_preset`, `delete_preset`); the
defaults (translator, code reviewer, concise assistant, in Chinese and English) come with a new database."""

from __future__ import annotations

import streamlit as st

from internlm_app.store.db import ConversationStore
from internlm_app.store.presets import PRESET_NAME_LIMIT
from internlm_app.web import state, storage
from internlm_app.web.context import PageContext
from internlm_app.web.safe_markdown import plain

PICK_KEY = "preset_pick"
NAME_KEY = "preset_name"
_CONFIRM_KEY = "_confirm_delete_preset"
_PICK_NEXT_KEY = "_preset_pick_next"  # a preset just saved: picked in the next run, before the picker is drawn


def _apply(prompts: dict[int, str]) -> None:
    """The picked preset's prompt into the system prompt box (a callback: before the box is drawn)."""
    picked = st.session_state.get(PICK_KEY)
    if picked in prompts:
        st.session_state[state.SYSTEM_PROMPT_KEY] = prompts[picked]
        st.session_state[NAME_KEY] = ""


def _ask_delete(preset_id: int | None) -> None:
    st.session_state[_CONFIRM_KEY] = preset_id


def _distinct_names(presets) -> dict[int, str]:
    """Each preset's name as the picker shows it; a name that a list shows twice (saved by an older version) gets
    its number, so that the picker tells them apart (it matches a choice by its text)."""
    names: dict[int, str] = {}
    for preset in presets:
        shown, n = preset.name, 1
        while shown in names.values():
            n += 1
            shown = f"{preset.name} ({n})"
        names[preset.id] = shown
    return names


@storage.stops_on_fault
def picker(ctx: PageContext, store: ConversationStore) -> None:
    """The preset picker, "save as preset" with a name, and delete for the picked one."""
    presets = store.list_presets(language=ctx.lang)  # this language's and those for both
    names = _distinct_names(presets)
    if _PICK_NEXT_KEY in st.session_state:
        st.session_state[PICK_KEY] = st.session_state.pop(_PICK_NEXT_KEY)
    if st.session_state.get(PICK_KEY) not in names:
        st.session_state[PICK_KEY] = None
    st.selectbox(
        ctx.t("preset"),
        [None, *names],
        key=PICK_KEY,
        format_func=lambda pid: ctx.t("preset_none") if pid is None else names[pid],  # options are plain text
        placeholder=ctx.t("preset_none"),
        on_change=_apply,
        args=({p.id: p.system_prompt for p in presets},),
        help=ctx.t("preset_help"),
    )
    picked = st.session_state.get(PICK_KEY)
    name = st.text_input(
        ctx.t("preset_name"), key=NAME_KEY, placeholder=ctx.t("preset_name_placeholder"), max_chars=PRESET_NAME_LIMIT
    )
    if st.button(ctx.t("preset_save"), key="preset_save", icon=":material/bookmark_add:"):
        prompt = st.session_state.get(state.SYSTEM_PROMPT_KEY, "")
        if not name.strip():
            st.warning(ctx.t("preset_name_needed"))
        elif not prompt.strip():
            st.warning(ctx.t("preset_prompt_needed"))
        else:
            with storage.writing(keep={NAME_KEY: name}):
                saved = store.save_preset(name, prompt, ctx.lang)  # this page's list: where it shows
            st.session_state[_PICK_NEXT_KEY] = saved
            st.rerun()
    if picked is None:
        return
    if st.session_state.get(_CONFIRM_KEY) != picked:
        st.button(ctx.t("preset_delete"), key="preset_delete", on_click=_ask_delete, args=(picked,))
        return
    st.warning(ctx.t("preset_delete_confirm", name=plain(names[picked])))
    yes, no = st.columns(2)
    if yes.button(ctx.t("delete_yes"), key="preset_delete_confirm", type="primary"):
        with storage.writing():
            store.delete_preset(picked)
        _ask_delete(None)
        st.rerun()
    no.button(ctx.t("cancel"), key="preset_delete_cancel", on_click=_ask_delete, args=(None,))
