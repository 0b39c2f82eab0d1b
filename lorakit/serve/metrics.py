"""Prometheus metrics of one server (its own registry, so that several apps in one process stay apart)."""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError

prom: Any
try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - the serve extra installs it
    prom = None


class Metrics:
    """Requests by route and status, tokens, queue depth, batch size, and latency histograms."""

    def __init__(self) -> None:
        if prom is None:
            raise LorakitError("lorakit serve needs prometheus-client; install the serve extra: "
                               "pip install 'lorakit[serve]'")
        self.registry = prom.CollectorRegistry()
        r: Any = {"registry": self.registry}
        self.requests = prom.Counter("lorakit_requests", "HTTP requests answered", ["route", "status"], **r)
        self.prompt_tokens = prom.Counter("lorakit_prompt_tokens", "prompt tokens of completions", **r)
        self.generation_tokens = prom.Counter("lorakit_generation_tokens", "tokens generated", **r)
        self.queue_depth = prom.Gauge("lorakit_queue_depth", "requests waiting to join the batch", **r)
        self.batch_size = prom.Gauge("lorakit_batch_size", "rows in the running batch", **r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
        self.latency = prom.Histogram("lorakit_request_latency_seconds", "time from request to last token",
                                      buckets=buckets, **r)
        self.first_token = prom.Histogram("lorakit_time_to_first_token_seconds", "time from request to first token",
                                          buckets=buckets, **r)

    def on_step(self, batch_size: int, queue_depth: int) -> None:
        self.batch_size.set(batch_size)
        self.queue_depth.set(queue_depth)

    def text(self) -> bytes:
        assert prom is not None
        return bytes(prom.generate_latest(self.registry))
