"""Hostile payloads against a real `mlflow models serve`: every answer is a 4xx with a message or a correct
200, never a 500 and never a hang past the request timeout, and the server still answers /ping after."""

from __future__ import annotations

import json
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import start_model_server

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT = 60  # MLflow's scoring server gives up on a request after 60 s
PARAM_NAMES = ["max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "seed",
               "return_full_text"]
STATS = {"requests": 0, "ok": 0, "client_errors": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_dir):
    from smolora_mlflow import flavor

    root = tmp_path_factory.mktemp("fuzz")
    flavor.save_model(root / "model", demo_model_dir, pip_requirements=["torch", "transformers", "safetensors"],
                      generation_defaults={"max_new_tokens": 4}, max_new_tokens_limit=64)
    srv = start_model_server(root / "model", root / "server.log", cwd=root)
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
    st.integers(), st.none(), st.lists(st.text(max_size=10), max_size=3),
    st.just([{"role": "user", "content": "hi"}]), st.just([{"role": "robot"}]),
)
param_values = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=8), st.none(), st.just(10**9),
)
params = st.dictionaries(st.sampled_from([*PARAM_NAMES, "unknown_field", "max_tokens"]), param_values, max_size=4)
bodies = st.one_of(
    st.builds(lambda ps, p: {"dataframe_records": [{"prompt": x} for x in ps], "params": p},
              st.lists(prompts, min_size=1, max_size=3), params),
    st.builds(lambda ps, p: {"dataframe_split": {"columns": ["prompt"], "data": [[x] for x in ps]}, "params": p},
              st.lists(prompts, min_size=1, max_size=3), params),
    st.builds(lambda ps, p: {"inputs": {"prompt": ps}, "params": p}, st.lists(prompts, max_size=3), params),
    st.builds(lambda ps, extra: {"instances": [{"prompt": x} for x in ps], **extra},
              st.lists(prompts, max_size=3), st.dictionaries(st.text(max_size=8), json_values, max_size=2)),
    json_values.map(lambda v: {"inputs": v}),
    json_values,
    st.integers(min_value=50, max_value=400).map(lambda depth: {"inputs": json.loads("[" * depth + "]" * depth)}),
)
raw_bodies = st.one_of(
    bodies.map(json.dumps),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),  # not JSON at all
    st.just('{"dataframe_records": [{"prompt": "a"}'),  # truncated JSON
)


def _check(url: str, body: str) -> None:
    start = time.monotonic()
    response = requests.post(f"{url}/invocations", data=body.encode("utf-8", "surrogatepass"),
                             headers={"Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT + 15)
    elapsed = time.monotonic() - start
    STATS["requests"] += 1
    assert elapsed < REQUEST_TIMEOUT, f"took {elapsed:.1f}s: {body[:200]}"
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]} for {body[:300]}"
    if response.status_code == 200:
        STATS["ok"] += 1
        predictions = response.json()["predictions"]
        assert isinstance(predictions, list)
        assert all(isinstance(row["generated_text"], str) for row in predictions)
    else:
        STATS["client_errors"] += 1
        assert 400 <= response.status_code < 500
        assert response.json().get("message"), response.text[:300]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=raw_bodies)
def test_hostile_payloads_never_500_and_never_hang(server, body):
    _check(server, body)


def test_limits_are_enforced_with_clear_messages(server):
    huge_tokens = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["hi"]},
                                                               "params": {"max_new_tokens": 10**9}}, timeout=60)
    assert huge_tokens.status_code == 400 and "max_new_tokens" in huge_tokens.json()["message"]
    long_prompt = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["x" * 300_000]}}, timeout=60)
    assert long_prompt.status_code == 400 and "max_prompt_chars" in long_prompt.json()["message"]
    many = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["hi"] * 1000}}, timeout=60)
    assert many.status_code == 400 and "max_prompts_per_request" in many.json()["message"]


def test_server_is_healthy_afterwards(server):
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200
    ok = requests.post(f"{server}/invocations", json={"inputs": {"prompt": ["The food was"]}}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
    print(f"fuzzed {STATS['requests']} payloads: {STATS['ok']} answered 200, {STATS['client_errors']} 4xx, 0 5xx")
