"""Server metrics for Prometheus, through ``prometheus-client``.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`: two apps in one process (the
tests, a notebook) never share or double-register series, and /metrics shows only this app's.
Counters only go up (Prometheus computes rates itself); latencies are histograms, so quantiles
can be computed across scrapes. tokens/s is also given as a gauge over the last minute because a
person reading /metrics by hand wants that number directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

WINDOW_S = 60.0
# CPU generation: tens of milliseconds (one short answer) to the 120 s request limit.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dpolab_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram(
            "dpolab_request_duration_seconds", "Time to answer a request, by endpoint (for a streamed "
            "answer: until its headers; the generation is in dpolab_generation_duration_seconds).",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("dpolab_rejected", "Generation requests refused with 429 because the queue "
                                "was full.", registry=r)
        self.generations = Counter("dpolab_generations", "Finished generations, by finish reason.",
                                   ["finish_reason"], registry=r)
        self.generated_tokens = Counter("dpolab_generated_tokens", "Tokens generated.", registry=r)
        self.generation_seconds = Histogram("dpolab_generation_duration_seconds", "Time one answer took to "
                                            "generate, from its start to its last token.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("dpolab_time_to_first_token_seconds", "From a request's "
                                             "admission (queue wait included) to its first answer text.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dpolab_queue_depth", "Generation jobs waiting for a worker.", registry=r)
        self.queue_capacity = Gauge("dpolab_queue_capacity", "Jobs that may wait before requests get 429.",
                                    registry=r)
        self.active = Gauge("dpolab_active_generations", "Generation jobs running now.", registry=r)
        self.workers = Gauge("dpolab_workers", "Generation worker threads.", registry=r)
        self.ready = Gauge("dpolab_ready", "1 once the models are loaded.", registry=r)
        Gauge("dpolab_tokens_per_second", "Generated tokens per generation-second over the last minute.",
              registry=r).set_function(self.tokens_per_second)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int, float]] = deque()  # (end time, tokens, seconds)

    def count_request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if seconds is not None:
            self.request_seconds.labels(endpoint).observe(seconds)

    def count_rejected(self) -> None:
        self.rejected.inc()

    def observe_first_token(self, seconds: float) -> None:
        self.first_token_seconds.observe(seconds)

    def count_generation(self, finish_reason: str, tokens: int, seconds: float) -> None:
        self.generations.labels(finish_reason).inc()
        self.generated_tokens.inc(tokens)
        self.generation_seconds.observe(seconds)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens, seconds))
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, s) for end, t, s in self._recent if end >= now - WINDOW_S]
        seconds = sum(s for _, s in recent)
        return sum(t for t, _ in recent) / seconds if seconds > 0 else 0.0

    def render(self, queue_depth: int, active: int, workers: int, max_queue: int, ready: bool) -> bytes:
        """The Prometheus text exposition of this app's registry, gauges set to the engine's state now."""
        self.queue_depth.set(queue_depth)
        self.active.set(active)
        self.workers.set(workers)
        self.queue_capacity.set(max_queue)
        self.ready.set(int(ready))
        return generate_latest(self.registry)
