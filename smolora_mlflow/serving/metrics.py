"""``GET /metrics``: the server's counters in Prometheus text format (version 0.0.4), without a client library.

:class:`Metrics` is both the wrapper's observer (requests, batches, queue waits, tokens, per adapter; see
``smolora_mlflow.flavor.wrapper``) and what the routes report to (responses by status, time to first
token, streams). :class:`MetricsMiddleware` counts every HTTP response by path and status, MLflow's
``/invocations`` included.

Example:
    >>> m = Metrics()
    >>> m.request("default")
    >>> "smolora_requests_total{adapter=\\"default\\"} 1" in m.render()
    True
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNOWN_PATHS = ("/invocations", "/ping", "/health", "/version", "/metrics", "/stream", "/v1/models",
               "/v1/completions", "/v1/chat/completions")

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = (*labels, *extra)
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: Labels) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f"{name}_bucket{_fmt(labels, (('le', le),))} {running}")
        return [*out, f"{name}_sum{_fmt(labels)} {self.sum!r}", f"{name}_count{_fmt(labels)} {running}"]


# name -> (type, help, histogram buckets)
FAMILIES: dict[str, tuple[str, str, tuple[float, ...] | None]] = {
    "smolora_requests_total": ("counter", "Generation requests accepted, by adapter.", None),
    "smolora_http_responses_total": ("counter", "HTTP responses, by path and status.", None),
    "smolora_http_errors_total": ("counter", "HTTP responses with status >= 400, by path and status.", None),
    "smolora_queue_wait_seconds": ("histogram", "Time a prompt waited before its generate call, by adapter.",
                                   SECONDS_BUCKETS),
    "smolora_batch_size": ("histogram", "Prompts per generate call.", SIZE_BUCKETS),
    "smolora_batch_adapters": ("histogram", "Distinct adapters per generate call.", SIZE_BUCKETS),
    "smolora_generated_tokens_total": ("counter", "Tokens generated, by adapter.", None),
    "smolora_time_to_first_token_seconds": ("histogram", "Request start to first streamed piece, by adapter.",
                                            SECONDS_BUCKETS),
    "smolora_streams_active": ("gauge", "Streams being generated now.", None),
    "smolora_streams_cancelled_total": ("counter", "Streams stopped because the client went away, by adapter.",
                                        None),
}


class Metrics:
    """Thread-safe counters, gauges and histograms; :meth:`render` gives the Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, Any]] = defaultdict(dict)
        self.started = time.time()

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0) + by

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            hist = self._values[name].get(key)
            if hist is None:
                hist = self._values[name][key] = _Histogram(FAMILIES[name][2] or SECONDS_BUCKETS)
            hist.observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value (0 when never touched); for tests and logs."""
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0)

    # the wrapper's observer interface
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
        lines: list[str] = []
        with self._lock:
            for name, (kind, text, _) in FAMILIES.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                series = self._values.get(name) or ({(): 0} if kind == "gauge" else {})
                for labels, value in sorted(series.items()):
                    if isinstance(value, _Histogram):
                        lines += value.lines(name, labels)
                    else:
                        lines.append(f"{name}{_fmt(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A sample value as Prometheus text, exactly: ``:g`` would print 1234567 as 1.23457e+06."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


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
