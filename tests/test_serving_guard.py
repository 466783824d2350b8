"""The request guard as an ASGI app in front of a real echo app: what passes through arrives byte for
byte, what is refused never reaches the app (the served end-to-end tests are in test_serve.py and
test_fuzz_serving.py)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from smolora_mlflow.serving.auth import ApiKeyAuth, api_key_from_env, check_api_key
from smolora_mlflow.serving.guard import POLICIES, RequestGuard, json_depth, surrogate_problem
from smolora_mlflow.serving.openai_api import OpenAIErrors, error_body
from smolora_mlflow.serving.payload import prompt_problem


async def _echo(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(app, chunks: list[bytes], headers: dict[str, str], method="POST", path="/invocations"):
    status, body, reads, _ = _run(app, chunks, headers, method, path)
    return status, body, reads


def _run(app, chunks: list[bytes], headers: dict[str, str | bytes], method="POST", path="/invocations",
         scope_type="http"):
    """(status, body, receive calls, response headers) of one request through ``app``."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages.append({"type": "http.disconnect"})
    sent, reached = [], []

    async def receive():
        reached.append(1)
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": scope_type, "method": method, "path": path,
             "headers": [(k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    if sent[0]["type"] == "websocket.close":
        return sent[0]["code"], b"", len(reached), {}
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body, len(reached), dict(sent[0].get("headers", []))


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


# ----------------------------------------------------------------------------------------------------
# issue 22: one input check for every body route, OpenAI's error shape, the API key


@pytest.mark.parametrize(("path", "openai"), [("/v1/completions", True), ("/v1/chat/completions", True),
                                              ("/stream", False)])
def test_json_only_routes_refuse_other_content_types_and_non_strict_json(path, openai):
    guard = RequestGuard(_echo, paths=tuple(POLICIES))

    def error(answer: bytes) -> str:
        document = json.loads(answer)
        if openai:
            assert set(document["error"]) == {"message", "type", "param", "code"}
            return document["error"]["message"]
        return document["message"]

    deep = b"[" * 100_000 + b"]" * 100_000
    for body, content_type, status, message in [
        (deep, "text/csv", 415, "send application/json"), (deep, "application/json", 400, "nested 100000"),
        (b'{"t": NaN}', "application/json", 400, "holds NaN"), (b'{"t": -Infinity}', "application/json", 400,
                                                                "-Infinity"),
        (b'{"t": 1e999}', "application/json", 400, "1e999"), (b'{"t": "\xff"}', "application/json", 400, "UTF-8"),
        (b'{"t": "\\udfff"}', "application/json", 400, "`t` holds a lone surrogate (U+DFFF)"),
        (b"\xef\xbb\xbf{}", "application/json", 400, "BOM"), (b"{", "application/json", 400, "not valid JSON"),
    ]:
        got, answer, reads = _call(guard, [body], {"Content-Type": content_type}, path=path)
        assert got == status and message in error(answer), (body[:20], answer)
        assert reads == (0 if status == 415 else 1)
    ok = b'{"prompt": "\\ud83d\\ude00 a pair is one character", "t": 1e300}'
    assert _call(guard, [ok], JSON, path=path)[:2] == (200, ok)


def test_invocations_surrogates_are_found_as_escapes_and_as_bytes_and_csv_still_passes():
    guard = RequestGuard(_echo)
    for body in (b'{"inputs": {"prompt": ["ok", "\\ud800"]}}',
                 '{"inputs": {"prompt": ["ok", "\ud800"]}}'.encode("utf-8", "surrogatepass")):
        status, answer, _ = _call(guard, [body], JSON)
        assert status == 400 and "`inputs.prompt[1]` holds a lone surrogate" in json.loads(answer)["message"]
    csv = b"prompt\nThe food was\n"
    assert _call(guard, [csv], {"Content-Type": "text/csv"})[:2] == (200, csv)
    assert surrogate_problem({"a": [{"\udc00": 1}]})[0] == "a[0]"
    assert surrogate_problem(["\U0001f600", "ok"]) is None


def test_a_content_length_python_calls_a_digit_but_int_refuses_is_a_400():
    status, body, reads = _call(RequestGuard(_echo), [b"{}"], {"Content-Type": "application/json",
                                                              "Content-Length": b"\xb2"})  # "²" in latin-1
    assert status == 400 and "Content-Length" in json.loads(body)["message"] and reads == 0


@pytest.mark.parametrize("prompt", [{"a": 1}, [{"a": 1}], [[{"role": "user", "content": "hi"}]], ["ok", {}]])
def test_objects_as_prompts_in_inputs_and_instances_are_named(prompt):
    for document in ({"inputs": {"prompt": prompt}}, {"instances": [{"prompt": prompt}]},
                     {"inputs": [{"prompt": prompt}]}):
        assert "got an object" in prompt_problem(document), document
    records = {"dataframe_records": [{"prompt": [{"role": "user", "content": "hi"}]}]}
    assert prompt_problem(records) is None  # chat messages where MLflow keeps them as they are


def _auth_app(key="k3y-Secret"):
    return ApiKeyAuth(_echo, key)


@pytest.mark.parametrize(("authorization", "ok"), [
    ("Bearer k3y-Secret", True), ("bearer k3y-Secret", True), ("Bearer  k3y-Secret ", True),
    (None, False), ("", False), ("Bearer", False), ("Bearer k3y-secret", False), ("Bearer k3y-Secre", False),
    ("Bearer k3y-Secret2", False), ("Basic k3y-Secret", False), ("k3y-Secret", False), ("Token k3y-Secret", False),
])
def test_api_key_is_required_on_every_route_but_the_probes(authorization, ok):
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/invocations"), ("GET", "/version"), ("GET", "/metrics"), ("POST", "/stream"),
                         ("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/anything")):
        status, body, reads, sent_headers = _run(_auth_app(), [b"{}"], {**JSON, **headers}, method, path)
        if ok:
            assert (status, body) == (200, b"{}")
            continue
        assert status == 401 and reads == 0 and sent_headers[b"www-authenticate"].startswith(b"Bearer")
        document = json.loads(body)
        if path.startswith("/v1/"):
            assert document["error"]["code"] == "invalid_api_key"
            assert document["error"]["type"] == "invalid_request_error"
        else:
            assert document["error_code"] == "UNAUTHENTICATED" and "Authorization: Bearer" in document["message"]
    for path in ("/ping", "/health"):
        assert _call(_auth_app(), [b""], headers, method="GET", path=path)[0] == 200


def test_api_key_edge_cases():
    twice = [(b"authorization", b"Bearer k3y-Secret"), (b"authorization", b"Bearer k3y-Secret")]
    assert not _auth_app().authorized({"headers": twice})  # which one a proxy checked is anyone's guess
    assert _run(_auth_app(), [b""], {}, "GET", "/ws", scope_type="websocket")[0] == 1008
    for bad in ("", "has space", "ключ", "tab\t"):
        with pytest.raises(ValueError):
            check_api_key(bad)
    assert api_key_from_env({}) is None
    with pytest.raises(ValueError, match="set but empty"):
        api_key_from_env({"SMOLORA_SERVE_API_KEY": ""})


def test_openai_errors_reshape_other_errors_and_leave_the_rest_alone():
    def answering(status: int, body: bytes, content_type: bytes = b"application/json"):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type),
                                                                                    (b"allow", b"GET")]})
            await send({"type": "http.response.body", "body": body[:3], "more_body": True})
            await send({"type": "http.response.body", "body": body[3:]})
        return app

    for status, body, message in [(404, b'{"detail": "Not Found"}', "Not Found"), (405, b"Method Not Allowed",
                                                                                    "Method Not Allowed"),
                                  (400, b'{"error_code": "X", "message": "bad"}', "bad")]:
        got, answer, _, headers = _run(OpenAIErrors(answering(status, body, b"text/plain")), [b""], {}, "GET",
                                       "/v1/x")
        assert got == status and headers[b"allow"] == b"GET" and headers[b"content-type"] == b"application/json"
        assert json.loads(answer) == error_body(message, status)
    already = json.dumps(error_body("mine", 400, "prompt")).encode()
    assert _run(OpenAIErrors(answering(400, already)), [b""], {}, "GET", "/v1/x")[1] == already
    for path, status in (("/v1/x", 200), ("/invocations", 404)):  # a success, or not a /v1/ path: untouched
        assert _run(OpenAIErrors(answering(status, b"data: x")), [b""], {}, "GET", path)[1] == b"data: x"


def test_openai_errors_answer_an_unhandled_exception_in_openai_shape(caplog):
    async def broken(scope, receive, send):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    status, body, _, _ = _run(OpenAIErrors(broken), [b"{}"], JSON, "POST", "/v1/completions")
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    assert "probability tensor" in caplog.text  # logged for the operator, not sent to the client
    with pytest.raises(RuntimeError):  # elsewhere the server's own 500 handling applies
        _run(OpenAIErrors(broken), [b"{}"], JSON, "POST", "/invocations")
