"""Prometheus metrics of the server (`GET /metrics`, text exposition format).

One registry per app (not the process-global default), so several apps in one process (tests)
never collide. Counters and histograms are updated by the handlers; gauges that mirror live
state (queue depth, running slots, engine counters) are read when scraped.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)


class Metrics:
    """The server's metrics; `render()` gives (body, content type) for /metrics."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float],
                 engine_stats: Callable[[], dict[str, Any]]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nemojax_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nemojax_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("nemojax_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("nemojax_time_to_first_token_seconds",
                              "Seconds from a generation request's arrival to its first generated token",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("nemojax_request_latency_seconds",
                                 "Seconds from a request's arrival to its last byte, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("nemojax_queue_depth", "Samples accepted and waiting for a slot", registry=r
              ).set_function(queue_depth)
        Gauge("nemojax_running_slots", "Slots holding a sample (prefilling or decoding)", registry=r
              ).set_function(running)
        self._engine_gauges = {
            "cached_tokens": Gauge("nemojax_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix "
                                   "cache or a sibling sample instead of computed", registry=r),
            "prefill_tokens": Gauge("nemojax_prefill_tokens", "Prompt tokens computed by prefill", registry=r),
            "compiled": Gauge("nemojax_programs_compiled", "Engine programs compiled", registry=r),
            "loaded": Gauge("nemojax_programs_loaded", "Engine programs loaded from the program cache",
                            registry=r),
            "seconds": Gauge("nemojax_program_compile_seconds", "Seconds spent compiling or loading programs",
                             registry=r),
        }
        self._engine_stats = engine_stats

    def render(self) -> tuple[bytes, str]:
        stats = self._engine_stats()
        for name, gauge in self._engine_gauges.items():
            if name in stats:
                gauge.set(float(stats[name]))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
