"""Status page: the model, GPU memory, the engine queue, versions and problems (the doctor report)."""

import streamlit as st

from internlm_app.doctor import doctor_report
from internlm_app.runtime import gpu
from internlm_app.web import status
from internlm_app.web.page import exit_unless_streamlit, start_page

exit_unless_streamlit("internlm_app/web/views/status.py")
ctx = start_page("nav_status")
st.title(ctx.t("nav_status"))
st.button(ctx.t("refresh"), key="refresh", icon=":material/refresh:")

st.subheader(ctx.t("status_model"))
status.model_section(ctx, ctx.loader())

st.subheader(ctx.t("status_gpu"))
devices = gpu.memory_report()
if devices:
    st.table(status.memory_rows(ctx, devices))
else:
    st.info(ctx.t("gpu_none"))

report = doctor_report(ctx.settings)
st.subheader(ctx.t("status_problems"))
for problem in report["problems"]:
    st.warning(ctx.t(f"doctor_{problem.key}", **problem.values))
if not report["problems"]:
    st.success(ctx.t("status_no_problems"))
with st.expander(ctx.t("status_versions")):
    st.table(status.version_rows(ctx, report))
