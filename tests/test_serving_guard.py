"""The request guard as an ASGI app in front of a real echo app: what passes through arrives byte for
byte, what is refused never reaches the app (the served end-to-end tests are in test_serve.py and
test_fuzz_serving.py)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from smolora_mlflow.serving.guard import RequestGuard, json_depth


async def _echo(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(app, chunks: list[bytes], headers: dict[str, str], method="POST", path="/invocations"):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages.append({"type": "http.disconnect"})
    sent, reached = [], []

    async def receive():
        reached.append(1)
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body, len(reached)


JSON = {"Content-Type": "application/json"}


def test_a_chunked_body_reaches_the_app_whole_and_once():
    payload = json.dumps({"inputs": {"prompt": ["a [ { string", "b"]}}).encode()
    chunks = [payload[i:i + 7] for i in range(0, len(payload), 7)]
    status, body, _ = _call(RequestGuard(_echo), chunks, JSON)
    assert (status, body) == (200, payload)


def test_a_body_streaming_past_the_limit_is_413_without_reading_the_rest():
    status, body, reads = _call(RequestGuard(_echo, max_body_bytes=100), [b"x" * 60] * 10, JSON)
    assert status == 413 and "100" in json.loads(body)["message"]
    assert reads == 2  # stopped at the chunk that crossed the limit


@pytest.mark.parametrize(("headers", "status", "message"), [
    ({}, 415, "no Content-Type"),
    ({"Content-Type": "text/html"}, 415, "not supported"),
    ({"Content-Type": "application/json; charset=utf-16"}, 415, "charset=utf-8"),
    ({"Content-Type": "application/json", "Content-Length": "12x"}, 400, "Content-Length"),
    ({"Content-Type": "application/json", "Content-Length": "999999"}, 413, "over the 1,000"),
])
def test_refusals_never_reach_the_app(headers, status, message):
    got, body, reads = _call(RequestGuard(_echo, max_body_bytes=1000), [b"{}"], headers)
    assert got == status and message in json.loads(body)["message"]
    assert reads == 0


def test_other_routes_and_methods_pass_through_untouched():
    for method, path in (("GET", "/ping"), ("POST", "/other"), ("GET", "/invocations")):
        status, body, _ = _call(RequestGuard(_echo), [b"[" * 5000], {}, method=method, path=path)
        assert (status, body) == (200, b"[" * 5000)


def test_depth_ignores_brackets_in_strings_and_needs_no_recursion():
    assert json_depth(b'{"a": "[[[[[[", "b": ["\\"]]]]"]}') == 2
    assert json_depth(b"[" * 200_000 + b"]" * 200_000) == 200_000
    assert json_depth(b'"just a string"') == 0


def test_metrics_render_large_counters_exactly_and_count_a_500_when_the_app_raises():
    from smolora_mlflow.serving.metrics import Metrics, MetricsMiddleware

    metrics = Metrics()
    metrics.inc("smolora_generated_tokens_total", 1234567, adapter="a")
    metrics.inc("smolora_generated_tokens_total", 0.25, adapter="b")
    text = metrics.render()  # prometheus_client's text: values exact (repr of the float), whatever their size
    assert re.search(r'^smolora_generated_tokens_total\{adapter="a"\} (\S+)$', text, re.M).group(1) in (
        "1234567.0", "1.234567e+06")
    assert 'smolora_generated_tokens_total{adapter="b"} 0.25\n' in text
    assert metrics.value("smolora_generated_tokens_total", adapter="a") == 1234567

    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _call(MetricsMiddleware(broken, metrics), [b"{}"], {"content-type": "application/json"})
    assert metrics.value("smolora_http_responses_total", path="/invocations", status="500") == 1
    assert metrics.value("smolora_http_errors_total", path="/invocations", status="500") == 1
    _call(MetricsMiddleware(_echo, metrics), [b"{}"], {"content-type": "application/json"})
    assert metrics.value("smolora_http_responses_total", path="/invocations", status="200") == 1
    assert metrics.value("smolora_http_responses_total", path="/invocations", status="500") == 1
