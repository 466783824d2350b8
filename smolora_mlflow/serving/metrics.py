"""``GET /metrics``: the server's counters in Prometheus text format, through ``prometheus_client``.

:class:`Metrics` is both the wrapper's observer (requests, batches, queue waits, tokens, per adapter; see
``smolora_mlflow.flavor.scheduler.Observer``) and what the routes report to (responses by status, time to
first token, streams). :class:`MetricsMiddleware` counts every HTTP response by path and status, MLflow's
``/invocations`` included. Each :class:`Metrics` has its own ``CollectorRegistry`` (a process may hold
several models, and tests make many), rendered in the text format version 0.0.4 that every Prometheus
scrapes.

Example:
    >>> m = Metrics()
    >>> m.request("default")
    >>> m.value("smolora_requests_total", adapter="default")
    1.0
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNOWN_PATHS = ("/invocations", "/ping", "/health", "/version", "/metrics", "/stream", "/v1/models",
               "/v1/completions", "/v1/chat/completions")

# name -> (type, help, labels, histogram buckets)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "smolora_requests_total": ("counter", "Generation requests accepted, by adapter.", ("adapter",), None),
    "smolora_http_responses_total": ("counter", "HTTP responses, by path and status.", ("path", "status"), None),
    "smolora_http_errors_total": ("counter", "HTTP responses with status >= 400, by path and status.",
                                  ("path", "status"), None),
    "smolora_queue_wait_seconds": ("histogram", "Time a prompt waited before it joined the running batch, by "
                                   "adapter.", ("adapter",), SECONDS_BUCKETS),
    "smolora_batch_size": ("histogram", "Prompts admitted together (one prefill, or one grouped generate call).",
                           (), SIZE_BUCKETS),
    "smolora_batch_adapters": ("histogram", "Distinct adapters among the prompts admitted together.", (),
                               SIZE_BUCKETS),
    "smolora_generated_tokens_total": ("counter", "Tokens generated, by adapter.", ("adapter",), None),
    "smolora_time_to_first_token_seconds": ("histogram", "Request start to first streamed piece, by adapter.",
                                            ("adapter",), SECONDS_BUCKETS),
    "smolora_streams_active": ("gauge", "Streams being generated now.", (), None),
    "smolora_streams_cancelled_total": ("counter", "Streams stopped because the client went away, by adapter.",
                                        ("adapter",), None),
}
_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Metrics:
    """The server's metric families in their own registry; :meth:`render` gives the Prometheus text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families = {}
        for name, (kind, text, labels, buckets) in FAMILIES.items():
            extra = {"buckets": buckets} if buckets else {}
            self._families[name] = _KINDS[kind](name, text, labels, registry=self.registry, **extra)
        self.started = time.time()

    def _child(self, name: str, labels: dict[str, str]):
        family = self._families[name]
        return family.labels(**labels) if labels else family

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        child = self._child(name, labels)
        if by < 0:  # only gauges go down
            child.dec(-by)
        else:
            child.inc(by)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value (0 when never touched); for tests and logs."""
        return self.registry.get_sample_value(name, labels or None) or 0.0

    # the scheduler's observer interface
    def request(self, adapter: str) -> None:
        self.inc("smolora_requests_total", adapter=adapter)

    def batch(self, prompts: int, adapters: list[str], waits: list[float]) -> None:
        self.observe("smolora_batch_size", prompts)
        self.observe("smolora_batch_adapters", len(set(adapters)))
        for adapter, wait in zip(adapters, waits, strict=True):
            self.observe("smolora_queue_wait_seconds", max(0.0, wait), adapter=adapter)

    def tokens(self, adapter: str, n: int) -> None:
        self.inc("smolora_generated_tokens_total", n, adapter=adapter)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class MetricsMiddleware:
    """Count each HTTP response by path (unknown paths as ``other``) and status."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path") if scope.get("path") in KNOWN_PATHS else "other"

        started = False

        def count(status: int) -> None:
            self.metrics.inc("smolora_http_responses_total", path=path, status=str(status))
            if status >= 400:
                self.metrics.inc("smolora_http_errors_total", path=path, status=str(status))

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:  # not a cancellation: that is a client gone, not an answer
            if not started:  # the server answers it with a 500
                count(500)
            raise
