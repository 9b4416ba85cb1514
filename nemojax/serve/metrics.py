"""Prometheus metrics of the server (`GET /metrics`, text exposition format).

Names follow vLLM's where they mean the same thing (prefix `nemojax_` instead of `vllm:`), so
dashboards and alerts written for vLLM carry over: queue / prefill / decode time and
inter-token latency histograms, KV-cache usage, prefix-cache queries and hits as counters (hit
rate = rate(hits) / rate(queries)), finished samples by reason, and a `model_name` label on
every model metric.

Bounded by construction: every label takes a fixed set of values. HTTP metrics are labelled
with the route's template (`endpoint="/v1/completions"`), and every path that is no route with
the one value "unmatched", so requests to arbitrary paths never add series.

One registry per app (not the process-global default), so several apps in one process (tests)
never collide. Counters and histograms are updated on the app's event loop; what mirrors live
engine state (queue depth, slots, KV cache, the engine's own counters) is read when scraped.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5)
UNMATCHED = "unmatched"  # the endpoint label of every path that is not a route
FINISH_REASONS = ("stop", "length", "abort")


class WeightedHistogram:
    """A histogram that takes one value observed `count` times in O(log buckets): a decode call
    gives a sample several tokens at once, each with the same inter-token latency."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], labels: dict[str, str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = [float(b) for b in buckets]
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def family(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            cumulative += n
            buckets.append((bound, cumulative))
        h.add_metric(list(self.labels.values()), buckets, self.sum)
        return h


class _Live:
    """Collector for what is read at scrape time: gauges of live state and the engine's counters."""

    def __init__(self, model: str, state: Callable[[], dict[str, Any]], extra: list[WeightedHistogram]) -> None:
        self.model, self.state, self.extra = model, state, extra

    def collect(self) -> Iterator[Any]:
        s = self.state()
        m = {"model_name": self.model}
        gauges = [("nemojax_queue_depth", "Samples accepted and waiting for a slot", "queue_depth"),
                  ("nemojax_running_slots", "Slots holding a sample (prefilling or decoding)", "running"),
                  ("nemojax_kv_cache_usage_perc", "Fraction of the KV cache reserved by running samples (each "
                   "slot reserves max-len rows; 1 = every slot held, new samples queue)", "kv_reserved"),
                  ("nemojax_kv_cache_filled_perc", "Fraction of the KV cache's rows holding a token", "kv_filled")]
        counters = [("nemojax_prefix_cache_queries", "Prompt tokens of samples admitted to a slot (prefix-cache "
                     "lookups, in tokens)", "prompt_tokens"),
                    ("nemojax_prefix_cache_hits", "Prompt tokens reused from the prefix cache or a sibling sample "
                     "instead of computed", "cached_tokens"),
                    ("nemojax_prefill_tokens", "Prompt tokens computed by prefill", "prefill_tokens"),
                    ("nemojax_programs_compiled", "Engine programs compiled", "compiled"),
                    ("nemojax_programs_loaded", "Engine programs loaded from the program cache", "loaded"),
                    ("nemojax_program_compile_seconds", "Seconds spent compiling or loading programs", "seconds")]
        for name, doc, key in gauges:
            if key in s:
                g = GaugeMetricFamily(name, doc, labels=list(m))
                g.add_metric(list(m.values()), float(s[key]))
                yield g
        for name, doc, key in counters:
            if key in s:
                c = CounterMetricFamily(name, doc, labels=list(m))
                c.add_metric(list(m.values()), float(s[key]))
                yield c
        for h in self.extra:
            yield h.family()


class Metrics:
    """The server's metrics; `render()` gives (body, content type) for /metrics.

    state(): live values by key (see _Live.collect); missing keys are not exported (a
    reward-only server has no engine)."""

    def __init__(self, model_name: str, state: Callable[[], dict[str, Any]]) -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        mn = ["model_name"]
        self.requests = Counter("nemojax_requests", "HTTP requests answered, by route template and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("nemojax_request_latency_seconds",
                                 "Seconds from a request's arrival to its last byte, by route template",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("nemojax_time_to_first_token_seconds",
                              "Seconds from a generation request's arrival to its first generated token",
                              ["endpoint", "model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nemojax_prompt_tokens", "Prompt tokens of accepted requests", mn, registry=r)
        self.completion_tokens = Counter("nemojax_completion_tokens", "Tokens generated", mn, registry=r)
        self.finished = Counter("nemojax_request_success", "Samples finished, by reason: stop (a stop token or "
                                "string), length (max_tokens or the context), abort (client gone, timeout, error)",
                                ["finished_reason", "model_name"], registry=r)
        self.queue_time = Histogram("nemojax_request_queue_time_seconds",
                                    "Seconds a sample waited for a slot", mn, buckets=PHASE_BUCKETS, registry=r)
        self.prefill_time = Histogram("nemojax_request_prefill_time_seconds",
                                      "Seconds from a sample's admission to its first token", mn,
                                      buckets=PHASE_BUCKETS, registry=r)
        self.decode_time = Histogram("nemojax_request_decode_time_seconds",
                                     "Seconds from a sample's first token to its end", mn,
                                     buckets=PHASE_BUCKETS, registry=r)
        self.itl = WeightedHistogram("nemojax_inter_token_latency_seconds",
                                     "Seconds between successive tokens of a sample (a decode call's time "
                                     "split over the tokens it gave the sample)", ITL_BUCKETS, {"model_name": model_name})
        for reason in FINISH_REASONS:  # present from the start, so rates work from the first scrape
            self.finished.labels(reason, model_name)
        r.register(_Live(model_name, state, [self.itl]))

    def sample_done(self, completion: Any) -> None:
        """A sample finished: its reason, tokens and (when the engine timed it) its phases."""
        m = self.model_name
        self.finished.labels(completion.finish_reason if completion.finish_reason in FINISH_REASONS else "stop",
                             m).inc()
        self.completion_tokens.labels(m).inc(completion.completion_tokens)
        t = getattr(completion, "timing", None)
        if t is None:
            return
        self.queue_time.labels(m).observe(max(0.0, t.scheduled - t.queued))
        first = t.first_token if t.first_token is not None else t.finished
        self.prefill_time.labels(m).observe(max(0.0, first - t.scheduled))
        self.decode_time.labels(m).observe(max(0.0, t.finished - first))
        for gap, count in t.token_gaps:
            self.itl.observe(gap, count)

    def samples_aborted(self, count: int) -> None:
        if count:
            self.finished.labels("abort", self.model_name).inc(count)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
