"""Hostile requests against a real `smolora serve` (MLflow's scoring app behind the request guard and the
API-key check, on 127.0.0.1, one server for the module): at least 1,000 generated requests on every route
(`/invocations` from hypothesis; `/v1/completions`, `/v1/chat/completions`, `/stream`, `/v1/models`,
`/metrics`, `/ping`, `/health`, `/version` from seeded generators, see fuzz_requests.py), the exact
requests that answered 500 before (MLflow's and issue 22's), and concurrent bursts. Every answer is a 4xx
with a message (in OpenAI's shape on /v1/) or a correct 200, never a 5xx and never a hang past the request
timeout; a 401 exactly when the key is wrong; concurrent requests get their own completions; `/ping`
answers afterwards. The server runs with `smolora serve --api_key`, which the real `openai` client uses."""

from __future__ import annotations

import http.client
import json
import random
import secrets
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from fuzz_requests import JSON_ONLY, OPEN_PATHS, Case, Client, get_case, post_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import launch_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 60  # MLflow's scoring server gives up on a request after 60 s
GENERATED = 1000
PER_ROUTE = 1000
DEFAULT_TOKENS = 2
KEY = "fuzz-" + secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {KEY}"}
PARAM_NAMES = ["max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "seed",
               "return_full_text"]
_LOCK = threading.Lock()
STATS = {"requests": 0, "ok": 0, "client_errors": 0, "server_errors": 0, "slowest_s": 0.0, "started": None}
ROUTES: dict[str, Counter] = {}  # per route: requests and answers by status class
SERVER: dict[str, int] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_dir):
    from conftest import free_port

    from smolora_mlflow import flavor

    root, port = tmp_path_factory.mktemp("fuzz"), free_port()
    flavor.save_model(root / "model", demo_model_dir, pip_requirements=["torch", "transformers", "safetensors"],
                      generation_defaults={"max_new_tokens": DEFAULT_TOKENS}, max_new_tokens_limit=64)
    srv = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", str(root / "model"), "-p", str(port),
                         "--api_key", KEY], port, root / "server.log", cwd=root,
                        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    srv.wait("/ping", timeout=180)
    STATS["started"] = time.monotonic()
    SERVER.update(port=port, pid=srv.proc.pid)
    yield srv.url
    srv.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
prompts = st.one_of(
    st.text(max_size=60),
    st.just("x" * 300_000),  # a huge string
    st.integers(), st.none(), st.booleans(), st.floats(), st.lists(st.text(max_size=10), max_size=3),
    st.just([{"role": "user", "content": "hi"}]), st.just([{"role": "robot"}]),
)
param_values = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=8), st.none(), st.just(10**9),
)
params = st.dictionaries(st.sampled_from([*PARAM_NAMES, "unknown_field", "max_tokens"]), param_values, max_size=4)
deep = st.integers(min_value=50, max_value=1200).map(lambda depth: "[" * depth + "]" * depth)
bodies = st.one_of(
    st.builds(lambda ps, p: {"dataframe_records": [{"prompt": x} for x in ps], "params": p},
              st.lists(prompts, min_size=1, max_size=3), params),
    st.builds(lambda ps, p: {"dataframe_split": {"columns": ["prompt"], "data": [[x] for x in ps]}, "params": p},
              st.lists(prompts, min_size=1, max_size=3), params),
    st.builds(lambda ps, p: {"inputs": {"prompt": ps}, "params": p}, st.lists(prompts, max_size=3), params),
    st.builds(lambda ps, extra: {"instances": [{"prompt": x} for x in ps], **extra},
              st.lists(prompts, max_size=3), st.dictionaries(st.text(max_size=8), json_values, max_size=2)),
    st.builds(lambda p, extra: {"prompt": p, **extra}, prompts, params),  # MLflow's unified LLM payload
    json_values.map(lambda v: {"inputs": v}),
    json_values,
)
valid = st.builds(  # well-formed requests, so that a good share of the traffic generates text
    lambda form, ps, n: {**({"inputs": {"prompt": ps}} if form else {"dataframe_records": [{"prompt": p} for p in ps]}),
                         "params": {"max_new_tokens": n}},
    st.booleans(), st.lists(st.text(min_size=1, max_size=30).filter(str.strip), min_size=1, max_size=3),
    st.integers(min_value=1, max_value=8))
raw_bodies = st.one_of(
    valid.map(json.dumps), valid.map(json.dumps), valid.map(json.dumps),
    bodies.map(json.dumps),
    deep.map(lambda d: '{"inputs": ' + d + "}"), deep,  # RecursionError in MLflow's decoder from ~1,000 deep
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),  # not JSON at all
    st.just('{"dataframe_records": [{"prompt": "a"}'),  # truncated JSON
    st.just('{"inputs": {"prompt": ["a"]}, "big": ' + "9" * 5000 + "}"),  # a 500 in MLflow's parser (issue 22)
    st.lists(st.text(max_size=30), max_size=4).map(lambda rows: "prompt\n" + "\n".join(rows)),  # CSV-ish
)
content_types = st.one_of(
    st.just("application/json"),
    st.sampled_from([None, "", "text/csv", "text/plain", "application/x-www-form-urlencoded", "APPLICATION/JSON",
                     "application/json; charset=utf-8", "application/json; charset=latin-1",
                     "application/json; format=pandas-records", "application/x-parquet", "multipart/form-data"]),
)


class _Answer:
    """The parts of a requests.Response the checks read, from the fast keep-alive client."""

    def __init__(self, status: int, headers: dict[str, str], data: bytes):
        self.status_code, self.headers, self.content = status, headers, data
        self.text = data.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


_CLIENTS: dict[int, Client] = {}


def _send(url: str, body: str, content_type: str | None) -> _Answer:
    headers = {**AUTH, **({} if content_type is None else {"Content-Type": content_type})}
    client = _CLIENTS.setdefault(SERVER["port"], Client(SERVER["port"], REQUEST_TIMEOUT + 15))
    start = time.monotonic()
    response = _Answer(*client.send(Case("POST", "/invocations", body.encode("utf-8", "surrogatepass"), headers)))
    elapsed = time.monotonic() - start
    with _LOCK:  # bursts send from threads
        STATS["requests"] += 1
        STATS["slowest_s"] = max(STATS["slowest_s"], elapsed)
        STATS["server_errors"] += response.status_code >= 500
    assert elapsed < REQUEST_TIMEOUT, f"took {elapsed:.1f}s: {body[:200]}"
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]} for {content_type} {body[:300]}"
    return response


def _check(url: str, body: str, content_type: str | None = "application/json") -> None:
    response = _send(url, body, content_type)
    if response.status_code == 200:
        STATS["ok"] += 1
        out = response.json()
        predictions = out["predictions"] if isinstance(out, dict) else out
        assert isinstance(predictions, list)
        assert all(isinstance(row["generated_text"], str) for row in predictions)
    else:
        STATS["client_errors"] += 1
        assert 400 <= response.status_code < 500
        # MLflow's own 415 for a content type it does not know is plain text; everything else is JSON
        message = response.json().get("message") if "json" in response.headers["content-type"] else response.text
        assert message, response.text[:300]


@settings(max_examples=GENERATED, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(body=raw_bodies, content_type=content_types)
def test_hostile_requests_never_5xx_and_never_hang(server, body, content_type):
    _check(server, body, content_type)


def test_the_requests_mlflow_answered_with_500(server):
    """The issue's requests verbatim: ten bodies nested ~1,000 deep and three with no Content-Type."""
    for depth in range(995, 1005):
        response = _send(server, '{"inputs": ' + "[" * depth + "]" * depth + "}", "application/json")
        assert response.status_code == 400 and "nested" in response.json()["message"]
    for _ in range(3):
        response = _send(server, json.dumps({"inputs": {"prompt": ["The food was"]}}), None)
        assert response.status_code == 415 and "Content-Type" in response.json()["message"]


def test_limits_are_enforced_with_clear_messages(server):
    huge_tokens = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["hi"]},
                                                               "params": {"max_new_tokens": 10**9}}, timeout=60,
                                headers=AUTH)
    assert huge_tokens.status_code == 400 and "max_new_tokens" in huge_tokens.json()["message"]
    long_prompt = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["x" * 300_000]}}, timeout=60,
                                headers=AUTH)
    assert long_prompt.status_code == 400 and "max_prompt_chars" in long_prompt.json()["message"]
    many = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["hi"] * 1000}}, timeout=60,
                         headers=AUTH)
    assert many.status_code == 400 and "max_prompts_per_request" in many.json()["message"]


def _burst_payload(prompt: str, i: int, tokens: int) -> dict:
    forms = [{"inputs": {"prompt": [prompt]}}, {"dataframe_records": [{"prompt": prompt}]},
             {"dataframe_split": {"columns": ["prompt"], "data": [[prompt]]}}, {"instances": [{"prompt": prompt}]}]
    return {**forms[i % len(forms)], "params": {"max_new_tokens": tokens}}


def test_concurrent_bursts_never_mix_completions(server, demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.generation import generate

    words = ["The food was", "Our waiter", "I would come back", "Great", "The soup", "Dessert", "Service",
             "Prices were"]
    jobs = [(f"{words[i % 8]} {burst} {i}", burst, i, 2 + (i % 2) * 2) for burst in range(12) for i in range(8)]
    model, tok = AutoModelForCausalLM.from_pretrained(demo_model_dir), AutoTokenizer.from_pretrained(demo_model_dir)
    want = {(p, n): generate(model, tok, [p], max_new_tokens=n)[0] for p, _, _, n in jobs}

    def ask(job):
        prompt, _, i, tokens = job
        if i == 5:  # a bad request inside each burst must not disturb the others
            return _send(server, json.dumps({"inputs": {"prompt": [None]}}), "application/json").status_code
        response = _send(server, json.dumps(_burst_payload(prompt, i, tokens)), "application/json")
        assert response.status_code == 200, response.text[:300]
        return [row["generated_text"] for row in response.json()["predictions"]]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for burst in range(12):
            batch = [j for j in jobs if j[1] == burst]
            for job, got in zip(batch, pool.map(ask, batch), strict=True):
                assert got == (400 if job[2] == 5 else [want[(job[0], job[3])]]), job


# ----------------------------------------------------------------------------------------------------
# issue 22's requests verbatim, and the API key with the real openai client


def _post(server: str, path: str, body: str | bytes, content_type: str = "application/json") -> requests.Response:
    data = body.encode() if isinstance(body, str) else body
    return requests.post(f"{server}{path}", data=data, headers={**AUTH, "Content-Type": content_type}, timeout=60)


def _openai_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_issue_22_requests_that_answered_500(server):
    """A lone surrogate in a prompt, a message's content or role; JSON 100,000 deep sent as text/csv."""
    surrogate = '"\\ud800"'  # the JSON escape, as a client would send it
    for path, body, param in [
        ("/v1/completions", f'{{"model": "m", "prompt": {surrogate}, "max_tokens": 1}}', "prompt"),
        ("/v1/completions", f'{{"model": "m", "prompt": ["ok", {surrogate}], "max_tokens": 1}}', "prompt[1]"),
        ("/v1/chat/completions", f'{{"model": "m", "messages": [{{"role": "user", "content": {surrogate}}}]}}',
         "messages[0].content"),
        ("/v1/chat/completions", f'{{"model": "m", "messages": [{{"role": {surrogate}, "content": "hi"}}]}}',
         "messages[0].role")]:
        error = _openai_error(_post(server, path, body), 400)
        assert error["param"] == param and "lone surrogate (U+D800)" in error["message"], error
    stream = _post(server, "/stream", f'{{"prompt": {surrogate}, "params": {{"max_new_tokens": 1}}}}')
    assert stream.status_code == 400 and "`prompt` holds a lone surrogate" in stream.json()["message"]
    invocations = _post(server, "/invocations", f'{{"inputs": {{"prompt": [{surrogate}]}}}}')
    assert invocations.status_code == 400 and "lone surrogate" in invocations.json()["message"]
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v1/completions", "/v1/chat/completions", "/stream"):
        as_csv = _post(server, path, deep, "text/csv")
        assert as_csv.status_code == 415 and "send application/json" in as_csv.text, as_csv.text[:300]
        as_json = _post(server, path, deep)
        assert as_json.status_code == 400 and "nested 100000 levels deep" in as_json.text, as_json.text[:300]
        if path.startswith("/v1/"):
            _openai_error(as_csv, 415)
            _openai_error(as_json, 400)
    conn = http.client.HTTPConnection("127.0.0.1", SERVER["port"], timeout=60)  # a Content-Length requests won't send
    conn.request("POST", "/v1/completions", b"{}", {**AUTH, "Content-Type": "application/json",
                                                    "Content-Length": str(2**40)})
    big = conn.getresponse()
    error = json.loads(big.read())["error"]
    conn.close()
    assert big.status == 413 and "over the" in error["message"] and error["type"] == "invalid_request_error"


def test_nan_and_infinite_params_and_object_prompts_are_400(server):
    for path, base in [("/v1/completions", '{"model": "m", "prompt": "hi", "max_tokens": 1, '),
                       ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], ')]:
        for field in ("temperature", "top_p", "top_k", "seed", "max_tokens", "repetition_penalty"):
            for value in ("NaN", "Infinity", "-Infinity", "1e999"):
                error = _openai_error(_post(server, path, base + f'"{field}": {value}}}'), 400)
                assert value in error["message"] and "finite number" in error["message"], error
    stream = _post(server, "/stream", '{"prompt": "hi", "params": {"temperature": NaN}}')
    assert stream.status_code == 400 and "NaN" in stream.json()["message"]
    # 1e-300 is 0 in float32: sampling divided by it and failed with a 500 (an `event: error` in a stream)
    tiny = _openai_error(_post(server, "/v1/completions", '{"model": "m", "prompt": "hi", "temperature": 1e-300}'), 400)
    assert tiny["param"] == "temperature" and ">= 0.001" in tiny["message"]
    stream = _post(server, "/stream", '{"prompt": "hi", "params": {"temperature": 1e-300, "do_sample": true}}')
    assert stream.status_code == 400 and ">= 0.001" in stream.json()["message"]
    big = _post(server, "/invocations", '{"inputs": {"prompt": ["hi"]}, "big": ' + "9" * 5000 + "}")
    assert big.status_code == 400 and "digits" in big.json()["message"], big.text  # MLflow's parser: 500
    for payload in ({"inputs": {"prompt": [{"a": 1}]}}, {"inputs": {"prompt": {"a": 1}}},
                    {"instances": [{"prompt": {"a": 1}}]}, {"inputs": [{"prompt": {"a": 1}}]},
                    {"inputs": {"prompt": [[{"role": "user", "content": "hi"}]]}}):
        answer = _post(server, "/invocations", json.dumps(payload))
        assert answer.status_code == 400 and "got an object" in answer.json()["message"], (payload, answer.text)
    records = _post(server, "/invocations", json.dumps({"dataframe_records": [
        {"prompt": [{"role": "user", "content": "hi"}]}], "params": {"max_new_tokens": 1}}))
    assert records.status_code == 200, records.text  # chat messages still work where MLflow keeps them


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out += [int(c) for c in children]
    return out + [g for c in out for g in _children(c)]


def test_api_key_with_the_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    done = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert done.choices[0].message.role == "assistant" and done.usage.prompt_tokens > 0
    assert client.completions.create(model="m", prompt="The food was", max_tokens=2).choices[0].text is not None
    assert [m.id for m in client.models.list().data] == ["model"]
    nested: list = []
    for _ in range(100):
        nested = [nested]
    with pytest.raises(openai.BadRequestError) as bad:  # the guard's refusals come in OpenAI's shape too
        client.completions.create(model="m", prompt="hi", max_tokens=1, extra_body={"user": nested})
    assert "nested 102 levels deep" in bad.value.message
    for wrong in ("wrong-key", KEY + "x", KEY[:-1]):
        other = openai.OpenAI(base_url=f"{server}/v1", api_key=wrong, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as denied:
            other.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            other.models.list()
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/invocations"),
                         ("POST", "/stream"), ("GET", "/metrics"), ("GET", "/version"), ("GET", "/nowhere")]:
        answer = requests.request(method, f"{server}{path}", json={"prompt": "hi"}, timeout=30)  # no key
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer"), path
        assert "Authorization: Bearer" in (answer.json()["error"]["message"] if path.startswith("/v1/") else
                                           answer.json()["message"])
    for path in ("/ping", "/health"):  # probes stay open
        assert requests.get(f"{server}{path}", timeout=10).status_code == 200
    # `smolora serve --api_key` hands the key to the server in its environment, never on a command line
    children = _children(SERVER["pid"])
    assert children
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert KEY.encode() not in cmdline and b"uvicorn" in cmdline
        assert f"SMOLORA_SERVE_API_KEY={KEY}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


# ----------------------------------------------------------------------------------------------------
# every other route: seeded generators (fuzz_requests.py), 1,000 requests each, 4 clients at a time


def _expect(case: Case, status: int, headers: dict[str, str], data: bytes) -> str | None:
    """What is wrong with this answer, or None."""
    path = case.path.split("?")[0]
    if status >= 500:
        return f"{status}"
    protected = path not in OPEN_PATHS
    if (status == 401) != (protected and not case.auth_ok):
        return f"{status} where the key was {'right' if case.auth_ok else 'wrong'}"
    if case.auth_ok and case.method == "POST" and path in JSON_ONLY and (status == 415) != (not case.json_ok):
        return f"{status} for Content-Type {case.headers.get('Content-Type')!r}"
    if status >= 400 and case.method != "HEAD":
        document = json.loads(data)  # every error here is JSON
        if path.startswith("/v1/"):
            error = document["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], document
            assert error["type"] == "invalid_request_error", document
        else:
            assert document.get("message") or document.get("detail"), document
    elif status == 200 and case.method == "POST" and path in JSON_ONLY:
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert data.endswith(b"data: [DONE]\n\n") and b"event: error" not in data, data[-300:]
        else:
            assert json.loads(data)["choices"], data[:300]
    return None


def _fuzz_route(port: int, path: str, make, seed: int) -> Counter:
    rng = random.Random(seed)
    cases = [make(rng, path, KEY) for _ in range(PER_ROUTE)]
    client, counts, problems = Client(port, REQUEST_TIMEOUT + 15), Counter(), []

    def one(case: Case) -> None:
        start = time.monotonic()
        status, headers, data = client.send(case)
        elapsed = time.monotonic() - start
        try:
            problem = _expect(case, status, headers, data) or (f"took {elapsed:.1f} s" if elapsed > REQUEST_TIMEOUT
                                                                 else None)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            problem = f"{status}: {e!r:.300}: {data[:300]!r}"
        with _LOCK:
            counts["requests"] += 1
            counts[f"{status // 100}xx"] += 1
            STATS["slowest_s"] = max(STATS["slowest_s"], elapsed)
            if problem:
                problems.append(f"{problem} <- {case.describe()}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, cases))
    ROUTES[path] = counts
    assert not problems, f"{len(problems)} bad answers, e.g.:\n" + "\n".join(problems[:5])
    return counts


@pytest.mark.parametrize(("path", "make"), [
    ("/v1/completions", post_case), ("/v1/chat/completions", post_case), ("/stream", post_case),
    ("/v1/models", get_case), ("/metrics", get_case), ("/ping", get_case), ("/health", get_case),
    ("/version", get_case)])
def test_every_route_answers_1000_hostile_requests_without_a_5xx(server, path, make):
    counts = _fuzz_route(SERVER["port"], path, make, seed=zlib.crc32(path.encode()))
    assert counts["requests"] == PER_ROUTE and counts["5xx"] == 0
    if make is post_case:  # a quarter is valid: text is generated, not only refused
        assert counts["2xx"] >= PER_ROUTE // 5, counts


def test_server_is_healthy_afterwards_and_nothing_was_5xx(server):
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200
    ok = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["The food was"]}}, timeout=60,
                       headers=AUTH)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
    duration = time.monotonic() - STATS["started"]
    routes = {"/invocations": Counter({"requests": STATS["requests"], "2xx": STATS["ok"],
                                       "4xx": STATS["client_errors"], "5xx": STATS["server_errors"]}), **ROUTES}
    total = sum(c["requests"] for c in routes.values())
    print(f"\n{total} requests in {duration:.0f} s, slowest {STATS['slowest_s']:.2f} s; per route: "
          + ", ".join(f"{p} {c['requests']} ({c['2xx']} 2xx, {c['4xx']} 4xx, {c['5xx']} 5xx)"
                      for p, c in routes.items()))
    assert STATS["requests"] >= GENERATED + 13 + 96
    assert STATS["server_errors"] == 0
    assert all(c["requests"] >= 1000 and c["5xx"] == 0 for c in routes.values()) and len(routes) == 9, routes
