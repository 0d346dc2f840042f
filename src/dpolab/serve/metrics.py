"""Server metrics in the Prometheus text format, without a client library.

Counters only go up (Prometheus computes rates itself); tokens/s is also given as a gauge over
the last minute because a person reading /metrics by hand wants that number directly.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

WINDOW_S = 60.0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.generations: Counter[str] = Counter()  # finish_reason -> count
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.rejected = 0  # 429s: the queue was full
        self._recent: deque[tuple[float, int, float]] = deque()  # (end time, tokens, seconds)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def count_generation(self, finish_reason: str, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.generations[finish_reason] += 1
            self.generated_tokens += tokens
            self.generation_seconds += seconds
            self._recent.append((now, tokens, seconds))
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, s) for end, t, s in self._recent if end >= now - WINDOW_S]
        seconds = sum(s for _, s in recent)
        return sum(t for t, _ in recent) / seconds if seconds > 0 else 0.0

    def render(self, queue_depth: int, active: int, workers: int, max_queue: int, ready: bool) -> str:
        with self._lock:
            requests = sorted(self.requests.items())
            generations = sorted(self.generations.items())
            tokens, seconds, rejected = self.generated_tokens, self.generation_seconds, self.rejected
        lines = [
            "# HELP dpolab_requests_total HTTP requests answered, by endpoint and status.",
            "# TYPE dpolab_requests_total counter",
            *(f'dpolab_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in requests),
            "# HELP dpolab_rejected_total Generation requests refused with 429 because the queue was full.",
            "# TYPE dpolab_rejected_total counter",
            f"dpolab_rejected_total {rejected}",
            "# HELP dpolab_queue_depth Generation jobs waiting for a worker.",
            "# TYPE dpolab_queue_depth gauge",
            f"dpolab_queue_depth {queue_depth}",
            "# HELP dpolab_queue_capacity Jobs that may wait before requests get 429.",
            "# TYPE dpolab_queue_capacity gauge",
            f"dpolab_queue_capacity {max_queue}",
            "# HELP dpolab_active_generations Generation jobs running now.",
            "# TYPE dpolab_active_generations gauge",
            f"dpolab_active_generations {active}",
            "# HELP dpolab_workers Generation worker threads.",
            "# TYPE dpolab_workers gauge",
            f"dpolab_workers {workers}",
            "# HELP dpolab_generations_total Finished generations, by finish reason.",
            "# TYPE dpolab_generations_total counter",
            *(f'dpolab_generations_total{{finish_reason="{r}"}} {n}' for r, n in generations),
            "# HELP dpolab_generated_tokens_total Tokens generated.",
            "# TYPE dpolab_generated_tokens_total counter",
            f"dpolab_generated_tokens_total {tokens}",
            "# HELP dpolab_generation_seconds_total Time spent generating.",
            "# TYPE dpolab_generation_seconds_total counter",
            f"dpolab_generation_seconds_total {seconds:.6f}",
            "# HELP dpolab_tokens_per_second Generated tokens per generation-second over the last minute.",
            "# TYPE dpolab_tokens_per_second gauge",
            f"dpolab_tokens_per_second {self.tokens_per_second():.3f}",
            "# HELP dpolab_ready 1 once the models are loaded.",
            "# TYPE dpolab_ready gauge",
            f"dpolab_ready {int(ready)}",
        ]
        return "\n".join(lines) + "\n"
