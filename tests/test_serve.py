"""End to end: the real `mlflow models serve` and `mlflow models predict` on a saved smolora model.

The server runs from a folder outside the repository with no PYTHONPATH, so it can only import
smolora_mlflow from the model's own code path: what a deployment has.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from servers import start_model_server

pytestmark = pytest.mark.slow

PROMPTS = ["The food was", "Our waiter brought", "I would come back because", "Great"]
PARAMS = {"max_new_tokens": 6}
DEFAULT_TOKENS = 8  # saved as the model's default, to keep the tests quick


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH: the subprocess must find smolora_mlflow in the model's code path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SMOLORA_LOG_LEVEL="DEBUG")
    return env


def _mlflow_cli() -> list[str]:
    return [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, demo_model_dir) -> Path:
    from smolora_mlflow import flavor

    path = tmp_path_factory.mktemp("serve") / "model"
    flavor.save_model(path, demo_model_dir, pip_requirements=["torch", "transformers", "safetensors"],
                      generation_defaults={"max_new_tokens": DEFAULT_TOKENS})
    return path


@pytest.fixture(scope="module")
def expected(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.generation import generate

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    tok = AutoTokenizer.from_pretrained(demo_model_dir)

    def run(prompts, **params):
        return generate(model, tok, list(prompts), **{"max_new_tokens": DEFAULT_TOKENS, **params})

    return run


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server-cwd")
    srv = start_model_server(model_path, workdir / "server.log", cwd=workdir, env=_clean_env())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.url


def _post(url: str, payload, timeout: float = 120):
    import requests

    body = payload if isinstance(payload, str) else json.dumps(payload)
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def _texts(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [row["generated_text"] for row in response.json()["predictions"]]


PAYLOADS = {
    "dataframe_split": {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}},
    "dataframe_records": {"dataframe_records": [{"prompt": p} for p in PROMPTS]},
    "inputs": {"inputs": {"prompt": PROMPTS}},
    "instances": {"instances": [{"prompt": p} for p in PROMPTS]},
}


@pytest.mark.parametrize("with_params", [False, True])
@pytest.mark.parametrize("form", sorted(PAYLOADS))
def test_payload_forms(server, expected, form, with_params):
    payload = dict(PAYLOADS[form])
    if with_params:
        payload["params"] = PARAMS
    assert _texts(_post(server, payload)) == expected(PROMPTS, **(PARAMS if with_params else {}))


def test_unified_llm_payload_and_full_text(server, expected):
    response = _post(server, {"prompt": PROMPTS[0], "max_new_tokens": 4, "return_full_text": True})
    assert response.status_code == 200, response.text
    assert response.json() == [{"generated_text": PROMPTS[0] + expected(PROMPTS[:1], max_new_tokens=4)[0]}]


def test_chat_messages_in_a_prompt_cell(server, expected):
    messages = [{"role": "user", "content": "The food was"}]
    response = _post(server, {"dataframe_records": [{"prompt": messages}], "params": PARAMS})
    # The demo model is saved plain (its chat template ends turns with the generic eos_token): a lone user
    # message is the plain prompt it was trained on.
    assert _texts(response) == expected(["The food was"], **PARAMS)


def test_unknown_params_are_dropped_by_mlflow_not_a_500(server, expected):
    # MLflow's params-schema enforcement warns and drops unknown params before the model runs.
    payload = {**PAYLOADS["dataframe_records"], "params": {"max_tokens": 3, **PARAMS}}
    assert _texts(_post(server, payload)) == expected(PROMPTS, **PARAMS)


BAD = [
    ({"dataframe_split": {"columns": ["text"], "data": [["a"]]}}, r"missing inputs ['prompt']"),
    ({"dataframe_records": [{"prompt": ""}]}, "row 0 is an empty string"),
    ({"dataframe_records": [{"prompt": "ok"}, {"prompt": None}]}, "row 1 is missing"),
    ({"dataframe_records": [{"prompt": 7}]}, "`prompt` at row 0 must be a string"),
    ({**PAYLOADS["inputs"], "params": {"max_new_tokens": 0}}, "`max_new_tokens` must be in 1..1024, got 0"),
    ({**PAYLOADS["inputs"], "params": {"max_new_tokens": "lots"}}, "max_new_tokens"),
    ({**PAYLOADS["inputs"], "params": {"do_sample": True, "temperature": 0}}, "`temperature` must be >= 0.001"),
    ({**PAYLOADS["inputs"], "params": {"top_p": 1.5}}, "`top_p` must be in (0, 1]"),
    ({**PAYLOADS["inputs"], "params": {"top_k": -2}}, "`top_k` must be >= 0"),
    ({**PAYLOADS["inputs"], "params": {"repetition_penalty": -1.0}}, "`repetition_penalty` must be > 0"),
    ({"dataframe_records": [{"prompt": "word " * 600}]}, "exceeds the model's context of 512 tokens"),
    ('{"dataframe_records": [', "valid JSON"),
]


@pytest.mark.parametrize(("payload", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_4xx_with_the_reason(server, payload, message):
    import requests

    response = _post(server, payload)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.json()["message"]
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200


def test_concurrent_clients_get_their_own_answers(served, server, expected):
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]
    want = expected(prompts, **PARAMS)

    def ask(prompt: str) -> list[str]:
        return _texts(_post(server, {"dataframe_records": [{"prompt": prompt}], "params": PARAMS}))

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == [[w] for w in want]
    # The server's own log (SMOLORA_LOG_LEVEL=DEBUG): requests were admitted to the running batch together.
    log = served.log.read_text()
    shared = [int(n) for n in re.findall(r"generate: \d+ prompt\(s\) from (\d+) request", log)]
    assert max(shared) >= 2, shared


def test_mlflow_models_predict_cli(model_path, tmp_path, expected):
    payload = {**PAYLOADS["dataframe_split"], "params": PARAMS}
    (tmp_path / "in.json").write_text(json.dumps(payload))
    cmd = [*_mlflow_cli(), "models", "predict", "-m", str(model_path), "-i", str(tmp_path / "in.json"),
           "-t", "json", "--env-manager", "local", "-o", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert [row["generated_text"] for row in out["predictions"]] == expected(PROMPTS, **PARAMS)


# ----------------------------------------------------------------------------------------------------
# `smolora serve`: the same MLflow app behind the request guard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def guarded(model_path, tmp_path_factory):
    from conftest import free_port
    from servers import launch_server

    workdir, port = tmp_path_factory.mktemp("guarded-cwd"), free_port()
    srv = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", str(model_path), "-p", str(port)], port,
                        workdir / "server.log", cwd=workdir, env={**_clean_env(), "PYTHONPATH": str(ROOT)})
    srv.wait("/ping", timeout=180)
    yield srv.url
    srv.stop()


def test_guarded_server_answers_like_mlflow_models_serve(server, guarded, expected):
    import requests

    for form, payload in PAYLOADS.items():
        assert _texts(_post(guarded, payload)) == _texts(_post(server, payload)) == expected(PROMPTS), form
    for path in ("/ping", "/health", "/version"):
        mine, theirs = requests.get(guarded + path, timeout=10), requests.get(server + path, timeout=10)
        assert (mine.status_code, mine.text) == (theirs.status_code, theirs.text) and mine.status_code == 200
    csv = requests.post(f"{guarded}/invocations", data="prompt\nThe food was\n", timeout=60,
                        headers={"Content-Type": "text/csv"})
    assert _texts(csv) == expected(["The food was"])


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# What `mlflow models serve` answered with HTTP 500 (RecursionError, AttributeError on None.split).
MLFLOW_500S = [
    ("deep inputs", '{"inputs": ' + _deep(1000) + "}", {"Content-Type": "application/json"}, 400, "nested 1001 levels"),
    ("deep records", '{"dataframe_records": [{"prompt": ' + _deep(998) + "}]}", {"Content-Type": "application/json"},
     400, "nested 1001 levels"),
    ("deep object", '{"a":' * 1000 + "1" + "}" * 1000, {"Content-Type": "application/json"}, 400, "nested 1000 levels"),
    ("deep top-level list", _deep(1200), {"Content-Type": "application/json"}, 400, "nested 1200 levels"),
    ("no content type", json.dumps(PAYLOADS["inputs"]), {}, 415, "no Content-Type header"),
    ("empty content type", json.dumps(PAYLOADS["inputs"]), {"Content-Type": ""}, 415, "no Content-Type header"),
    ("text/plain", json.dumps(PAYLOADS["inputs"]), {"Content-Type": "text/plain"}, 415, "is not supported"),
    ("latin-1", json.dumps(PAYLOADS["inputs"]), {"Content-Type": "application/json; charset=latin-1"}, 415,
     "charset=utf-8"),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), [m[1:] for m in MLFLOW_500S],
                         ids=[m[0] for m in MLFLOW_500S])
def test_guard_answers_with_a_4xx_what_mlflow_answered_with_a_500(guarded, body, headers, status, message):
    import requests

    response = requests.post(f"{guarded}/invocations", data=body.encode(), headers=headers, timeout=60)
    assert response.status_code == status, response.text[:300]
    assert message in response.json()["message"]
    assert requests.get(f"{guarded}/ping", timeout=5).status_code == 200


def _read_response(sock) -> str:
    """One HTTP response, whole: the headers and a body may arrive in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_oversized_body_is_refused_before_it_is_read(guarded):
    import socket

    port = int(guarded.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n{")
        reply = _read_response(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "SMOLORA_SERVE_MAX_BODY_BYTES" in reply


NOT_STRINGS = [
    ({"inputs": {"prompt": [None]}}, "`prompt` at row 0 must be a string or a list of chat messages, got null"),
    ({"inputs": {"prompt": [7]}}, "`prompt` at row 0 must be a string or a list of chat messages, got a number (7)"),
    ({"inputs": {"prompt": ["ok", True]}}, "`prompt` at row 1 must be a string"),
    ({"inputs": {"prompt": 7}}, "`prompt` at row 0 must be a string"),
    ({"inputs": ["ok", "fine", None]}, "`prompt` at row 2 must be a string"),
    ({"instances": [{"prompt": "ok"}, {"prompt": 7.5}]}, "`prompt` at row 1 must be a string"),
    ({"instances": [None]}, "`prompt` at row 0 must be a string"),
    ({"dataframe_records": [{"prompt": None}]}, "`prompt` at row 0 must be a string"),
    ({"dataframe_split": {"columns": ["prompt"], "data": [["ok"], [7]]}}, "`prompt` at row 1 must be a string"),
    ({"prompt": [None]}, "`prompt` at row 0 must be a string"),
    ({"prompt": 7, "max_new_tokens": 3}, "`prompt` at row 0 must be a string"),
]


@pytest.mark.parametrize(("payload", "message"), NOT_STRINGS, ids=[str(i) for i in range(len(NOT_STRINGS))])
def test_prompts_that_are_not_strings_are_400_naming_the_row(guarded, payload, message):
    response = _post(guarded, payload)
    assert response.status_code == 400, response.text[:300]
    assert message in response.json()["message"]
