"""Prometheus metrics of one app, in its own CollectorRegistry (several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from internlm_app.chat_types import ReplyQueue, ReplyStats

ENDPOINTS = frozenset({"/", "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})
MODEL_PATH = "/v1/models/{model}"  # the label of every /v1/models/<id> (one label, not one per id asked for)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SPEED = (1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000)


class Metrics:
    """Request, token, latency and queue metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "internlm_requests", "HTTP requests answered.", ["endpoint", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "internlm_request_duration_seconds",
            "Time to answer a request.",
            ["endpoint"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.replies = Counter("internlm_replies", "Replies by how they ended.", ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("internlm_prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.completion_tokens = Counter("internlm_completion_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram(
            "internlm_time_to_first_token_seconds",
            "Time to the first token, after the queue.",
            buckets=_SECONDS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "internlm_tokens_per_second", "Decode speed of a reply.", buckets=_SPEED, registry=registry
        )
        self.queue_wait = Histogram(
            "internlm_queue_wait_seconds", "Time waiting for the GPU.", buckets=_SECONDS, registry=registry
        )
        self.queue_waiting = Gauge("internlm_queue_waiting", "Requests waiting for the GPU.", registry=registry)
        self.busy = Gauge("internlm_generation_busy", "1 while a reply is being generated.", registry=registry)
        self.active = Gauge("internlm_generation_active", "Replies being generated now.", registry=registry)

    def watch_queue(self, queue: ReplyQueue | None) -> None:
        """Read the queue gauges from the backend's GPU queue at scrape time (none for a remote backend)."""
        if queue is not None:
            self.queue_waiting.set_function(queue.waiting)
            self.busy.set_function(lambda: float(queue.active > 0))
            self.active.set_function(lambda: float(queue.active))

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else MODEL_PATH if path.startswith("/v1/models/") else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def observe_reply(self, stats: ReplyStats, finish_reason: str) -> None:
        self.replies.labels(finish_reason).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.completion_tokens)
        self.queue_wait.observe(stats.queue_seconds)
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token)
        if stats.tokens_per_second:
            self.tokens_per_second.observe(stats.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
