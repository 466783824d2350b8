"""The OpenAI wire format: request bodies of ``/v1/completions`` and ``/v1/chat/completions`` turned into
the flavor's prompts and generation params, and the flavor's text turned into OpenAI response objects.

What maps to what:

- ``model`` names the adapter of an adapter set; a single model accepts any name and echoes it back.
- ``max_tokens`` (chat also ``max_completion_tokens``) -> ``max_new_tokens`` (default: the model's).
- ``temperature`` > 0 samples with that temperature, 0 is greedy; absent, the model's defaults apply
  (greedy for a model saved with the defaults, unlike OpenAI's sampling default).
- ``top_p``, ``seed``; ``top_k`` and ``repetition_penalty`` as extensions (``extra_body`` in the client).
- ``echo`` (completions) -> ``return_full_text``; ``stream``, ``stream_options.include_usage``.
- ``n`` must be 1; ``stop``, ``logprobs``, penalties, tools and logit bias are not supported and are
  refused when set to anything but their neutral value, so a client never silently gets something else.

Chat ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts. Numeric params must
be finite (``NaN`` and ``Infinity`` are a 400, never a silent greedy or unbounded run).

Every error under ``/v1/`` is OpenAI's ``{"error": {"message", "type", "param", "code"}}``: this module's
:class:`BadRequest`, the request guard's and the API-key check's refusals (which build it with
:func:`error_body`), and whatever else answers a ``/v1/`` path with an error (MLflow's 404 and 405, a
500), which :class:`OpenAIErrors` rewrites on the way out.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from smolora_mlflow.models.generation import MIN_TEMPERATURE

_logger = logging.getLogger(__name__)

# `logprobs` is an integer in completions, a bool in chat.
NEUTRAL = {"n": (1, None), "stop": (None, [], ""), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
           "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
           "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,)}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "repetition_penalty", "user", *NEUTRAL}
FIELDS = {"completions": COMMON | {"prompt", "echo"},
          "chat": COMMON | {"messages", "max_completion_tokens"}}


class BadRequest(ValueError):
    """A request the OpenAI endpoints refuse, with the field (``param``) it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``type`` is ``server_error`` for a 5xx, ``invalid_request_error`` otherwise
    (as OpenAI's API answers a bad request, an unknown model and a wrong API key alike)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class OpenAIRequest:
    kind: str  # "completions" or "chat"
    model: str
    model_input: Any  # a list of prompt strings, or a list of chat messages
    params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _same(value: Any, neutral: Any) -> bool:
    """``value == neutral`` without Python's True == 1 and False == 0: a bool is never a number here."""
    if isinstance(value, bool) or isinstance(neutral, bool) or neutral is None:
        return value is neutral
    return value == neutral and (type(value) is type(neutral) or {type(value), type(neutral)} <= {int, float})


def _number(body: dict[str, Any], key: str, kind: type, low: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and not math.isfinite(value):  # JSON's NaN/Infinity extensions and 1e999: a NaN compares False to all
        raise BadRequest(f"`{key}` must be a finite number, got {value!r}.", key)
    if not ok or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"`{key}` must be {'an integer' if kind is int else 'a number'}, got {value!r}.", key)
    if low is not None and value < low:
        raise BadRequest(f"`{key}` must be >= {low}, got {value!r}.", key)
    return kind(value)


def _params(body: dict[str, Any], kind: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    max_tokens = _number(body, "max_completion_tokens", int, 1) if kind == "chat" else None
    max_tokens = max_tokens or _number(body, "max_tokens", int, 1)
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", float, 0)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise BadRequest(f"`temperature` must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature!r}.",
                         "temperature")
    if temperature is not None:
        params["do_sample"] = temperature > 0
        if temperature > 0:
            params["temperature"] = temperature
    for key, tp in (("top_p", float), ("top_k", int), ("seed", int), ("repetition_penalty", float)):
        if (value := _number(body, key, tp)) is not None:
            params[key] = value
    if body.get("echo") is not None:
        if not isinstance(body["echo"], bool):
            raise BadRequest(f"`echo` must be true or false, got {body['echo']!r}.", "echo")
        params["return_full_text"] = body["echo"]
    return params


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("`messages` must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, m in enumerate(value):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"`messages[{i}].content` parts must all be {{type: text, text: string}}; "
                                 "other part types are not supported.", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise BadRequest(f"`messages[{i}]` must be an object with string `role` and `content`, got {m!r}.",
                             f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


def _prompts(value: Any) -> list[str]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"`prompt` must be a string or a non-empty list of strings, got {value!r:.200}; "
                         "token-id prompts are not supported.", "prompt")
    return prompts


def parse(body: Any, kind: str) -> OpenAIRequest:
    """Check an OpenAI request body (``kind``: ``completions`` or ``chat``) and translate it."""
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, got {type(body).__name__}.")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise BadRequest(f"Unsupported field(s) {unknown}; this server accepts {sorted(FIELDS[kind])}.", unknown[0])
    for key, neutral in NEUTRAL.items():
        if key in body and not any(_same(body[key], n) for n in neutral):
            raise BadRequest(f"`{key}` = {body[key]!r} is not supported by this server; leave it out.", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(f"`model` must be a non-empty string (the adapter to use), got {model!r}.", "model")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):  # 0 or "yes" is a client bug, not a choice
        raise BadRequest(f"`stream` must be true or false, got {stream!r}.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest(f"`stream_options` may only hold `include_usage`, got {options!r}.", "stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise BadRequest(f"`stream_options.include_usage` must be true or false, got {options['include_usage']!r}.",
                         "stream_options")
    model_input = _messages(body.get("messages")) if kind == "chat" else _prompts(body.get("prompt"))
    if stream and kind == "completions" and len(model_input) != 1:
        raise BadRequest(f"A streamed completion takes one prompt, got {len(model_input)}; send one per request.",
                         "prompt")
    return OpenAIRequest(kind, model, model_input, _params(body, kind), stream, bool(options.get("include_usage")))


def _finish(tokens: int, max_new_tokens: int) -> str:
    return "length" if tokens >= max_new_tokens else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: OpenAIRequest, texts: list[str], tokens: list[int], prompt_tokens: int,
             max_new_tokens: int, finish_reasons: list[str] | None = None) -> dict[str, Any]:
    """A ``text_completion`` or ``chat.completion`` object for non-streamed completions.

    ``tokens`` are the generated token counts; ``finish_reasons`` (``stop`` or ``length``, from how generation
    ended) default to what the counts imply against ``max_new_tokens``.
    """
    reasons = finish_reasons or [_finish(n, max_new_tokens) for n in tokens]
    if req.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        obj, prefix = "text_completion", "cmpl-"
    return {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model, "choices": choices,
            "usage": _usage(prompt_tokens, sum(tokens))}


def chunk(req: OpenAIRequest, piece: str | None, finish_reason: str | None = None, *, first: bool = False,
          usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk: a text piece, the final one with ``finish_reason``, or the usage-only one."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if piece is not None:
            delta["content"] = piece
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj, prefix = "chat.completion.chunk", "chatcmpl-"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}
        obj, prefix = "text_completion", "cmpl-"
    out = {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model,
           "choices": [] if usage is not None else [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def models_list(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "smolora"}
                                       for n in names]}


# ----------------------------------------------------------------------------------------------------
# errors in OpenAI's shape on every /v1/ path


def is_openai_path(path: str | None) -> bool:
    return bool(path) and (path == "/v1" or path.startswith("/v1/"))


def _as_openai(status: int, body: bytes) -> bytes | None:
    """``body`` as OpenAI's error object; None when it already is one."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict) and "message" in document["error"]:
        return None
    message = (document.get("message") or document.get("detail")) if isinstance(document, dict) else None
    if not isinstance(message, str):
        message = json.dumps(message) if message else body.decode("utf-8", "replace").strip()
    return json.dumps(error_body(message or f"HTTP {status}", status)).encode()


class OpenAIErrors:
    """ASGI middleware: an error answered on a ``/v1/`` path leaves in OpenAI's shape, whoever answered it.

    Only error responses are held back (to rewrite them whole); a 2xx, a stream included, passes through
    as it is sent.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_openai_path(scope.get("path")):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []
        started = False

        async def shaped(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held.update(message)
                return
            if not held or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            body = _as_openai(held["status"], body) or body
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type",
                                                                                    b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, shaped)
        except Exception:  # a bug, not the client's fault: still an answer an OpenAI client can read
            if started:
                raise
            _logger.exception("Unhandled error on %s", scope.get("path"))
            body = json.dumps(error_body("The server failed to answer this request; see its log.", 500)).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
