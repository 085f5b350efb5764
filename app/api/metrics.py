"""Prometheus metrics, named like vLLM's where a counterpart exists."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One registry per app instance, so tests can build many apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lda_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.waiting = Gauge("lda_num_requests_waiting", "jobs queued for the engine", registry=r)
        self.running = Gauge(
            "lda_num_requests_running", "requests on the engine (in running batches or running whole)", registry=r
        )
        self.batch_rows = Gauge("lda_num_batch_rows", "rows decoding in the running batches", registry=r)
        self.batch_tokens_budget = Gauge(
            "lda_batch_tokens_budget",
            "padded tokens a running batch may hold now: MAX_BATCH_TOKENS, lowered for a while after an "
            "out-of-memory error (-1: no bound)",
            registry=r,
        )
        self.ttft = Histogram(
            "lda_time_to_first_token_seconds",
            "request arrival to first token",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lda_e2e_request_latency_seconds",
            "request arrival to last token",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "lda_request_prefill_time_seconds",
            "time a request spent prefilling its prompts in the running batch",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            "lda_request_decode_time_seconds",
            "time a request's rows spent decoding in the running batch (its prefill to its last row out)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("lda_generation_tokens", "tokens generated", ["route"], registry=r)
        self.rejected = Counter("lda_queue_rejections", "requests refused with 429 (queue full)", registry=r)

    def engine_changed(
        self, waiting: int, running: int, batch_rows: int = 0, batch_tokens_budget: int | None = None
    ) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.batch_rows.set(batch_rows)
        self.batch_tokens_budget.set(-1 if batch_tokens_budget is None else batch_tokens_budget)

    def render(self) -> bytes:
        return generate_latest(self.registry)
