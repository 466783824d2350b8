"""One scheduler for every request, on a real `smolora serve` of the demo model (plain prompt format):
concurrent streams share forwards and each equals its solo greedy answer, a short /invocations is not held
behind long streams, and LangChain's ChatOpenAI reaches the model the way it was trained."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
from servers import save_served_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The food was", "Our waiter brought", "I would come back because", "Great", "Service was slow and",
           "The dessert", "We waited", "My friend said"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, demo_model_dir) -> Path:
    return save_served_model(tmp_path_factory.mktemp("sched") / "model", demo_model_dir)


@pytest.fixture(scope="module")
def expected(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.generation import generate

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    return lambda prompt, n: generate(model, tok, [prompt], max_new_tokens=n)[0]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from conftest import free_port
    from servers import launch_server

    workdir, port = tmp_path_factory.mktemp("sched-cwd"), free_port()
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    srv = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", str(model_path), "-p", str(port)], port,
                        workdir / "server.log", cwd=workdir, env=env)
    srv.wait("/ping", timeout=180)
    yield srv.url
    srv.stop()


class _Stream(threading.Thread):
    """POST /stream in a thread: the pieces, when the first came and when it ended; ``stop`` hangs up."""

    def __init__(self, url: str, prompt: str, tokens: int, start: threading.Event | None = None):
        super().__init__(daemon=True)
        self.url, self.prompt, self.tokens, self.start_event = url, prompt, tokens, start
        self.pieces: list[str] = []
        self.first = self.end = None
        self.response = None
        self.gone = False

    def run(self) -> None:
        import requests

        if self.start_event is not None:
            self.start_event.wait()
        body = {"prompt": self.prompt, "params": {"max_new_tokens": self.tokens}}
        try:
            with requests.post(f"{self.url}/stream", json=body, stream=True, timeout=300) as self.response:
                for line in self.response.iter_lines(chunk_size=1):
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        self.first = self.first or time.monotonic()
                        self.pieces.append(json.loads(line[6:])["text"])
        except (requests.RequestException, OSError, AttributeError):
            if not self.gone:
                raise
            return
        self.end = time.monotonic()

    def hang_up(self) -> None:
        """Close the connection, as a client that goes away does."""
        self.gone = True
        self.response.raw._fp.fp.raw._sock.shutdown(2)


def test_concurrent_streams_share_forwards_and_each_equals_its_solo_greedy_answer(server, expected):
    go = threading.Event()
    lengths = [32, 12, 24, 6, 30, 18, 16, 28]
    streams = [_Stream(server, p, n, go) for p, n in zip(PROMPTS, lengths, strict=True)]
    for s in streams:
        s.start()
    go.set()
    for s in streams:
        s.join(timeout=300)
    for s, n in zip(streams, lengths, strict=True):
        assert "".join(s.pieces) == expected(s.prompt, n), s.prompt  # no crossed tokens
    # Generated together: every stream had its first piece before the first of them ended.
    assert max(s.first for s in streams) < min(s.end for s in streams)


def _invocation(url: str) -> tuple[float, list]:
    import requests

    started = time.monotonic()
    answer = requests.post(f"{url}/invocations", json={"inputs": {"prompt": [PROMPTS[3]]},
                                                       "params": {"max_new_tokens": 4}}, timeout=120)
    return time.monotonic() - started, answer.json()["predictions"]


def test_a_short_request_during_eight_long_streams_returns_within_twice_its_solo_time(server, expected):
    want = [{"generated_text": expected(PROMPTS[3], 4)}]
    solo = statistics.median(_invocation(server)[0] for _ in range(5))
    streams = [_Stream(server, p, 480) for p in PROMPTS]
    for s in streams:
        s.start()
    try:
        deadline = time.monotonic() + 60
        while not all(s.first for s in streams):
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.01)
        during = []
        for _ in range(3):
            took, got = _invocation(server)
            assert got == want
            during.append(took)
        assert all(s.end is None for s in streams)  # the streams were still running throughout
    finally:
        for s in streams:
            s.hang_up()
        for s in streams:
            s.join(timeout=60)
    # Best of three against the median solo time: one unlucky scheduling of this 2-core machine is not the server.
    assert min(during) <= 2 * solo, (during, solo)


def test_langchain_chat_openai_reaches_a_plain_model_as_its_training_prompt(server, expected):
    import openai
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="m", max_tokens=8, temperature=0,
                      max_retries=0, timeout=120)
    answer = chat.invoke([HumanMessage("The food was")])
    assert answer.content == expected("The food was", 8)  # what /v1/completions answers, not a chat rendering
    plain = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0).completions.create(
        model="m", prompt="The food was", max_tokens=8)
    assert answer.usage_metadata["input_tokens"] == plain.usage.prompt_tokens  # no template tokens around it
    assert answer.usage_metadata["output_tokens"] == 8
    with pytest.raises(openai.BadRequestError, match="trained on plain prompts") as e:
        chat.invoke([SystemMessage("Be brief."), HumanMessage("The food was")])
    assert "/v1/completions" in e.value.message
