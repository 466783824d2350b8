"""An ASGI middleware in front of every route that reads a body: bad requests get a 4xx, never a 500.

MLflow's scoring server fails with HTTP 500 on some requests before the model runs: JSON nested
about 1,000 deep (``RecursionError`` while it decodes the body) and a request with no Content-Type
(``AttributeError`` on ``None.split``); the routes beside it (``/stream``, ``/v1/completions``,
``/v1/chat/completions``) parse any body as JSON and failed the same way, and on a lone surrogate
(``"\\ud800"``), which the tokenizer cannot encode. :class:`RequestGuard` is the one input check for
all of them (``POST`` on the paths in :data:`POLICIES`; ``/ping``, ``/health``, ``/version``,
``/metrics`` and ``GET /v1/models`` read no body and pass through untouched):

- a Content-Type is required, with at most a ``charset=utf-8`` parameter (415 otherwise):
  ``application/json`` or ``text/csv`` on ``/invocations`` (what MLflow parses), ``application/json``
  only on ``/stream`` and ``/v1/*``, which parse nothing else;
- the body is bounded: ``Content-Length`` over the limit is refused before anything is read, and a
  body that streams past it is refused as soon as it does (413);
- JSON nesting depth is measured without recursion (strings removed with one regular expression,
  then a cumulative sum over the brackets left) and bounded (400);
- on ``/stream`` and ``/v1/*`` the body must be UTF-8 JSON without the ``NaN``/``Infinity`` extensions
  (or numbers like ``1e999`` that overflow to them) that Python's decoder accepts (400);
- a string holding a lone surrogate, anywhere in a JSON body, is a 400 naming where it is;
- on ``/invocations``, a prompt that is ``null``, a number, a boolean or (in ``inputs``/``instances``) an
  object is a 400 naming its row (see :mod:`.payload`), because MLflow would cast it to a string first.

The body it read is handed on as one ``http.request`` message; later ``receive`` calls (disconnects) go
to the server. Error bodies are JSON: MLflow's ``{"error_code", "message"}``, or OpenAI's
``{"error": {"message", "type", "param", "code"}}`` on ``/v1/`` paths.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from smolora_mlflow.serving.openai_api import error_body, is_openai_path
from smolora_mlflow.serving.payload import prompt_problem

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONTENT_TYPES = ("application/json", "text/csv")  # what /invocations (MLflow's parser) accepts
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64
ENV_MAX_BODY_BYTES = "SMOLORA_SERVE_MAX_BODY_BYTES"
ENV_MAX_DEPTH = "SMOLORA_SERVE_MAX_JSON_DEPTH"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
# Only a body holding a \uD800-\uDFFF escape (or, as json.loads decodes bytes with "surrogatepass", the
# bytes ED A0-BF) can decode to a string with a surrogate in it: the others skip the walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


@dataclass(frozen=True)
class Policy:
    """What one path accepts: its content types; whether its body must be strict JSON (this package's
    routes: nothing in them expects NaN, which compares False to every bound); whether MLflow's scoring
    payload forms are checked (``/invocations``, whose parser is MLflow's and stays as lenient as it is)."""

    content_types: tuple[str, ...] = CONTENT_TYPES
    strict_json: bool = False
    payload_check: bool = False  # see .payload


JSON_ONLY = Policy(("application/json",), strict_json=True)
POLICIES = {"/invocations": Policy(payload_check=True), "/stream": JSON_ONLY, "/v1/completions": JSON_ONLY,
            "/v1/chat/completions": JSON_ONLY}


class Rejected(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, computed without recursion.

    Brackets inside strings do not count; for text that is not valid JSON the result is an upper
    bound of sorts (an unterminated string's brackets count), which is all a limit needs.
    """
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", body))
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64).max())


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v for k, v in scope.get("headers") or [] if k.lower() == name]
    return values[-1].decode("latin-1") if values else None


def check_content_type(value: str | None, accepted_types: tuple[str, ...] = CONTENT_TYPES) -> str:
    """The request's MIME type, or :class:`Rejected` (415) naming what is accepted."""
    accepted = " or ".join(accepted_types)
    if value is None or not value.strip():
        raise Rejected(415, "BAD_REQUEST", f"The request has no Content-Type header; send Content-Type: {accepted}.")
    mime, *parameters = (part.strip() for part in value.split(";"))
    mime = mime.lower()
    if mime not in accepted_types:
        raise Rejected(415, "BAD_REQUEST", f"Content-Type {value!r} is not supported; send {accepted}.")
    for parameter in parameters:
        key, _, val = parameter.partition("=")
        if key.strip().lower() != "charset" or val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise Rejected(415, "BAD_REQUEST", f"Content-Type parameter {parameter!r} is not supported; "
                                               "the only one accepted is charset=utf-8.")
    return mime


def _refuse_constant(name: str) -> Any:
    raise Rejected(400, "INVALID_PARAMETER_VALUE", f"The JSON body holds {name}, which JSON does not have; "
                   "send a finite number.")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected(400, "INVALID_PARAMETER_VALUE", f"The number {text[:40]} in the JSON body is out of range "
                       "(it is infinite as a float); send a finite number.")
    return value


def _parse_strict(body: bytes) -> Any:
    """UTF-8 JSON as RFC 8259 has it: no NaN, no Infinity, no number that overflows to one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(400, "BAD_REQUEST", f"The request body is not UTF-8 (byte {e.start}); send UTF-8 JSON.") from e
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except ValueError as e:
        raise Rejected(400, "BAD_REQUEST", f"The request body is not valid JSON: {e}.") from e


def _where(path: list[str | int]) -> str | None:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out or None


def surrogate_problem(document: Any) -> tuple[str | None, str] | None:
    """(where, message) for the first string (or key) holding a lone UTF-16 surrogate; None if none does.

    JSON's ``\\uD83D\\uDE00`` pairs decode to one character; what is left is a lone surrogate, which no
    UTF-8 text (a tokenizer's input) can hold. Walked with a stack, not recursion.
    """
    stack: list[tuple[Any, list[str | int]]] = [(document, [])]
    while stack:
        value, path = stack.pop()
        strings: list[tuple[str, str]] = []
        if isinstance(value, dict):
            stack.extend((v, [*path, k]) for k, v in reversed(value.items()))
            name = f"`{_where(path)}`" if path else "the body"
            strings = [(k, f"a key of {name}") for k in value]
        elif isinstance(value, list):
            stack.extend((v, [*path, i]) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, str):
            strings = [(value, f"`{_where(path)}`" if path else "the body")]
        for text, what in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return _where(path), (f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                                      f"{e.start}; send valid Unicode text (a surrogate pair or the character "
                                      "itself).")
    return None


def check_json(body: bytes, max_depth: int, policy: Policy = POLICIES["/invocations"]) -> None:
    """Bounded nesting, strict JSON where the route needs it, no lone surrogates, typed prompts; a body that
    is not JSON goes on to MLflow on ``/invocations`` (it answers with a 400 of its own)."""
    depth = json_depth(body)
    if depth > max_depth:
        raise Rejected(400, "INVALID_PARAMETER_VALUE", f"The JSON body is nested {depth} levels deep, more than "
                       f"the {max_depth} this server accepts ({ENV_MAX_DEPTH}); send a flatter payload.")
    if policy.strict_json:
        document = _parse_strict(body)
    else:
        try:
            document = json.loads(body)
        except json.JSONDecodeError:  # MLflow answers it with a 400 of its own
            return
        except ValueError as e:  # an integer over Python's 4,300 digits: MLflow's parser fails on it with a 500
            raise Rejected(400, "BAD_REQUEST", f"The request body is not valid JSON: {e}.") from e
    if _SURROGATE_ESCAPE.search(body) and (problem := surrogate_problem(document)):
        raise Rejected(400, "INVALID_PARAMETER_VALUE", problem[1], param=problem[0])
    if policy.payload_check and (message := prompt_problem(document)):
        raise Rejected(400, "INVALID_PARAMETER_VALUE", message)


class RequestGuard:
    """Pure ASGI middleware bounding ``POST`` requests on ``paths`` (see :data:`POLICIES`) before ``app``
    sees them.

    Example:
        >>> from mlflow.pyfunc import scoring_server                      # doctest: +SKIP
        >>> app = RequestGuard(scoring_server.init(pyfunc_model))         # doctest: +SKIP
    """

    def __init__(self, app: Callable, *, max_body_bytes: int | None = None, max_depth: int | None = None,
                 paths: tuple[str, ...] = ("/invocations",)):
        self.app = app
        self.max_body_bytes = int(max_body_bytes or os.environ.get(ENV_MAX_BODY_BYTES) or DEFAULT_MAX_BODY_BYTES)
        self.max_depth = int(max_depth or os.environ.get(ENV_MAX_DEPTH) or DEFAULT_MAX_DEPTH)
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in self.paths:
            await self.app(scope, receive, send)
            return
        policy = POLICIES.get(path, Policy())
        try:
            mime = check_content_type(_header(scope, b"content-type"), policy.content_types)
            body = await self._read_body(scope, receive)
            if body is None:  # the client went away
                return
            if mime == "application/json":
                check_json(body, self.max_depth, policy)
        except Rejected as e:
            await reject(send, e.status, e.message, code=e.code, param=e.param, openai=is_openai_path(path))
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not re.fullmatch(r"[0-9]+", declared.strip()):  # not str.isdigit: "²" is a digit int() refuses
                raise Rejected(400, "BAD_REQUEST", f"Content-Length {declared!r} is not a number.")
            if int(declared) > limit:
                raise _too_large(int(declared), limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, limit: int) -> Rejected:
    return Rejected(413, "BAD_REQUEST", f"The request body has {size:,} bytes or more, over the {limit:,} this "
                                        f"server accepts ({ENV_MAX_BODY_BYTES}); split it into smaller requests.")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over the whole body once, then defers to the server's own."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def reject(send: Send, status: int, message: str, *, code: str = "BAD_REQUEST", param: str | None = None,
                 openai: bool = False, openai_code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with an error: MLflow's ``{"error_code", "message"}``, or OpenAI's shape (``openai``)."""
    document = (error_body(message, status, param, openai_code) if openai else
                {"error_code": code, "message": message})
    body = json.dumps(document).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
