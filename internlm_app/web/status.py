"""Tables for the Status page: what was loaded, memory per device, versions."""

from __future__ import annotations

from dataclasses import asdict

import streamlit as st

from internlm_app.backends.factory import BackendLoader, backends_created
from internlm_app.chat_types import DecodeReason, DecodingState, DeviceMemory
from internlm_app.runtime import gpu
from internlm_app.web import hosting
from internlm_app.web.context import PageContext
from internlm_app.web.i18n import LABELS
from internlm_app.web.loading import wait_for_backend
from internlm_app.web.page import queue_caption


def model_section(ctx: PageContext, loader: BackendLoader) -> None:
    """The loaded model's facts and the engine queue (progress while it loads, the error when it failed)."""
    backend = loader.backend if wait_for_backend(ctx, loader).state == "ready" else None
    if backend is None:  # the failure is shown
        return
    info = backend.info
    facts = asdict(info)
    # A dict on multi-GPU machines: one cell is enough; none (one device) is a dash, not Python's None.
    facts["device_map"] = "—" if info.device_map is None else str(info.device_map)
    facts["parameters"] = f"{info.parameters:,}"
    facts["load_seconds"] = f"{info.load_seconds:.1f} s"
    facts.pop("extra", None)
    facts["served_by"] = ctx.t("served_one_process" if hosting.current() is not None else "served_web_only")
    facts["models_loaded_by_process"] = str(backends_created())
    names = [ctx.t(f"field_{name}") for name in facts]
    st.table({ctx.t("status_field"): names, ctx.t("status_value"): [str(v) for v in facts.values()]})
    decoding = backend.decoding()
    if decoding is not None:
        st.subheader(ctx.t("status_decoding"))
        st.table(decoding_rows(ctx, decoding))
    queue = backend.queue
    if queue is not None:
        st.caption(queue_caption(ctx, queue))


def reason_text(ctx: PageContext, reason: DecodeReason) -> str:
    """A decode plan's reason in the page's language (`why_<id>`); its English text for an id without a label."""
    key = f"why_{reason.id}"
    return ctx.t(key, **reason.values) if key in LABELS else reason.text


def decoding_rows(ctx: PageContext, plan: DecodingState) -> dict[str, list[str]]:
    """How replies are decoded here and why, in the page's language."""
    if plan.batch_slots > 1:
        batch = ctx.t("decode_batch_on", slots=plan.batch_slots, tokens=plan.batch_cache_tokens)
    else:
        batch = ctx.t("decode_batch_off")
    return {
        ctx.t("status_field"): [ctx.t("decode_single"), ctx.t("decode_batch"), ctx.t("decode_reuse")],
        ctx.t("status_value"): [
            ctx.t("decode_static" if plan.single_path == "static" else "decode_dynamic"),
            batch,
            ctx.t("decode_kept", kept=plan.kept_tokens, budget=plan.kv_reuse_tokens),
        ],
        ctx.t("decode_why"): [reason_text(ctx, plan.single_reason), reason_text(ctx, plan.batch_reason), ""],
    }


def memory_rows(ctx: PageContext, devices: list[DeviceMemory]) -> dict[str, list[str]]:
    """One column per fact, one row per GPU."""
    return {
        "GPU": [f"{d.index}: {d.name}" for d in devices],
        ctx.t("mem_allocated"): [gpu.format_bytes(d.allocated) for d in devices],
        ctx.t("mem_reserved"): [gpu.format_bytes(d.reserved) for d in devices],
        ctx.t("mem_total"): [gpu.format_bytes(d.total) for d in devices],
    }


def version_rows(ctx: PageContext, report: dict) -> dict[str, list[str]]:
    """Package versions, CUDA and RAM from the doctor report."""
    rows = {name: version or "—" for name, version in report["versions"].items()}
    rows["CUDA"] = f"{report['cuda'] or '—'} ({report['cuda_available']})"
    if report.get("ram_available_bytes"):
        rows[ctx.t("ram_available")] = gpu.format_bytes(report["ram_available_bytes"])
    if "disk_free_bytes" in report:  # not with a remote backend: nothing is downloaded here
        rows[ctx.t("disk_free")] = gpu.format_bytes(report["disk_free_bytes"])
    return {"": list(rows), ctx.t("version_column"): list(rows.values())}
