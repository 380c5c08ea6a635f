"""Concurrent replies on the real tiny model: the continuous batch beside the worker, token for token, faults, queue."""

from __future__ import annotations

import threading
import time

import pytest

from internlm_app.backends.engine import ChatEngine, history_to_messages
from internlm_app.backends.token_stream import END
from internlm_app.chat_types import GenerationError, QueueFullError, ReplyEvents, ReplyOptions
from internlm_app.sampling import SamplingParams
from tests.api_helpers import free_all_slots, take_all_slots, wait_until
from tests.faults import FailOnForward

# Greedy replies of the tiny model that run 70+ tokens: they are still decoding while a shorter reply joins them.
BACKGROUND = ["abc", "hi", "why"]
SOLO_TOKENS = 120
# A repetition penalty has no batched form: such a reply stays on the worker while the batch decodes beside it.
PENALIZED = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.3, max_new_tokens=SOLO_TOKENS)
WORKER_AND_BATCH = [PENALIZED, *[SamplingParams.greedy_params(SOLO_TOKENS)] * 2]  # one reply on each path, one more


def _system(case: dict, reference: dict) -> str:
    return (
        case["meta_instruction"] if case["meta_instruction_passed"] else reference["meta"]["default_meta_instruction"]
    )


def _user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


class Running:
    """Replies streaming in threads; `started` is set once each has its first chunk."""

    def __init__(self, engine: ChatEngine, prompts: list[str], params: SamplingParams | list[SamplingParams]):
        self.texts: dict[int, str] = {}
        self.stats: dict[int, object] = {}
        self.errors: dict[int, BaseException] = {}
        self.ended_at: dict[int, float] = {}
        self.cancels = [threading.Event() for _ in prompts]
        self.started = [threading.Event() for _ in prompts]
        each = params if isinstance(params, list) else [params] * len(prompts)
        self.threads = [
            threading.Thread(target=self._run, args=(engine, i, p, each[i]), daemon=True) for i, p in enumerate(prompts)
        ]
        for thread, started in zip(self.threads, self.started, strict=True):
            thread.start()
            assert started.wait(60), "a reply never produced its first chunk"

    def _run(self, engine: ChatEngine, i: int, prompt: str, params: SamplingParams) -> None:
        events, parts = ReplyEvents(), []
        try:
            for chunk in engine.stream_reply(_user(prompt), params, cancel=self.cancels[i], events=events):
                parts.append(chunk)
                self.started[i].set()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.errors[i] = exc
        finally:
            self.started[i].set()
            self.texts[i], self.stats[i], self.ended_at[i] = "".join(parts), events.stats, time.perf_counter()

    def join(self) -> Running:
        for thread in self.threads:
            thread.join(120)
            assert not thread.is_alive()
        return self


@pytest.fixture(scope="module")
def solo(engine) -> dict[str, str]:
    """Each background prompt's greedy reply when it runs alone, and "penalized" with PENALIZED for "hello"."""
    params = SamplingParams.greedy_params(SOLO_TOKENS)
    return {
        **{p: engine.reply(_user(p), params)[0] for p in BACKGROUND},
        "penalized": engine.reply(_user("hello"), PENALIZED)[0],
    }


def test_the_engine_batches_on_the_cpu_with_the_plan_it_logged(engine):
    plan = engine.plan
    assert plan.single_path == "dynamic" and plan.single_reason.id == "cpu" and "CPU" in plan.single_reason.text
    assert plan.batch_slots == engine.settings.max_batch_size == engine.queue.slots == 8
    assert plan.batch_cache_tokens >= plan.batch_slots * engine.context_window
    assert engine.batch_decoder() is not None


def test_greedy_replies_match_the_reference_while_three_others_run(engine, reference, solo):
    params = SamplingParams.greedy_params(SOLO_TOKENS)
    for case in reference["chat"]:
        background = Running(engine, BACKGROUND, params)
        messages = history_to_messages(case["query"], case["history"], _system(case, reference))
        events, parts, first_at = ReplyEvents(), [], None
        for chunk in engine.stream_reply(messages, SamplingParams.greedy_params(case["max_new_tokens"]), events=events):
            first_at = first_at or time.perf_counter()
            parts.append(chunk)
        text = "".join(parts)
        background.join()
        assert text == case["response"] and events.stats.completion_tokens == len(case["generated_ids"])
        assert events.stats.batched  # it joined the running batch rather than waiting for the worker
        # The others still ran when its first token came (when it ends depends on how far they got before it began).
        assert all(background.ended_at[i] > first_at for i in range(3))
        assert [background.texts[i] for i in range(3)] == [solo[p] for p in BACKGROUND]
        # The first started alone on the worker and moved into the batch when the second came: all three batched.
        assert all(background.stats[i].batched for i in range(3))


def test_concurrent_replies_are_decoded_together(engine, solo):
    forwards: list[str] = []  # the thread of each forward pass
    handle = engine.model.register_forward_pre_hook(lambda m, args: forwards.append(threading.current_thread().name))
    try:
        running = Running(engine, [*BACKGROUND, "hello"], SamplingParams.greedy_params(SOLO_TOKENS)).join()
    finally:
        handle.remove()
    tokens = sum(running.stats[i].completion_tokens for i in range(4))
    assert all(running.stats[i].batched for i in range(4))
    assert len(forwards) < tokens * 0.6  # several replies' tokens per forward pass
    assert [running.texts[i] for i in range(3)] == [solo[p] for p in BACKGROUND]


def test_a_reply_moved_from_the_worker_into_the_batch_goes_on_unchanged(engine, solo):
    first = Running(engine, ["abc"], SamplingParams.greedy_params(SOLO_TOKENS))  # alone: on the worker
    assert not first.stats and engine.queue.active == 1
    second = Running(engine, ["hi"], SamplingParams.greedy_params(SOLO_TOKENS))  # joins: both now in the batch
    first.join(), second.join()
    assert first.texts[0] == solo["abc"] and second.texts[0] == solo["hi"]
    assert first.stats[0].batched and second.stats[0].batched


def test_cancelling_one_of_four_leaves_the_others_unchanged(engine, solo):
    prompts = [*BACKGROUND, "why"]
    running = Running(engine, prompts, SamplingParams.greedy_params(SOLO_TOKENS))
    running.cancels[3].set()  # the fourth, in the batch, mid-reply
    running.join()
    assert running.stats[3].finish_reason == "cancelled" and running.stats[3].batched
    assert solo["why"].startswith(running.texts[3]) and len(running.texts[3]) < len(solo["why"])  # cut short
    assert [running.texts[i] for i in range(3)] == [solo[p] for p in BACKGROUND]
    assert all(running.stats[i].finish_reason in {"stop", "length"} for i in range(3))
    assert engine.queue.active == 0 and engine.batch_decoder().active == 0


def _worker_and_batch_with_a_fault(engine: ChatEngine, *, on_worker: bool, at: int) -> Running:
    """A penalized reply on the worker and two greedy ones in the batch; forward pass `at` of one side fails."""
    fault = FailOnForward(at)

    def hook(module, args, output):
        if (threading.current_thread().name == "internlm-generate") == on_worker:
            fault(module, args, output)

    handle = engine.model.register_forward_hook(hook)
    try:
        return Running(engine, ["hello", *BACKGROUND[:2]], WORKER_AND_BATCH).join()
    finally:
        handle.remove()


def test_a_failure_in_the_worker_ends_that_reply_and_the_batch_goes_on(engine, solo):
    running = _worker_and_batch_with_a_fault(engine, on_worker=True, at=20)
    assert isinstance(running.errors.get(0), GenerationError) and not running.stats[0].batched
    assert running.stats[0].finish_reason == "error" and "out of memory" in running.stats[0].error
    assert 1 not in running.errors and 2 not in running.errors
    assert [running.texts[1], running.texts[2]] == [solo[p] for p in BACKGROUND[:2]]
    assert engine.queue.active == 0
    assert engine.reply(_user("hello"), PENALIZED)[0] == solo["penalized"]


def test_a_failed_batch_step_ends_its_replies_with_an_error_and_the_next_ones_work(engine, solo):
    running = _worker_and_batch_with_a_fault(engine, on_worker=False, at=5)
    assert 0 not in running.errors and running.texts[0] == solo["penalized"]  # the worker's reply went on
    for i in (1, 2):
        assert isinstance(running.errors.get(i), GenerationError) and "out of memory" in str(running.errors[i])
        assert running.stats[i].finish_reason == "error"
    assert engine.queue.active == 0
    again = Running(engine, BACKGROUND, SamplingParams.greedy_params(SOLO_TOKENS)).join()  # the batch restarted
    assert not again.errors and [again.texts[i] for i in range(3)] == [solo[p] for p in BACKGROUND]
    assert all(again.stats[i].batched for i in range(3))


def test_replies_the_batch_cannot_sample_wait_for_the_worker_and_still_run(engine):
    penalized = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.3, max_new_tokens=40)
    expected = engine.reply(_user("hello"), penalized)[0]
    assert engine.batch_decoder().unsupported(penalized) == "repetition_penalty"
    background = Running(engine, ["abc"], SamplingParams.greedy_params(SOLO_TOKENS))  # holds the worker
    events = ReplyEvents()
    text = "".join(engine.stream_reply(_user("hello"), penalized, events=events))
    background.join()
    assert text == expected and not events.stats.batched  # the penalty was applied, by the worker, not dropped


def _token_ids(engine: ChatEngine, prompt_ids: list[int], path: str, stop_ids: list[int] | None) -> list[int]:
    """The ids of one greedy reply of 40 tokens at most, decoded on `path` with `stop_ids` (None: the model's)."""
    reply = engine.scheduler.start(prompt_ids, SamplingParams.greedy_params(40), None, None, path, stop_ids=stop_ids)
    ids = []
    while (token := reply.stream.get(timeout=60)) is not END:
        ids.append(token)
    assert reply.stream.failure is None
    return ids


def test_a_replys_own_stop_ids_end_it_in_the_batch_as_on_the_worker(engine):
    """Stop ids other than the model's (a reply offered tools stops at <|action_end|>) go with the reply into the
    batch, as the worker applies them; the batch's other replies keep the model's."""
    prompt = engine.prepare(_user("hello"), 40).ids
    full = _token_ids(engine, prompt, "worker", None)
    assert full == _token_ids(engine, prompt, "batch", None)
    at = next(i for i in range(3, len(full)) if full[i] not in full[:i])  # a token the reply makes once, mid-way
    own = [*engine.stop_ids, full[at]]
    assert _token_ids(engine, prompt, "worker", own) == full[: at + 1]
    assert _token_ids(engine, prompt, "batch", own) == full[: at + 1]


def test_a_reply_with_its_own_stop_ids_keeps_them_when_it_moves_into_the_batch(engine):
    prompt = engine.prepare(_user("hello"), 40).ids
    full = _token_ids(engine, prompt, "worker", None)
    at = next(i for i in range(20, len(full)) if full[i] not in full[:i])  # late: it moves before reaching it
    own = [*engine.stop_ids, full[at]]
    slow = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))  # both paths alike
    try:
        moved = engine.scheduler.start(prompt, SamplingParams.greedy_params(40), None, None, stop_ids=own)
        ids = [moved.stream.get(timeout=60), moved.stream.get(timeout=60)]  # decoding alone, on the worker
        assert not moved.batched
        other = Running(engine, ["abc"], SamplingParams.greedy_params(SOLO_TOKENS))  # it arrives: both batched
        while (token := moved.stream.get(timeout=60)) is not END:
            ids.append(token)
        other.join()
    finally:
        slow.remove()
    assert moved.batched and ids == full[: at + 1]


def test_a_reply_offered_tools_joins_the_batch(engine, solo):
    """Tools change only the stop ids (and which tokens are control chunks): such a reply is batched, unchanged."""
    params, tools = SamplingParams.greedy_params(40), ReplyOptions(tools=True)
    expected = [c.token_ids for c in engine.stream_chunks(_user("hello"), params, tools)]
    background = Running(engine, ["abc"], SamplingParams.greedy_params(SOLO_TOKENS))  # holds the worker
    events = ReplyEvents()
    chunks = [c.token_ids for c in engine.stream_chunks(_user("hello"), params, tools, events=events)]
    background.join()
    assert sum(chunks, []) == sum(expected, []) and events.stats.batched
    assert background.texts[0] == solo["abc"]


def test_replies_waiting_for_the_worker_hold_no_slot_so_the_batch_goes_on(engine, solo):
    """Replies only the worker can decode (a repetition penalty) wait in the worker's line without a slot: a plain
    reply that comes after a batch size of them decodes in the batch at once; the waiting count covers both lines."""
    penalized = PENALIZED.model_copy(update={"max_new_tokens": 40})
    expected = engine.reply(_user("hello"), penalized)[0]
    texts: dict[int, str] = {}

    def run(i: int) -> None:
        texts[i] = "".join(engine.stream_reply(_user("hello"), penalized))

    slow = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))  # both paths alike
    try:
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(engine.queue.slots)]
        for thread in threads:
            thread.start()
        # One decodes on the worker; the rest wait for it, counted as waiting, holding no slot.
        assert wait_until(lambda: engine.queue.waiting() == engine.queue.slots - 1, 30)
        assert engine.queue.active == 1
        places: list[int] = []
        events = ReplyEvents(on_queue=places.append)
        text = "".join(engine.stream_reply(_user("abc"), SamplingParams.greedy_params(SOLO_TOKENS), events=events))
        assert text == solo["abc"] and events.stats.batched and not places  # it never waited
        for thread in threads:
            thread.join(60)
    finally:
        slow.remove()
    assert list(texts.values()) == [expected] * engine.queue.slots  # the penalty applied to every one
    assert engine.queue.active == 0 and engine.queue.waiting() == 0


def test_beyond_the_batch_size_requests_wait_in_line_and_the_limit_refuses(engine):
    settings = engine.settings.model_copy(update={"max_batch_size": 2, "queue_limit": 1})
    small = ChatEngine(engine.model, engine.tokenizer, engine.info, settings)
    try:
        assert small.queue.slots == 2
        take_all_slots(small)  # two replies decoding: the batch is full
        try:
            places: list[int] = []
            events = ReplyEvents(on_queue=places.append)
            waiter = threading.Thread(
                target=lambda: list(small.stream_reply(_user("why"), SamplingParams.greedy_params(8), events=events))
            )
            waiter.start()
            assert wait_until(lambda: small.queue.waiting() == 1, timeout=30)
            with pytest.raises(QueueFullError):  # one already waits: the line is full
                list(small.stream_reply(_user("ok"), SamplingParams.greedy_params(8)))
            assert places and places[0] == 1
        finally:
            free_all_slots(small)
        waiter.join(60)
        assert events.stats.finish_reason in {"stop", "length"} and events.stats.queue_seconds > 0
    finally:
        small.close()


def test_an_engine_with_batching_off_never_starts_a_batch(engine):
    settings = engine.settings.model_copy(update={"max_batch_size": 1})
    serial = ChatEngine(engine.model, engine.tokenizer, engine.info, settings)
    try:
        assert serial.batch_decoder() is None and serial.plan.batch_reason.text.startswith("off")
        running = Running(serial, BACKGROUND[:2], SamplingParams.greedy_params(16)).join()
        assert not any(running.stats[i].batched for i in range(2))
    finally:
        serial.close()


def test_the_worker_never_sees_the_batchs_config_write(engine, solo):
    # The batch's forwards set config.is_causal=False for their duration; a worker step that saw it would attend to
    # the future. The forward lock makes them take turns.
    seen: list[object] = []

    def record(module, args) -> None:
        if threading.current_thread().name == "internlm-generate":
            seen.append(getattr(module.config, "is_causal", None))

    handle = engine.model.register_forward_pre_hook(record)
    try:
        params = [PENALIZED, *[SamplingParams.greedy_params(SOLO_TOKENS)] * 3]
        running = Running(engine, ["hello", *BACKGROUND], params).join()  # the worker's reply beside the batch
    finally:
        handle.remove()
    assert len(seen) > 20 and set(seen) == {None}
    assert running.texts[0] == solo["penalized"]
    assert [running.texts[i + 1] for i in range(3)] == [solo[p] for p in BACKGROUND]
    assert getattr(engine.model.config, "is_causal", None) is None


class _RefusingManager:
    """The batch's manager, except that it refuses new requests (as when its input queue stays full)."""

    def __init__(self, manager):
        self._manager = manager

    def __getattr__(self, name):
        return getattr(self._manager, name)

    def add_request(self, *args, **kwargs):
        raise TimeoutError("the request queue is full")


def test_a_batch_that_refuses_a_reply_ends_it_with_an_error_and_leaks_nothing(engine, solo, monkeypatch):
    batch = engine.batch_decoder()
    monkeypatch.setattr(batch, "_manager", _RefusingManager(batch._manager))
    # The first reply starts on the worker; the second preempts it, and both go to a batch that refuses them.
    running = Running(engine, ["abc", "hi"], SamplingParams.greedy_params(SOLO_TOKENS)).join()
    monkeypatch.undo()
    for i in range(2):
        assert isinstance(running.errors.get(i), GenerationError) and "could not take" in str(running.errors[i])
        assert running.stats[i].finish_reason == "error"  # never a reply silently cut short
    assert engine.queue.active == 0 and batch.active == 0
    text, stats = engine.reply(_user("abc"), SamplingParams.greedy_params(SOLO_TOKENS))
    assert text == solo["abc"] and not stats.batched  # a reply alone still goes to the worker


def test_a_closed_engine_refuses_replies_and_starts_no_threads(engine):
    subject = ChatEngine(engine.model, engine.tokenizer, engine.info, engine.settings)
    subject.reply(_user("hello"), SamplingParams.greedy_params(8))
    subject.close()
    threads = threading.active_count()
    with pytest.raises(GenerationError, match="closed"):
        list(subject.stream_reply(_user("hello"), SamplingParams.greedy_params(8)))
    with pytest.raises(GenerationError, match="closed"):
        subject.batch_decoder()
    assert threading.active_count() == threads and not subject.worker.alive


def test_a_reply_only_the_worker_can_decode_moves_the_workers_plain_reply_into_the_batch(engine, solo):
    """A plain reply decoding alone on the worker moves into the batch when a reply only the worker can decode (a
    repetition penalty) arrives, as it does for a plain one: the penalized reply starts at once, never waiting for
    the whole of the other."""
    penalized = PENALIZED.model_copy(update={"max_new_tokens": 40})
    expected = engine.reply(_user("hello"), penalized)[0]
    slow = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # both paths alike
    try:
        first = Running(engine, ["abc"], SamplingParams.greedy_params(SOLO_TOKENS))  # alone: on the worker
        events = ReplyEvents()
        chunks = engine.stream_reply(_user("hello"), penalized, events=events)
        parts = [next(chunks)]
        assert 0 not in first.texts, "the penalized reply waited for the whole plain reply on the worker"
        parts.extend(chunks)
        first.join()
    finally:
        slow.remove()
    assert "".join(parts) == expected and not events.stats.batched  # the penalty applied, on the worker
    assert first.texts[0] == solo["abc"] and first.stats[0].batched  # moved into the batch, unchanged
    assert engine.queue.active == 0 and engine.queue.waiting() == 0


def test_a_reply_that_waited_for_the_worker_keeps_its_turn_for_a_slot(engine):
    """Batch full (two slots: a penalized reply on the worker, a plain one in the batch): a penalized reply that
    comes next waits for the worker, and plain replies that come after it wait for a slot. When the worker is free,
    the penalized reply takes a slot before the plain replies that came after it (first come, first served across
    both lines), and its place in line never counts them."""
    settings = engine.settings.model_copy(update={"max_batch_size": 2})
    small = ChatEngine(engine.model, engine.tokenizer, engine.info, settings)
    penalized = PENALIZED.model_copy(update={"max_new_tokens": 30})
    started: dict[str, float] = {}
    places: list[int] = []

    def run(name: str, prompt: str, params: SamplingParams, events: ReplyEvents | None = None) -> threading.Thread:
        def body() -> None:
            for _ in small.stream_reply(_user(prompt), params, events=events):
                started.setdefault(name, time.perf_counter())

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    slow = small.model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # both paths alike
    try:
        threads = [run("worker", "hello", penalized)]
        assert wait_until(lambda: "worker" in started, 30)
        threads.append(run("batch", "abc", SamplingParams.greedy_params(SOLO_TOKENS)))
        assert wait_until(lambda: "batch" in started, 30) and small.queue.active == 2
        threads.append(run("next", "hello", penalized, ReplyEvents(on_queue=places.append)))
        assert wait_until(lambda: small.scheduler._worker_line.in_line() == 1, 30)
        for i, name in enumerate(["later", "last"]):
            threads.append(run(name, "hi", SamplingParams.greedy_params(SOLO_TOKENS)))
            assert wait_until(lambda i=i: small.queue.in_line() == i + 1, 30)
        for thread in threads:
            thread.join(120)
            assert not thread.is_alive()
    finally:
        slow.remove()
        small.close()
    assert started["next"] < started["last"], "a reply that came later took the slot first"
    assert places and set(places) == {1}, places  # the plain replies that came after it are never ahead of it


def test_two_replies_that_start_together_both_decode_in_the_batch(engine, solo, monkeypatch):
    """Two plain replies at the same moment on an idle engine: one takes the worker, the other the batch. However
    their starts interleave (here the worker's is slowed while it builds its config), the worker's reply moves into
    the batch; it never decodes beside the batch to its end, reading every weight twice per round."""
    config = engine.scheduler._generation_config

    def slow_config(*args):
        time.sleep(0.2)  # the other reply goes into the batch meanwhile
        return config(*args)

    monkeypatch.setattr(engine.scheduler, "_generation_config", slow_config)
    barrier = threading.Barrier(2)
    results: dict[int, tuple[str, object]] = {}

    def run(i: int, prompt: str) -> None:
        barrier.wait(10)
        events = ReplyEvents()
        results[i] = (
            "".join(engine.stream_reply(_user(prompt), SamplingParams.greedy_params(SOLO_TOKENS), events=events)),
            events.stats,
        )

    threads = [threading.Thread(target=run, args=(i, p), daemon=True) for i, p in enumerate(["abc", "hi"])]
    slow = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # both paths alike
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        slow.remove()
    assert [results[i][0] for i in range(2)] == [solo["abc"], solo["hi"]]
    assert all(results[i][1].batched for i in range(2)), "a reply stayed on the worker beside the batch"
