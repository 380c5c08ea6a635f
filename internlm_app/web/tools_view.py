"""InternLM2 tools in the chat: the sidebar's switch and "use a tool" picker, the reply's chunks from
`tool_runner.run_with_tools`, and each call with its result as a collapsible step of the reply.

The steps are saved in the reply's stats (`chat_context.ToolReplyStats`), so a reload shows them and the model's next
turn gets them back as InternLM2 call and `environment` turns (`chat_context.reply_turns`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import streamlit as st

from internlm_app.chat.context import ToolReplyStats
from internlm_app.chat.tool_runner import FinalEvent, TextEvent, ToolCallEvent, ToolResultEvent, run_with_tools
from internlm_app.chat.tool_set import ToolSet, chat_tools
from internlm_app.chat_types import ChatBackend, Message, ReplyEvents, ReplyStats
from internlm_app.sampling import SamplingParams
from internlm_app.web.context import PageContext
from internlm_app.web.process_wide import process_wide
from internlm_app.web.safe_markdown import plain

TOOLS_KEY = "tools_on"
TOOL_CHOICE_KEY = "tool_choice"
AUTO = "auto"  # the model decides whether to call a tool; any other choice is a tool's name: its first step calls it


@process_wide
def toolset(tools_dir: Path | None) -> ToolSet:
    """The built-ins and INTERNLM_TOOLS_DIR's tools, loaded once per process (loading a file runs it)."""
    return chat_tools(tools_dir)


def local_model(backend: ChatBackend) -> bool:
    """Tools need the local model's tokenizer and grammar; a remote backend refuses tool requests."""
    return backend.local


def sidebar(ctx: PageContext, backend: ChatBackend) -> None:
    """The tools switch, the tool to call first ("the model decides" by default) and what of the user tools failed."""
    with st.expander(ctx.t("tools"), icon=":material/build:"):
        if not local_model(backend):
            st.caption(ctx.t("tools_need_local"))
            st.session_state[TOOLS_KEY] = False
            return
        tools = toolset(ctx.settings.tools_dir)
        on = st.toggle(ctx.t("tools_on"), key=TOOLS_KEY, help=ctx.t("tools_help"), persist_state="session")
        names = [AUTO, *tools.names]
        if st.session_state.get(TOOL_CHOICE_KEY) not in names:
            st.session_state[TOOL_CHOICE_KEY] = AUTO
        st.selectbox(
            ctx.t("tool_choice"),
            names,
            key=TOOL_CHOICE_KEY,
            format_func=lambda name: ctx.t("tool_choice_auto") if name == AUTO else name,
            help=ctx.t("tool_choice_help"),
            disabled=not on,
            persist_state="session",
        )
        if ctx.settings.tools_dir is not None:
            st.caption(ctx.t("tools_user_dir", path=plain(str(ctx.settings.tools_dir))))
        for problem in tools.problems:
            st.warning(ctx.t("tools_problem", where=plain(problem.where), message=plain(problem.message)))


def enabled(backend: ChatBackend) -> bool:
    return bool(st.session_state.get(TOOLS_KEY)) and local_model(backend)


def tool_stream(
    backend: ChatBackend, tools: ToolSet, tool_choice: str, steps: list[dict]
) -> Callable[..., Iterator[str]]:
    """A source of reply chunks for `reply.WebReply` (`stream_reply`'s signature) that runs the tools: it yields the
    text, appends each call and then its result to `steps`, and leaves the summed stats, steps included, in
    `events.stats` (a ToolReplyStats: the reply is saved with its steps, also when it finishes in the background)."""

    def stream(
        messages: list[Message],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Iterator[str]:
        events = events or ReplyEvents()
        events.stats = ToolReplyStats(tool_steps=steps)
        step_stats: list[ReplyStats] = []
        run = run_with_tools(
            backend,
            messages,
            tools,
            params,
            tool_choice=tool_choice,
            cancel=cancel,
            max_length=max_length,
            on_queue=events.on_queue,  # the place in line, whenever a step waits for the GPU
            step_stats=step_stats,
        )
        return _chunks(run, steps, events, step_stats)

    return stream


def _chunks(run, steps: list[dict], events: ReplyEvents, step_stats: list[ReplyStats]) -> Iterator[str]:
    with contextlib.closing(run):  # closing this closes the runner: generation stops within one token
        try:
            yield from _step_text(run, steps, events)
        except Exception:
            # A later step failed: the tokens and time of the steps so far still count; the caller records why
            # (`ReplyStats.failed`, with the error's code).
            _sum_stats(events.stats, step_stats, "error")
            events.stats.error = events.stats.error_code = None
            raise


def _step_text(run, steps: list[dict], events: ReplyEvents) -> Iterator[str]:
    """The reply's text; each call (with the text before it) and its result into `steps`, the summed stats last."""
    text = ""  # of the step under way: it goes with the step's call
    for event in run:
        if isinstance(event, TextEvent):
            text += event.text
            yield event.text
        elif isinstance(event, ToolCallEvent):
            call = event.call
            steps.append({"id": call.get("id", ""), "name": call["name"], "arguments": call["arguments"]})
            steps[-1]["text"], text = text, ""
        elif isinstance(event, ToolResultEvent):
            steps[-1].update(result=event.result.content, error=event.result.error, seconds=event.result.seconds)
        elif isinstance(event, FinalEvent):
            _sum_stats(events.stats, event.stats, event.finish_reason)


def _sum_stats(total: ReplyStats, parts: list[ReplyStats], finish_reason: str) -> None:
    """One line of stats for the whole reply: tokens and time summed over its steps, the first token of the first."""
    if not parts:
        return
    total.prompt_tokens = sum(p.prompt_tokens for p in parts)
    total.completion_tokens = sum(p.completion_tokens for p in parts)
    total.time_to_first_token = parts[0].time_to_first_token
    total.total_seconds = sum(p.total_seconds for p in parts)
    total.queue_seconds = sum(p.queue_seconds for p in parts)
    total.cached_tokens = sum(p.cached_tokens for p in parts)
    total.dropped_messages = max(p.dropped_messages for p in parts)
    speeds = [p.tokens_per_second for p in parts if p.tokens_per_second]
    total.tokens_per_second = parts[-1].tokens_per_second or (speeds[-1] if speeds else None)
    total.finish_reason = finish_reason  # type: ignore[assignment]
    failed = next((p for p in parts if p.error), None)
    total.error, total.error_code = (failed.error, failed.error_code) if failed else (None, None)


def show_steps(steps: list[dict], t: Callable[..., str], *, running: bool = False) -> None:
    """Each tool call of a reply, collapsed: the call's arguments and what the tool returned (or its error).
    `running`: the reply is streaming, so a last call without its result is running, not stopped."""
    for index, step in enumerate(steps):
        done = "result" in step
        failed = bool(step.get("error"))
        runs = running and not done and index == len(steps) - 1
        key = "tool_step_failed" if failed else "tool_step" if done else "tool_step_running" if runs else None
        label = t(key or "tool_step_stopped", name=step["name"])
        icon = ":material/error:" if failed else ":material/build:" if done else ":material/hourglass_top:"
        with st.expander(plain(label), icon=icon if done or runs else ":material/stop_circle:"):
            st.caption(t("tool_arguments"))
            st.code(step.get("arguments") or "{}", language="json", wrap_lines=True)
            if done:
                st.caption(t("tool_result_took", s=step.get("seconds", 0.0)))
                st.code(step["result"], language=None, wrap_lines=True)
            else:
                st.caption(t("tool_running" if runs else "tool_not_run"))


class LiveSteps:
    """The steps of a reply streaming on this page, redrawn in their slot when a call or a result comes in (the page
    calls `refresh` at every wake-up, so a call shows while its tool runs)."""

    def __init__(self, steps: list[dict], t: Callable[..., str]):
        self.steps, self.t = steps, t
        self.slot = st.empty()
        self.shown: tuple[int, int] = (0, 0)

    def refresh(self) -> None:
        now = (len(self.steps), sum("result" in step for step in self.steps))
        if now != self.shown:
            self.shown = now
            with self.slot.container():
                show_steps(list(self.steps), self.t, running=True)


def reply_stream(ctx: PageContext, backend: ChatBackend, steps: list[dict]) -> Callable[..., Iterator[str]] | None:
    """The reply's source of chunks when the sidebar's tools are on (None: the backend's plain stream)."""
    if not enabled(backend):
        return None
    tools = toolset(ctx.settings.tools_dir)
    choice = st.session_state.get(TOOL_CHOICE_KEY, AUTO)
    if choice not in tools.tools:
        return tool_stream(backend, tools, AUTO, steps)
    # A picked tool is the only one offered: the first step calls it, and every schema not offered is context saved.
    return tool_stream(backend, ToolSet({choice: tools.tools[choice]}), choice, steps)
