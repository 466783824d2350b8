"""Seeded generators of hostile HTTP requests for every route of ``smolora serve``, and a fast keep-alive client.

Each generator takes a ``random.Random`` and returns a :class:`Case`: the request, and what the server must
answer beside "never a 5xx" (a 401 exactly when the API key is wrong, a 415 exactly when a JSON-only route
gets another content type). Bodies start from a valid request (so a good share generates text, with
``max_tokens`` 1-2) and are then mutated: fields dropped, replaced by random JSON (lone surrogates, NaN,
Infinity, 1e999, huge integers, objects, deep lists), unknown fields, raw-byte damage (truncation, invalid
UTF-8, a BOM, deep nesting, a surrogate encoded as bytes), wrong content types and methods.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
from dataclasses import dataclass, field

OPEN_PATHS = ("/ping", "/health")
JSON_ONLY = ("/stream", "/v1/completions", "/v1/chat/completions")
STRINGS = ["", " ", "hi", "The food was", "Our waiter", "\ud800", "a\udfffb", "\udc00\ud800", "\U0001f600 ok",
           "\x00", "{{ 7 * 7 }}", "{% raise %}", "<|user|>", "</s>", "\u202e", "ü" * 20, "x" * 3000, "\\", '"',
           "null", "\r\n\r\n", "%s%n"]
NUMBERS = [0, 1, 2, -1, 0.5, -0.0, 1.5, 2**63, -(2**63), 10**30, 1e308, 1e-300, 1e-40, float("nan"), float("inf"),
           -float("inf"), 10**9]
SCALARS = [None, True, False, *NUMBERS, *STRINGS]
KEYS = ["prompt", "messages", "model", "role", "content", "params", "max_tokens", "temperature", "inputs", "",
        "\ud800", "__proto__", "type", "text"]
CONTENT_TYPES = [None, "", "text/csv", "text/plain", "application/x-www-form-urlencoded", "APPLICATION/JSON",
                 "application/json; charset=utf-8", "application/json; charset=latin-1", "application/json;;",
                 "application/json; format=pandas-records", "multipart/form-data", "application/jsonx",
                 "application/json, text/csv", "*/*"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]


@dataclass
class Case:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    auth_ok: bool = True
    json_ok: bool = True  # a JSON-only route given application/json (with at most charset=utf-8)

    def describe(self) -> str:
        return f"{self.method} {self.path} {self.headers} {(self.body or b'')[:300]!r}"


def jvalue(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 3 or r < 0.6:
        return rng.choice(SCALARS)
    if r < 0.8:
        return [jvalue(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): jvalue(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _prompt(rng: random.Random) -> object:
    if rng.random() < 0.6:
        return rng.choice(["The food was", "hi", "Our waiter was", "Great", "\U0001f600 ok", "ü"])
    return jvalue(rng)


def _messages(rng: random.Random) -> object:
    if rng.random() < 0.15:
        return jvalue(rng)
    out = []
    for _ in range(rng.randint(0, 3)):
        r = rng.random()
        role = rng.choice(["user", "user", "assistant", "system", "robot", "\ud800", 1, None, ""])
        content = (rng.choice(["hi", "The food was", "ok"]) if r < 0.6 else
                   [{"type": rng.choice(["text", "image_url"]), "text": rng.choice(STRINGS[:8])}] if r < 0.75 else
                   jvalue(rng))
        message = {"role": role, "content": content}
        if rng.random() < 0.1:
            message.pop(rng.choice(["role", "content"]))
        out.append(message if rng.random() > 0.05 else jvalue(rng))
    return out


def _sampling(rng: random.Random) -> dict[str, object]:
    options = {"temperature": [0, 0.7, 1.0, -1, "hot", 1e-300, 1e-40], "top_p": [0.9, 1, 0, 2, 1e-300],
               "top_k": [0, 5, -3, 1.5, 10**12],
               "seed": [0, 7, -1, 2**64], "repetition_penalty": [1.1, 0, -1]}
    picked = rng.sample(sorted(options), rng.randint(0, 2))
    return {k: (rng.choice(options[k]) if rng.random() < 0.8 else rng.choice(SCALARS)) for k in picked}


def _mutate(rng: random.Random, body: dict, fields: list[str]) -> dict:
    """Drop, replace or add a field (or leave it valid: about a third of the time)."""
    body = dict(body)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        action = rng.random()
        if action < 0.3 and body:
            body.pop(rng.choice(sorted(body)))
        elif action < 0.8:
            body[rng.choice(fields)] = jvalue(rng)
        else:
            body[rng.choice(KEYS)] = jvalue(rng)
    return body


def _raw(rng: random.Random, document: object) -> bytes:
    """The body as bytes: usually ``json.dumps`` (NaN and Infinity included, surrogates as \\u escapes)."""
    text = json.dumps(document)
    r = rng.random()
    if r < 0.85:
        return text.encode()
    if r < 0.88:
        return text[: rng.randint(0, len(text))].encode()  # truncated
    if r < 0.91:
        depth = rng.choice([65, 1000, 100_000])
        return ("[" * depth + "]" * depth).encode()
    if r < 0.93:
        return b"\xef\xbb\xbf" + text.encode()  # a UTF-8 BOM
    if r < 0.95:
        return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")  # surrogates as bytes
    if r < 0.96:
        return json.dumps(document, ensure_ascii=False).encode("latin-1", "replace")  # not UTF-8
    if r < 0.97 and text.endswith("}"):
        return (text[:-1] + ', "big": ' + "9" * 5000 + "}").encode()  # over Python's 4,300 digits
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))


def _auth(rng: random.Random, key: str) -> tuple[dict[str, str], bool]:
    r = rng.random()
    if r < 0.85:
        return {"Authorization": rng.choice(["Bearer ", "bearer ", "BEARER "]) + key}, True
    wrong = ["", "Bearer", "Bearer ", f"Basic {key}", key, f"Bearer {key}x", f"Bearer {key[:-1]}", "Bearer \x7f",
             f"Token {key}"]
    if r < 0.95:
        return {"Authorization": rng.choice(wrong)}, False
    return {}, False


def _content_type(rng: random.Random, path: str) -> tuple[dict[str, str], bool]:
    if rng.random() < 0.85:
        return {"Content-Type": rng.choice(["application/json", "application/json; charset=utf-8"])}, True
    value = rng.choice(CONTENT_TYPES)
    ok = value is not None and value.split(";")[0].strip().lower() == "application/json" and (
        value.lower().replace(" ", "") in ("application/json", "application/json;charset=utf-8"))
    return ({} if value is None else {"Content-Type": value}), ok


VALID_PROMPTS = ["The food was", "hi", "Our waiter was", "Great", "\U0001f600 ok", "ü", "a \\ud800 escaped"]


def valid_body(rng: random.Random, path: str) -> dict:
    """A request the route must answer with a 200 (1-2 new tokens)."""
    tokens, prompt = rng.choice([1, 2]), rng.choice(VALID_PROMPTS)
    sampling = rng.choice([{}, {"temperature": 0}, {"temperature": 0.7, "top_p": 0.9, "seed": 3}])
    # The served demo is plain-format: a lone user message is valid, a conversation with a system turn a 400.
    chat = [{"role": "user", "content": prompt}]
    if path == "/v1/completions":
        return {"model": "m", "prompt": prompt, "max_tokens": tokens, "stream": rng.random() < 0.3,
                "echo": rng.random() < 0.2, **sampling}
    if path == "/v1/chat/completions":
        return {"model": "m", "messages": chat, "max_tokens": tokens, "stream": rng.random() < 0.3, **sampling}
    return {"prompt": prompt if rng.random() < 0.7 else chat, "params": {"max_new_tokens": tokens, **sampling}}


def post_case(rng: random.Random, path: str, key: str) -> Case:
    """A POST to ``/stream``, ``/v1/completions`` or ``/v1/chat/completions``: a quarter valid, the rest
    hostile."""
    if rng.random() < 0.25:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return Case("POST", path, json.dumps(valid_body(rng, path)).encode(), headers)
    tokens = rng.choice([1, 2])
    if path == "/v1/completions":
        body = {"model": "m", "prompt": _prompt(rng), "max_tokens": tokens, **_sampling(rng)}
        extra = {"stream": [True, False], "echo": [True, False], "n": [1, 2], "stop": [None, "x"], "user": ["u"],
                 "stream_options": [{"include_usage": True}]}
        fields = ["model", "prompt", "max_tokens", "temperature", "stream", "echo", "n", "logprobs", "suffix"]
    elif path == "/v1/chat/completions":
        body = {"model": "m", "messages": _messages(rng), "max_tokens": tokens, **_sampling(rng)}
        extra = {"stream": [True, False], "max_completion_tokens": [1, 2], "n": [1, 3], "tools": [[]],
                 "response_format": [{"type": "text"}, {"type": "json_object"}]}
        fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "top_p"]
    else:
        prompt = _messages(rng) if rng.random() < 0.3 else _prompt(rng)
        body = {"prompt": prompt, "params": {"max_new_tokens": tokens, **_sampling(rng)}}
        extra = {"adapter": [None, "default", "nope"]}
        fields = ["prompt", "messages", "params", "adapter"]
    for name in rng.sample(sorted(extra), rng.randint(0, min(2, len(extra)))):
        body[name] = rng.choice(extra[name])
    if path == "/stream" and rng.random() < 0.2:
        body["params"] = _mutate(rng, body["params"], ["max_new_tokens", "temperature", "do_sample", "seed"])
    headers, auth_ok = _auth(rng, key)
    content_type, json_ok = _content_type(rng, path)
    return Case("POST", path, _raw(rng, _mutate(rng, body, fields)), {**headers, **content_type}, auth_ok, json_ok)


def get_case(rng: random.Random, path: str, key: str) -> Case:
    """A request to a route that reads no body (``/ping``, ``/health``, ``/version``, ``/metrics``,
    ``/v1/models``): mostly GETs, with other methods, query strings, bodies and headers."""
    method = "GET" if rng.random() < 0.6 else rng.choice(METHODS)
    query = rng.choice(["", "", "?a=1", "?%ff%fe", "?model=%ed%a0%80", "?" + "x" * 2000])
    headers, auth_ok = _auth(rng, key)
    body = None
    if rng.random() < 0.2:
        body = _raw(rng, jvalue(rng))
        headers.update(_content_type(rng, path)[0])
    return Case(method, path + query, body, headers, auth_ok)


class Client:
    """One keep-alive ``http.client`` connection per thread (``requests`` costs about a millisecond per call
    more, which is most of a refused request's time); reconnects when the server closes it."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return conn

    def send(self, case: Case) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.putrequest(case.method, case.path, skip_accept_encoding=True)
                body = case.body if case.body is not None else b""
                for name, value in case.headers.items():
                    conn.putheader(name, value.encode("latin-1", "replace"))
                if case.body is not None or case.method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body if body else None)
                response = conn.getresponse()
                data = response.read()
                headers = {k.lower(): v for k, v in response.getheaders()}
                if response.will_close:
                    self.close()
                return response.status, headers, data
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("not reached")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None
