"""internlm_app.web without a page: throttling, stop/error handling of a reply on the real engine, loader, labels."""

from __future__ import annotations

import logging
import string
import threading
import time
import tomllib

import pytest
from streamlit.testing.v1 import AppTest

from internlm_app import load_progress
from internlm_app.backends import factory as loading
from internlm_app.chat_types import GenerationError, ReplyEvents, ReplyStats
from internlm_app.load_progress import LoadStep, TerminalProgress
from internlm_app.runtime.loader import ModelLoadError
from internlm_app.sampling import SamplingParams
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT
from internlm_app.store.db import ConversationStore
from internlm_app.web import auth, i18n
from internlm_app.web import reply as reply_module
from internlm_app.web.render import stats_caption, to_markdown
from internlm_app.web.reply import LiveReplies, ReplyView, WebReply
from internlm_app.web.throttle import UI_UPDATES_PER_SECOND, Throttle, throttled_text
from tests.api_helpers import engine_copy, free_all_slots, take_all_slots, wait_until
from tests.app_helpers import ROOT, RUN_TIMEOUT

# A greedy reply of ~220 tokens on the tiny model (repetition penalty keeps it from ending early).
LONG = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=200)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    return ConversationStore(tmp_path / "conversations.db")


def _conversation(store: ConversationStore, text: str = "asdf") -> str:
    cid = store.create_conversation(DEFAULT_SYSTEM_PROMPT)
    store.add_message(cid, "user", text)
    return cid


def test_throttle_lets_one_call_through_per_interval():
    clock = FakeClock()
    throttle = Throttle(0.5, clock)
    assert throttle.ready() and not throttle.ready()
    clock.now = 0.49
    assert not throttle.ready()
    clock.now = 0.5
    assert throttle.ready()


def test_throttled_text_caps_updates_whatever_the_token_rate():
    clock = FakeClock()

    def chunks():
        for i in range(10_000):  # 10,000 tokens in 10 simulated seconds: 1,000 tokens/s
            clock.now = i / 1000
            yield f"{i} "

    updates = list(throttled_text(chunks(), clock=clock))
    assert updates[0] == "0 " and updates[-1] == "".join(f"{i} " for i in range(10_000))
    assert len(updates) <= 10 * UI_UPDATES_PER_SECOND + 1
    assert all(a in b for a, b in zip(updates, updates[1:], strict=False))  # each update extends the previous


class SteppingClock:
    """A clock that moves on by `step` seconds each time it is read: simulated time, independent of the machine."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_real_reply_updates_the_page_at_most_20_times_a_second(engine, store, monkeypatch):
    # The page's throttle reads a clock once per token; this one says 1,000 tokens a second whatever the machine does,
    # so the number of updates is the same on every machine (with the wall clock a slow one updates at every token).
    clock, used = SteppingClock(0.001), []

    def throttled(chunks, **kwargs):
        used.append(1)
        return throttled_text(chunks, clock=clock, **kwargs)

    monkeypatch.setattr(reply_module, "throttled_text", throttled)
    shown: list[str] = []
    outcome = WebReply(engine, store, _conversation(store, "hello"), LONG).run(
        ReplyView(show=shown.append)
    )  # 200 tokens long
    assert used == [1]  # the page's updates went through the throttle
    assert outcome.status == "complete" and outcome.stats.completion_tokens > 100
    assert shown[-1] == outcome.text and all(b.startswith(a) for a, b in zip(shown, shown[1:], strict=False))
    assert len(shown) <= clock.now * UI_UPDATES_PER_SECOND + 2  # at most 20 a (simulated) second, plus the last
    assert len(shown) < outcome.stats.completion_tokens / 3  # far fewer updates than tokens


class PageStop(BaseException):
    """The page's run ends, as Streamlit ends it after a Stop click: raised from a view's callback."""


class PageRerun(BaseException):
    """The page's run ends, as Streamlit ends it for any other interaction (a rerun)."""


def page_view(show, **callbacks) -> ReplyView:
    """A view whose page's run is ended by PageStop and PageRerun, as Streamlit's is by PAGE_INTERRUPTIONS."""
    return ReplyView(show=show, interrupted_by=(PageStop, PageRerun), **callbacks)


def test_a_stop_keeps_the_partial_reply_marked_stopped_and_frees_the_gpu(engine, store):
    cid = _conversation(store)
    shown: list[str] = []
    live = LiveReplies()

    def show(text: str) -> None:  # the Stop button's callback, then Streamlit ends the script from the next st call
        shown.append(text)
        live.stop(cid)
        raise PageStop()

    with pytest.raises(PageStop):
        WebReply(engine, store, cid, LONG).run(page_view(show), live=live)
    assert wait_until(lambda: live.reply_of(cid) is None, timeout=30)  # it ended at its next token
    assert engine.queue.active == 0
    reply = store.get_conversation(cid).messages[-1]
    assert reply.status == "stopped" and reply.content.startswith(shown[0]) and reply.content
    assert reply.stats["finish_reason"] == "cancelled" and reply.stats["completion_tokens"] < LONG.max_new_tokens
    store.add_message(cid, "user", "and now?")
    again = WebReply(engine, store, cid, SamplingParams(max_new_tokens=8)).run(ReplyView(show=lambda text: None))
    assert again.status == "complete"  # the next message is served at once


@pytest.mark.parametrize("interruption", [PageStop, PageRerun], ids=["stop", "rerun"])
def test_any_other_interaction_leaves_the_reply_running_in_the_background(engine, store, interruption):
    """A sidebar button, the language, another page or a closed tab ends the page's script, not the reply: it goes on
    in the background, visible in `live`, and is saved whole, exactly as if nothing had happened."""
    expected = WebReply(engine, store, _conversation(store, "hello"), LONG).run(ReplyView(show=lambda text: None))
    cid = _conversation(store, "hello")
    live = LiveReplies()
    shown: list[str] = []

    def show(text: str) -> None:
        shown.append(text)
        raise interruption()

    with pytest.raises(interruption):
        WebReply(engine, store, cid, LONG).run(page_view(show), live=live)
    assert live.reply_of(cid) is not None or store.get_conversation(cid).messages[-1].status == "complete"
    assert wait_until(lambda: live.reply_of(cid) is None, timeout=60)
    reply = store.get_conversation(cid).messages[-1]
    assert (reply.status, reply.content) == ("complete", expected.text) and len(reply.content) > len(shown[0])
    assert reply.stats["completion_tokens"] == expected.stats.completion_tokens and engine.queue.active == 0


def _interrupted_page(engine, store, cid, live, params, how, runs):
    """An AppTest page: stream a reply with the default view and, at its first update, end the run as an
    interaction does (st.stop() or st.rerun()); `runs` records what ran after that."""
    import streamlit as st

    from internlm_app.web.reply import ReplyView, WebReply

    if st.session_state.get("replied"):  # the run st.rerun() asked for
        runs.append("next run")
        return
    st.session_state["replied"] = True

    def show(text: str) -> None:
        if how == "stop":
            st.stop()
        st.rerun()

    WebReply(engine, store, cid, params).run(ReplyView(show=show), live=live)
    runs.append("after the reply")  # never: the interruption ends the run here


@pytest.mark.parametrize("how", ["stop", "rerun"])
def test_streamlits_own_stop_and_rerun_are_page_interruptions(engine, store, how):
    """The same as above through Streamlit itself: what st.stop() and st.rerun() raise (PAGE_INTERRUPTIONS, a view's
    default) ends the page's run, not the reply: it goes on in the background (had the view taken it for another
    exception, the reply would have been closed and saved as stopped)."""
    expected = WebReply(engine, store, _conversation(store, "hello"), LONG).run(ReplyView(show=lambda text: None))
    cid, live, runs = _conversation(store, "hello"), LiveReplies(), []
    args = (engine, store, cid, live, LONG, how, runs)
    at = AppTest.from_function(_interrupted_page, args=args, default_timeout=RUN_TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert runs == (["next run"] if how == "rerun" else [])  # nothing ran after the reply in the interrupted run
    assert wait_until(lambda: live.reply_of(cid) is None, timeout=60)
    reply = store.get_conversation(cid).messages[-1]
    assert (reply.status, reply.content) == ("complete", expected.text) and engine.queue.active == 0
    assert reply.stats["completion_tokens"] == expected.stats.completion_tokens


def test_a_stop_between_page_updates_is_noticed_at_the_next_token(engine, store):
    """The page polls at every chunk (one per token here): a stop at the third poll ends the reply within a token.
    The reply runs in its own thread, so each step is slowed to 20 ms: the page then keeps pace on any machine."""
    engine = engine_copy(engine, engine.settings.model_copy(update={"stream_interval_ms": 0}))  # a chunk per token
    cid = _conversation(store)
    polls: list[int] = []

    def poll() -> None:  # the chat page reads session state here: Streamlit raises there once stopped
        polls.append(1)
        if len(polls) == 3:
            raise PageStop()

    handle = engine.model.register_forward_hook(lambda *args: time.sleep(0.02))
    try:
        with pytest.raises(PageStop):
            WebReply(engine, store, cid, LONG).run(page_view(lambda text: None, poll=poll))
    finally:
        handle.remove()
    reply = store.get_conversation(cid).messages[-1]
    assert reply.status == "stopped" and reply.stats["completion_tokens"] <= 4 and engine.queue.active == 0


def test_waiting_for_the_gpu_reports_the_place_and_a_stop_while_waiting_leaves_the_line(engine, store):
    places: list[int] = []
    take_all_slots(engine)  # other tabs are generating
    try:
        outcome: list = []
        worker = threading.Thread(
            target=lambda: outcome.append(
                WebReply(engine, store, _conversation(store), LONG).run(
                    ReplyView(show=lambda t: None, on_queue=places.append)
                )
            )
        )
        worker.start()
        deadline = time.monotonic() + 10
        while not places and time.monotonic() < deadline:
            time.sleep(0.01)
        assert places and places[0] == 1

        def stop_while_waiting(place: int) -> None:
            raise PageStop()

        cid = _conversation(store)
        with pytest.raises(PageStop):
            WebReply(engine, store, cid, LONG).run(page_view(lambda t: None, on_queue=stop_while_waiting))
        reply = store.get_conversation(cid).messages[-1]
        assert (reply.status, reply.content, reply.stats["finish_reason"]) == ("stopped", "", "cancelled")
        assert engine.queue.waiting() == 1  # only the first waiter is still in line
    finally:
        free_all_slots(engine)
    worker.join(30)
    assert outcome and outcome[0].status == "complete"


@pytest.mark.parametrize("interruption", [PageStop, PageRerun], ids=["stop", "rerun"])
def test_an_interaction_as_the_page_starts_following_leaves_the_reply_running(engine, store, interruption):
    """`on_start` is an st call (the chat page's redraw-when-finished fragment): an interaction raised there ends the
    page's run, not the reply, which was started before the page drew anything."""
    expected = WebReply(engine, store, _conversation(store, "hello"), LONG).run(ReplyView(show=lambda text: None))
    cid, live = _conversation(store, "hello"), LiveReplies()

    def on_start() -> None:
        raise interruption()

    with pytest.raises(interruption):
        WebReply(engine, store, cid, LONG).run(page_view(lambda t: None, on_start=on_start), live=live)
    assert wait_until(lambda: live.reply_of(cid) is None, timeout=60)
    reply = store.get_conversation(cid).messages[-1]
    assert (reply.status, reply.content) == ("complete", expected.text) and engine.queue.active == 0


@pytest.mark.parametrize("interruption", [PageStop, PageRerun], ids=["stop", "rerun"])
def test_an_interaction_while_in_line_keeps_the_reply_in_its_place(engine, store, interruption):
    """A rerun (a click, the language, a reload) or Streamlit's stop while the reply waits for the GPU ends only the
    page's run: the reply keeps its place in line (shown in `live` for the next run), then runs and is saved whole.
    A Stop button (`live.stop`) while in line takes it out of the line, saved as stopped."""
    expected = WebReply(engine, store, _conversation(store, "hello"), LONG).run(ReplyView(show=lambda text: None))
    cid, stopped_cid, live = _conversation(store, "hello"), _conversation(store, "hello"), LiveReplies()

    def leave_page(place: int) -> None:
        raise interruption()

    take_all_slots(engine)  # other replies are generating
    try:
        with pytest.raises(interruption):
            WebReply(engine, store, cid, LONG).run(page_view(lambda t: None, on_queue=leave_page), live=live)
        assert live.reply_of(cid) is not None and live.place_of(cid) == 1 and engine.queue.waiting() == 1

        def stop_button(place: int) -> None:
            live.stop(stopped_cid)
            raise interruption()

        with pytest.raises(interruption):
            WebReply(engine, store, stopped_cid, LONG).run(page_view(lambda t: None, on_queue=stop_button), live=live)
        assert wait_until(lambda: live.reply_of(stopped_cid) is None, timeout=30)
        stopped = store.get_conversation(stopped_cid).messages[-1]
        assert (stopped.status, stopped.content, stopped.stats["finish_reason"]) == ("stopped", "", "cancelled")
        assert engine.queue.waiting() == 1 and live.place_of(cid) == 1  # the first still waits, in its place
    finally:
        free_all_slots(engine)
    assert wait_until(lambda: live.reply_of(cid) is None, timeout=60)
    reply = store.get_conversation(cid).messages[-1]
    assert (reply.status, reply.content) == ("complete", expected.text) and engine.queue.active == 0
    assert reply.stats["completion_tokens"] == expected.stats.completion_tokens


def test_a_prompt_that_does_not_fit_is_an_error_reply_and_the_conversation_is_kept(engine, store):
    cid = _conversation(store, "sea " * 600)
    outcome = WebReply(engine, store, cid, LONG).run(ReplyView(show=lambda text: None))
    assert outcome.status == "error" and "context budget" in outcome.stats.error
    messages = store.get_conversation(cid).messages
    assert [(m.role, m.status) for m in messages] == [("user", "complete"), ("assistant", "error")]
    stats = messages[1].stats
    assert stats["error_code"] == "context_too_long"  # the page says it in its language, with what to do
    from internlm_app.web.render import error_text

    for lang in ("zh", "en"):
        shown = error_text(stats, lambda key, lang=lang, **v: i18n.t(key, lang, **v))
        assert shown.startswith(i18n.t("error_context_too_long", lang)) and "context budget" in shown
    assert error_text({"error": "GPU out of memory"}, lambda key, **v: i18n.t(key, "zh", **v)) == "GPU out of memory"
    from internlm_app.chat_types import QueueFullError

    busy = ReplyStats()
    busy.failed(QueueFullError("the model is busy and 2 requests are already waiting"))
    shown = error_text(busy.to_dict(), lambda key, **v: i18n.t(key, "zh", **v))
    assert shown.startswith(i18n.t("error_queue_full", "zh")) and "busy" in shown


class FailingBackend:
    """Yields two chunks, then fails like a CUDA out-of-memory in the generation thread (a layout-level fake)."""

    def stream_reply(self, messages, params, *, cancel=None, events: ReplyEvents | None = None, max_length=None):
        events = events or ReplyEvents()

        def chunks():
            yield "Hello"
            yield " wor"
            events.stats.finish_reason, events.stats.error = "error", "GPU out of memory: CUDA out of memory"
            raise GenerationError(events.stats.error)

        return chunks()


def test_a_failure_mid_reply_keeps_the_partial_text_with_the_error(store):
    cid = _conversation(store, "hello")
    outcome = WebReply(FailingBackend(), store, cid, LONG).run(ReplyView(show=lambda text: None))
    reply = store.get_conversation(cid).messages[-1]
    assert (outcome.status, reply.status, reply.content) == ("error", "error", "Hello wor")
    assert "out of memory" in reply.stats["error"]
    assert store.messages_for_model(cid)[-1] == {"role": "user", "content": "hello"}  # the failed reply is skipped


def test_a_failed_load_is_kept_until_retry_then_loads(tmp_path, caplog):
    attempts: list[int] = []

    def create(settings, progress=None):
        attempts.append(1)
        progress(LoadStep("download", 3_100_000_000, 15_500_000_000, 2, 8, "model-00002-of-00008.bin"))
        if len(attempts) == 1:
            raise ModelLoadError("no CUDA GPU visible: check nvidia-smi", "no_gpu")
        progress(LoadStep("convert", 1, 2, detail="model-00001-of-00002.safetensors"))
        return "backend"

    loader = loading.BackendLoader(settings=None, create=create)
    with caplog.at_level(logging.INFO, logger="internlm_app"):
        loader.start()
        while loader.status().state == "loading":
            time.sleep(0.01)
    failed = loader.status()
    assert failed.error == "no CUDA GPU visible: check nvidia-smi"  # our own message, no type prefix
    assert failed.error_reason == "no_gpu"  # what the page translates
    assert failed.step == "downloading the model: 3.1 GB of 15.5 GB, file 2/8 (model-00002-of-00008.bin)"
    assert failed.progress.fraction == pytest.approx(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "internlm_app.backends.factory"]
    assert lines == [failed.step, "loading the model failed: no CUDA GPU visible: check nvidia-smi"]
    assert not any(r.exc_info for r in caplog.records if r.levelno > logging.DEBUG)  # one line, no traceback
    loader.start()
    assert loader.status().state == "failed" and len(attempts) == 1  # not retried behind the user's back
    loader.retry()
    while loader.status().state == "loading":
        time.sleep(0.01)
    assert loader.status().state == "ready" and loader.backend == "backend"
    assert loader.status().step == "converting the checkpoint: shard 1/2 (model-00001-of-00002.safetensors)"


def test_an_unexpected_load_error_keeps_its_type_in_the_details():
    def create(settings, progress=None):
        raise KeyError("lm_head.weight")

    loader = loading.BackendLoader(settings=None, create=create)
    loader.start()
    while loader.status().state == "loading":
        time.sleep(0.01)
    assert loader.status().error_reason == "unexpected" and loader.status().error == "KeyError: 'lm_head.weight'"


def test_the_terminal_gets_a_download_line_every_few_seconds_and_each_new_step_at_once(caplog):
    now = [0.0]
    terminal = TerminalProgress(logging.getLogger("internlm_app.test"), interval=5.0)
    with caplog.at_level(logging.INFO, logger="internlm_app.test"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(load_progress.time, "monotonic", lambda: now[0])
        for second in range(12):  # a chunk a second
            now[0] = float(second)
            terminal(LoadStep("download", second * 1_000_000, 12_000_000, 0, 1))
        terminal(LoadStep("download", 12_000_000, 12_000_000, 1, 1))  # the last one always shows
        terminal(LoadStep("load", detail="cuda, float16"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "downloading the model: 0 B of 12.0 MB, file 0/1",
        "downloading the model: 5.0 MB of 12.0 MB, file 0/1",
        "downloading the model: 10.0 MB of 12.0 MB, file 0/1",
        "downloading the model: 12.0 MB of 12.0 MB, file 1/1",
        "loading the weights into memory (cuda, float16)",
    ]


def test_modelscope_file_callbacks_add_up_to_the_whole_download():
    from internlm_app.runtime.model_source import _DownloadTracker

    steps: list[LoadStep] = []
    tracker = _DownloadTracker(steps.append, {"config.json": 1_000, "model-1.bin": 9_000})
    callback_class = tracker.callback_class()  # ModelScope makes one per file: callback_class(name, size)
    config, weights = callback_class("config.json", 1_000), callback_class("model-1.bin", 9_000)
    config.update(1_000)
    config.end()
    weights.update(4_000)
    assert steps[-1] == LoadStep("download", 5_000, 10_000, 1, 2, "model-1.bin") and steps[-1].fraction == 0.5
    weights.update(5_000)
    weights.end()
    assert (steps[-1].done, steps[-1].files_done, steps[-1].fraction) == (10_000, 2, 1.0)


def test_every_label_exists_in_chinese_and_english_with_the_same_fields():
    fields = string.Formatter()
    for key, (zh, en) in i18n.LABELS.items():
        assert zh.strip() and en.strip(), key
        names = [{f for _, f, _, _ in fields.parse(text) if f} for text in (zh, en)]
        assert names[0] == names[1], key


def test_streamlit_config_serves_on_6006_with_xsrf_and_no_usage_stats():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["port"] == 6006 and config["server"]["address"] == "0.0.0.0"
    assert config["server"]["headless"] is True and config["server"]["enableXsrfProtection"] is True
    assert config["browser"]["gatherUsageStats"] is False


def test_latex_is_converted_outside_code_only():
    text = "Euler: \\(e^{i\\pi}+1=0\\) and \\[\\int_0^1 x\\,dx\\]\n```python\nprint('\\(x\\)')\n```\n`\\(y\\)`"
    assert to_markdown(text) == (
        "Euler: $e^{i\\pi}+1=0$ and \n$$\n\\int_0^1 x\\,dx\n$$\n\n```python\nprint('\\(x\\)')\n```\n`\\(y\\)`"
    )


def test_stats_caption_says_tokens_speed_and_why_it_ended():
    stats = {"completion_tokens": 57, "time_to_first_token": 0.123, "tokens_per_second": 31.25}
    stats["finish_reason"] = "length"
    caption = stats_caption(stats, "complete", lambda key, **v: i18n.t(key, "en", **v))
    assert caption == "57 tokens · first token 0.12 s · 31.2 tokens/s · ended: length limit"  # no English in zh
    stats["cached_tokens"] = 114  # a later turn: the earlier ones came from the KV cache
    caption = stats_caption(stats, "complete", lambda key, **v: i18n.t(key, "zh", **v))
    assert "首字 0.12 秒 · 复用缓存 114 tokens · 31.2 tokens/秒" in caption


def test_password_comparison():
    assert auth.password_matches("密码 s3cret", "密码 s3cret")
    assert not auth.password_matches("s3cre", "s3cret") and not auth.password_matches("", "s3cret")


def test_the_page_says_each_load_step_in_its_language_with_the_real_numbers():
    from internlm_app.web.context import PageContext
    from internlm_app.web.loading import step_text

    zh, en = PageContext(None, "zh"), PageContext(None, "en")
    download = LoadStep("download", 3_100_000_000, 15_500_000_000, 2, 8, "model-00002-of-00008.bin")
    assert step_text(zh, download) == "从 ModelScope 下载模型：3.1 GB / 15.5 GB，文件 2/8"
    assert step_text(en, download) == "Downloading the model from ModelScope: 3.1 GB of 15.5 GB, file 2/8"
    assert step_text(zh, LoadStep("download", 2_000)) == "从 ModelScope 下载模型：2.0 KB，文件 …"  # no listing
    assert step_text(zh, LoadStep("convert", 3, 8)) == "转换为 Llama 格式：分片 3/8"
    assert step_text(zh, None) == "准备中"
    for stage in load_progress.STAGES:  # every step has both labels
        assert step_text(zh, LoadStep(stage)) != step_text(en, LoadStep(stage))


def test_every_load_error_reason_and_doctor_problem_is_translated():
    from internlm_app.doctor import Problem, doctor_report
    from internlm_app.errors import LOAD_REASONS
    from internlm_app.settings import Settings

    for reason in LOAD_REASONS:
        zh, en = i18n.LABELS[f"load_error_{reason}"]
        assert zh != en
    report = doctor_report(Settings(model_path="/nonexistent/model", cache_dir="/nonexistent/cache"))
    assert {p.key for p in report["problems"]} >= {"path_missing"}
    for problem in report["problems"]:
        assert isinstance(problem, Problem)
        assert i18n.t(f"doctor_{problem.key}", "zh", **problem.values) != problem.text


def test_every_decode_plan_reason_is_translated_with_the_same_values():
    from internlm_app.backends.decode_plan import REASONS, reason
    from internlm_app.web.context import PageContext
    from internlm_app.web.status import reason_text

    for id, english in REASONS.items():
        zh, en = i18n.LABELS[f"why_{id}"]
        assert en == english and zh != en or id.startswith("static_setting")
        fields = {name for _, name, _, _ in string.Formatter().parse(english) if name}
        assert fields == {name for _, name, _, _ in string.Formatter().parse(zh) if name}
    why = reason("static_too_big_shorter", window=32768, need="4.00 GiB", usable="3.00 GiB", fits=16384)
    assert str(why) == why.text and "INTERNLM_MAX_LENGTH=16384 would fit" in why.text
    shown = reason_text(PageContext(None, "zh"), why)
    assert "32768" in shown and "INTERNLM_MAX_LENGTH=16384 可以放下" in shown
    with pytest.raises(KeyError):
        reason("no_such_reason")


def test_one_reply_per_conversation_claim_start_finish_release():
    """A page claims a conversation before it saves the user's message; a second claim (another tab) fails until
    the reply has ended; the claim turns into the reply at its start; a claim given up frees the conversation. A
    page gives up only its own claim: a late give-up never frees a running reply or another page's later claim."""
    live = LiveReplies()
    first = live.claim("c")
    assert first and live.busy("c") and live.claim("c") is None and live.reply_of("c") is None
    live.start("c", 7)
    assert live.reply_of("c") == 7 and live.claim("c") is None
    live.release("c", first)  # a page's late give-up has no effect on a running reply
    assert live.busy("c") and live.claim("c") is None
    live.finish("c", 7)
    assert not live.busy("c")
    second = live.claim("c")  # another page, once the reply ended
    live.release("c", first)  # the first page's give-up, late again: the second page keeps its claim
    assert second and live.busy("c") and live.claim("c") is None
    live.release("c", second)
    assert not live.busy("c") and live.claim("c") and live.claim("d")


def test_a_request_token_is_given_back_only_with_its_own_claim():
    """A regenerate's token is taken with its claim; giving up that claim before the reply started gives the token
    back (the request may run later), while a give-up after the start keeps it taken (it never runs twice)."""
    live = LiveReplies()
    ticket = live.claim("c", token="regen-1")
    assert ticket and live.taken("regen-1")
    live.release("c", ticket, token="regen-1")
    assert not live.taken("regen-1")
    ticket = live.claim("c", token="regen-1")
    live.start("c", 9)
    live.release("c", ticket, token="regen-1")
    assert live.taken("regen-1") and live.reply_of("c") == 9


def test_english_counts_are_singular_for_one():
    assert i18n.t("imported", "en", n=1) == "Imported 1 conversation"
    assert i18n.t("imported", "en", n=3) == "Imported 3 conversations"
    assert i18n.t("message_count", "en", n=1) == "1 message" and i18n.t("stat_tokens", "en", n=1) == "1 token"
    assert i18n.t("imported", "zh", n=1) == "已导入 1 个对话"


def test_a_new_conversation_is_the_sessions_open_one_from_the_start():
    """Made by a first message, a conversation is the session's open one at once: a page switch (which drops the
    URL's ?c=) while its first reply streams comes back to it, not to an empty chat (fourth reviewer)."""
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from internlm_app.web import state

        if "made" not in st.session_state:
            st.session_state["made"] = True
            state.open_new_conversation("new-conversation")
        st.write(state.conversation_id() or "none")

    at = AppTest.from_function(page).run()
    at.query_params.clear()  # a page switch
    at.run()
    assert at.markdown[0].value == "new-conversation" and at.query_params["c"] in (
        "new-conversation",
        ["new-conversation"],
    )


def test_streamlits_clear_cache_request_drops_no_shared_object(app_env):
    # Any websocket client may send Streamlit's "clear cache" (web-only mode has no login before the websocket): it
    # must not make a second loader (a second model), forget the running replies or reset the login throttle.
    import streamlit as st

    from internlm_app.settings import Settings
    from internlm_app.web.auth import login_throttle
    from internlm_app.web.resources import backend_loader, conversation_store, live_replies
    from internlm_app.web.tools_view import toolset

    settings = Settings(web_password="pw")
    shared = [backend_loader(settings), live_replies(), conversation_store(settings), toolset(None)]
    throttle = login_throttle(settings)
    throttle.failed()
    st.cache_resource.clear()  # what the request does (AppSession._handle_clear_cache_request)
    st.cache_data.clear()
    again = [backend_loader(settings), live_replies(), conversation_store(settings), toolset(None)]
    assert all(a is b for a, b in zip(shared, again, strict=True))
    assert login_throttle(settings) is throttle and len(throttle._failures) >= 1


def test_a_shutdown_stops_the_web_replies_and_saves_their_text(engine, store):
    """`serve` shutting down (Ctrl-C, SIGTERM) stops the replies still generating and waits for them to save their
    text as stopped: their threads would otherwise die with the process, losing what streamed since the last save."""
    cid, live = _conversation(store, "hello"), LiveReplies()

    def show(text: str) -> None:  # the page goes away after the first text; the reply goes on in the background
        raise PageRerun()

    paced = engine.model.register_forward_hook(lambda *args: time.sleep(0.01))  # 200 tokens take 2 s or more
    try:
        with pytest.raises(PageRerun):
            WebReply(engine, store, cid, LONG).run(page_view(show), live=live)
        assert live.reply_of(cid) is not None  # still generating
        assert live.stop_all(timeout=30) == 0  # what the server's lifespan does on the way out
    finally:
        paced.remove()
    reply = store.get_conversation(cid).messages[-1]
    assert reply.status == "stopped" and reply.content and reply.stats["finish_reason"] == "cancelled"
    assert live.stop_all(timeout=1) == 0  # nothing left: returns at once
