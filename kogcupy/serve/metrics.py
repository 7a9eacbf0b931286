"""Prometheus metrics of one server (its own CollectorRegistry, so apps never share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 1500, 2000, 3000, 5000)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("kogcupy_requests", "HTTP requests to the API, by route and status",
                                ["route", "status"], registry=r)
        self.finished = Counter("kogcupy_generations_finished",
                                "Generations that ran, by kogcupy finish reason",
                                ["finish_reason"], registry=r)
        self.dropped = Counter("kogcupy_queued_requests_dropped",
                               "Queued requests dropped because their client left", registry=r)
        self.rejected = Counter("kogcupy_requests_rejected_queue_full",
                                "Requests refused with 429 because the queue was full", registry=r)
        self.queue_depth = Gauge("kogcupy_queue_depth", "Requests waiting for the engine",
                                 registry=r)
        self.running = Gauge("kogcupy_requests_running", "Generations on the engine (0 or 1)",
                             registry=r)
        self.prompt_tokens = Counter("kogcupy_prompt_tokens", "Prompt tokens of generations",
                                     registry=r)
        self.cached_tokens = Counter("kogcupy_prefix_cache_hit_tokens",
                                     "Prompt tokens restored from the prefix cache (not prefilled)",
                                     registry=r)
        self.generated_tokens = Counter("kogcupy_generated_tokens", "Generated tokens",
                                        registry=r)
        self.queue_wait = Histogram("kogcupy_queue_wait_seconds",
                                    "Time from arrival to the start of the generation",
                                    buckets=_TTFT_BUCKETS, registry=r)
        self.ttft = Histogram("kogcupy_time_to_first_token_seconds",
                              "Time from arrival to the first generated text (queue included)",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.decode_tps = Histogram("kogcupy_decode_tokens_per_second",
                                    "Decode speed of each generation (tokens after the first)",
                                    buckets=_TPS_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
