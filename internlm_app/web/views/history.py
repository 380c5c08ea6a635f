"""History page: search conversations, open, delete, export one or all (JSON, Markdown), import a JSON export."""

import streamlit as st

from internlm_app.web import history
from internlm_app.web.page import CHAT_PAGE, exit_unless_streamlit, start_page
from internlm_app.web.storage import open_store

exit_unless_streamlit("internlm_app/web/views/history.py")
ctx = start_page("nav_history")
store = open_store(ctx)
st.title(ctx.t("nav_history"))
history.show_notice(ctx.t("load_error_details"))

query = st.text_input(ctx.t("search"), key="search", placeholder=ctx.t("search_placeholder"))
feedback = st.radio(
    ctx.t("feedback_filter"),
    history.FEEDBACK_FILTERS,
    format_func=lambda value: history.feedback_label(ctx.t, value),
    key="feedback_filter",
    horizontal=True,
)
items = history.find(ctx, store, query, feedback)
by_id = {item.id: item for item in items}
history.keep_selection_valid("selected", list(by_id), "delete_one")
cid = st.selectbox(
    ctx.t("conversations_found", n=len(items)),
    list(by_id),
    format_func=lambda c: history.describe(by_id[c], ctx.t),
    key="selected",
    placeholder=ctx.t("choose_conversation"),
    on_change=history.reset,
    args=("delete_one",),
)
if cid is not None:
    open_col, json_col, md_col, delete_col = st.columns(4)
    open_col.page_link(CHAT_PAGE, label=ctx.t("open"), icon=":material/chat:", query_params={"c": cid})
    for col, kind in ((json_col, "json"), (md_col, "md")):
        data = history.exporter(store, kind, [cid], gone=ctx.t("export_gone"))
        col.download_button(
            kind.upper(), data, history.file_name(kind, cid), key=f"export_one_{kind}", on_click="ignore"
        )
    if delete_col.toggle(ctx.t("delete"), key="delete_one"):
        st.warning(ctx.t("delete_confirm_text"))
        st.button(
            ctx.t("delete_yes"),
            key="delete_one_confirm",
            type="primary",
            on_click=history.delete,
            args=(store, cid, ctx.t("deleted"), "delete_one"),
        )

st.subheader(ctx.t("export_all"))
json_col, md_col = st.columns(2)
backup = history.backup_kind(ctx, store)  # "json", or "zip" (parts) when one file would be more than an import takes
for col, kind in ((json_col, backup), (md_col, "md")):
    data, name = history.exporter(store, kind), history.file_name(kind)
    col.download_button(ctx.t(f"export_all_{kind}"), data, name, key=f"export_all_{kind}", on_click="ignore")

st.subheader(ctx.t("import"))
# Streamlit's own "Drag and drop" / "Browse files" words cannot be set (streamlit/streamlit#13500): the label and the
# help say what to drop in the page's language.
st.file_uploader(ctx.t("import_file"), type=["json", "zip"], key=history.upload_key(), help=ctx.t("import_file_help"))
keep_both = st.radio(
    ctx.t("import_duplicates"),
    [False, True],
    format_func=lambda both: ctx.t("import_keep_both" if both else "import_skip"),
    key="import_keep_both",
    horizontal=True,
)
st.button(ctx.t("import"), key="import_button", on_click=history.import_upload, args=(store, ctx.t, not keep_both))
