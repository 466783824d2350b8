"""`smolora serve` beyond MLflow's scoring server: SSE streaming, the OpenAI API and /metrics.

A real `smolora serve` subprocess on a free 127.0.0.1 port (stopped by PID), the real `openai` client
pointed at it, raw HTTP for the SSE endpoint; every answer is compared with the same model's non-streamed
greedy answer computed in this process.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from servers import save_served_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The food was"
CHAT = [{"role": "user", "content": "Our waiter"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, demo_model_dir) -> Path:
    return save_served_model(tmp_path_factory.mktemp("stream") / "model", demo_model_dir)


@pytest.fixture(scope="module")
def expected(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.generation import generate

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    tok = AutoTokenizer.from_pretrained(demo_model_dir)

    def run(prompt, **params):
        # The served model is plain-format: a lone user message reaches it as the plain prompt.
        text = prompt[0]["content"] if isinstance(prompt, list) else prompt
        return generate(model, tok, [text], **{"max_new_tokens": 8, **params})[0]

    return run


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from conftest import free_port
    from servers import launch_server

    workdir, port = tmp_path_factory.mktemp("stream-cwd"), free_port()
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    srv = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", str(model_path), "-p", str(port)], port,
                        workdir / "server.log", cwd=workdir, env=env)
    srv.wait("/ping", timeout=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _metric(url: str, name: str, **labels: str) -> float:
    import requests

    text = requests.get(f"{url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(name + ("{" + want + "}" if want else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _sse_events(url: str, body: dict, on_first=None):
    """(arrival time, data) of each event of POST /stream, read from the socket as bytes arrive."""
    import requests

    events, started = [], time.monotonic()
    with requests.post(f"{url}/stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines(chunk_size=1):
            if line.startswith(b"data: "):
                events.append((time.monotonic() - started, line[6:].decode()))
                if on_first is not None and len(events) == 1:
                    on_first(response)
                    return events
    return events


def test_sse_first_piece_before_the_end_and_pieces_join_to_the_greedy_answer(server, expected):
    tokens = 160
    events = _sse_events(server.url, {"prompt": PROMPT, "params": {"max_new_tokens": tokens}})
    assert events[-1][1] == "[DONE]"
    pieces = [json.loads(data)["text"] for _, data in events[:-1]]
    assert len(pieces) > 10
    assert "".join(pieces) == expected(PROMPT, max_new_tokens=tokens)
    ttft, total = events[0][0], events[-1][0]
    assert ttft < total / 3, (ttft, total)  # the first piece came long before generation ended
    assert _metric(server.url, "smolora_time_to_first_token_seconds_count", adapter="default") >= 1


def test_openai_completions_streamed_and_not(client, expected):
    want = expected(PROMPT, max_new_tokens=12)
    done = client.completions.create(model="anything", prompt=PROMPT, max_tokens=12)
    assert [c.text for c in done.choices] == [want] and done.model == "anything"
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="anything", prompt=PROMPT, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    several = client.completions.create(model="m", prompt=[PROMPT, "Great"], max_tokens=6)
    assert [c.text for c in several.choices] == [expected(p, max_new_tokens=6) for p in (PROMPT, "Great")]
    echoed = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPT + expected(PROMPT, max_new_tokens=6)


def test_openai_chat_streamed_and_not(client, expected):
    want = expected(CHAT, max_new_tokens=10)
    done = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10)
    assert done.choices[0].message.content == want and done.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["model"]


def test_openai_bad_requests_are_4xx_naming_the_field(client, server):
    import openai

    cases = [({"max_tokens": 0}, "`max_tokens` must be >= 1, got 0"),
             ({"n": 2}, "`n` = 2 is not supported"),
             ({"max_tokens": 5000}, "`max_new_tokens` must be in 1..1024, got 5000"),
             ({"extra_body": {"bogus": 1}}, "Unsupported field(s) ['bogus']")]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt=PROMPT, **kwargs)
        assert message in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError, match="must be a string"):  # the request guard answers first
        client.completions.create(model="m", prompt=[1, 2])
    assert _metric(server.url, "smolora_http_errors_total", path="/v1/completions", status="400") >= 5


def test_openai_bools_are_not_numbers_and_stream_is_a_bool(server):
    import requests

    for extra, field in [({"n": True}, "n"), ({"top_logprobs": False}, "top_logprobs"), ({"stream": 0}, "stream"),
                         ({"stream": "yes"}, "stream"), ({"best_of": True}, "best_of")]:
        answer = requests.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": PROMPT, **extra},
                               timeout=60)
        assert answer.status_code == 400, (extra, answer.text)
        assert answer.json()["error"]["param"] == field, answer.text
    answer = requests.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": PROMPT, "n": 1,
                                                                 "top_logprobs": 0, "stream": False, "max_tokens": 2},
                           timeout=60)
    assert answer.status_code == 200, answer.text


def test_openai_echo_counts_only_the_completion(client, server, expected):
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=8)
    echoed = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text == PROMPT + expected(PROMPT)
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    assert echoed.choices[0].finish_reason == plain.choices[0].finish_reason
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=8, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    # A stream that ran to its end is not a cancelled one (uvicorn reports a disconnect once it is complete).
    assert _metric(server.url, "smolora_streams_cancelled_total", adapter="default") == 0


def test_openai_size_limits_answer_before_usage_is_counted(server):
    import requests

    too_long = {"model": "m", "prompt": "x" * 100_001, "max_tokens": 2}
    for stream in (False, True):
        answer = requests.post(f"{server.url}/v1/completions", json={**too_long, "stream": stream}, timeout=60)
        assert answer.status_code == 400 and "max_prompt_chars" in answer.text, answer.text
    answer = requests.post(f"{server.url}/v1/completions", json={"model": "m", "prompt": ["a"] * 257}, timeout=60)
    assert answer.status_code == 400 and "max_prompts_per_request" in answer.text, answer.text


def test_client_that_disconnects_mid_stream_frees_its_slot(server, expected):
    import requests

    before = _metric(server.url, "smolora_generated_tokens_total", adapter="default")
    events = _sse_events(server.url, {"prompt": PROMPT, "params": {"max_new_tokens": 480}},
                         on_first=lambda response: response.raw._fp.fp.raw._sock.shutdown(2))
    assert len(events) == 1
    deadline = time.monotonic() + 30
    while _metric(server.url, "smolora_streams_cancelled_total", adapter="default") < 1:
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.05)
    assert _metric(server.url, "smolora_streams_active") == 0
    # The slot is free: the next request is answered, and the abandoned stream stopped far short of 480 tokens.
    body = {"inputs": {"prompt": [PROMPT]}, "params": {"max_new_tokens": 4}}
    answer = requests.post(f"{server.url}/invocations", json=body, timeout=60)
    assert answer.json()["predictions"] == [{"generated_text": expected(PROMPT, max_new_tokens=4)}]
    spent = _metric(server.url, "smolora_generated_tokens_total", adapter="default") - before - 4
    assert 1 <= spent < 240, spent


def test_concurrent_openai_clients_share_generate_calls(client, server, expected):
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    barrier = threading.Barrier(8)

    def ask(prompt: str) -> str:
        barrier.wait()
        return client.completions.create(model="m", prompt=prompt, max_tokens=6).choices[0].text

    batches_before = _metric(server.url, "smolora_batch_size_count")
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == [expected(p, max_new_tokens=6) for p in prompts]
    assert _metric(server.url, "smolora_batch_size_count") - batches_before < 8  # some shared a generate call


def test_metrics_are_prometheus_text_and_mlflow_endpoints_unchanged(server):
    import requests

    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/version", timeout=10).status_code == 200
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for family, kind in [("smolora_requests_total", "counter"), ("smolora_http_responses_total", "counter"),
                         ("smolora_queue_wait_seconds", "histogram"), ("smolora_batch_size", "histogram"),
                         ("smolora_generated_tokens_total", "counter"),
                         ("smolora_time_to_first_token_seconds", "histogram"), ("smolora_streams_active", "gauge")]:
        assert f"# TYPE {family} {kind}" in text
    assert _metric(server.url, "smolora_requests_total", adapter="default") >= 1
    assert _metric(server.url, "smolora_http_responses_total", path="/ping", status="200") >= 1
    assert re.search(r'^smolora_batch_size_bucket\{le="\+Inf"\} [\d.]+$', text, re.MULTILINE)
