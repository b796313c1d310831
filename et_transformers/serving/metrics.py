"""The server's Prometheus metrics: requests, tokens, TTFT and decode speed, queue and slots.

Each app gets its own ``prometheus_client`` registry (two servers in one process never mix their
counts); ``GET /metrics`` renders it in Prometheus' text format. Routes call :meth:`Metrics.finished`
once per generation; the queue depth and busy slots are read from the pool when scraped.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..generation import GenerationStats

#: Seconds from a request's arrival (queue wait included) to its first token.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Decode tokens per second of one request.
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    """The counters, histograms and gauges of one server.

    Args:
        pool: the :class:`~.slots.SlotPool` whose queue depth and busy slots are reported.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pool):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("et_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("et_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.cached_tokens = Counter("et_prompt_cached_tokens",
                                     "Prompt tokens reused from a slot's KV cache (not prefilled again).", registry=r)
        self.generated_tokens = Counter("et_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("et_time_to_first_token_seconds",
                              "Seconds from a request's arrival (queue wait included) to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.decode_speed = Histogram("et_decode_tokens_per_second", "Decode speed of each request.",
                                      buckets=SPEED_BUCKETS, registry=r)
        Gauge("et_queue_depth", "Requests waiting for a slot.", registry=r).set_function(lambda: pool.queued)
        Gauge("et_slots_busy", "Slots running a request.", registry=r).set_function(lambda: pool.busy)
        Gauge("et_slots", "Slots (loaded programs).", registry=r).set(len(pool.slots))

    def finished(self, stats: GenerationStats | None, prompt_tokens: int, cached_tokens: int,
                 ttft: float | None) -> None:
        """Count one generation: its tokens, cache hits, TTFT and decode speed."""
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        if stats is not None:
            self.generated_tokens.inc(stats.generated_tokens)
            if stats.decode_tokens_per_s:
                self.decode_speed.observe(stats.decode_tokens_per_s)
        if ttft is not None:
            self.ttft.observe(ttft)

    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)
