"""An ASGI middleware in front of MLflow's scoring server: bad requests get a 4xx, never a 500.

MLflow's scoring server fails with HTTP 500 on some requests before the model runs: JSON nested
about 1,000 deep (``RecursionError`` while it decodes the body) and a request with no Content-Type
(``AttributeError`` on ``None.split``). :class:`RequestGuard` answers those itself, for
``POST /invocations`` only (``/ping``, ``/health``, ``/version`` pass through untouched):

- a Content-Type is required: ``application/json`` or ``text/csv``, with at most a ``charset=utf-8``
  parameter (415 otherwise);
- the body is bounded: ``Content-Length`` over the limit is refused before anything is read, and a
  body that streams past it is refused as soon as it does (413);
- JSON nesting depth is measured without recursion (strings removed with one regular expression,
  then a cumulative sum over the brackets left) and bounded (400);
- a prompt that is ``null``, a number or a boolean is a 400 naming its row (see :mod:`.payload`),
  because MLflow would cast it to a string first.

The body it read is handed on to MLflow as one ``http.request`` message; later ``receive`` calls
(disconnects) go to the server. Error bodies are JSON, like MLflow's: ``{"error_code", "message"}``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from smolora_mlflow.serving.payload import prompt_problem

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CONTENT_TYPES = ("application/json", "text/csv")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64
ENV_MAX_BODY_BYTES = "SMOLORA_SERVE_MAX_BODY_BYTES"
ENV_MAX_DEPTH = "SMOLORA_SERVE_MAX_JSON_DEPTH"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


class Rejected(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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


def check_content_type(value: str | None) -> str:
    """The request's MIME type, or :class:`Rejected` (415) naming what is accepted."""
    accepted = " or ".join(CONTENT_TYPES)
    if value is None or not value.strip():
        raise Rejected(415, "BAD_REQUEST", f"The request has no Content-Type header; send Content-Type: {accepted}.")
    mime, *parameters = (part.strip() for part in value.split(";"))
    mime = mime.lower()
    if mime not in CONTENT_TYPES:
        raise Rejected(415, "BAD_REQUEST", f"Content-Type {value!r} is not supported; send {accepted}.")
    for parameter in parameters:
        key, _, val = parameter.partition("=")
        if key.strip().lower() != "charset" or val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise Rejected(415, "BAD_REQUEST", f"Content-Type parameter {parameter!r} is not supported; "
                                               "the only one accepted is charset=utf-8.")
    return mime


def check_json(body: bytes, max_depth: int) -> None:
    """Bounded nesting, then prompts of the right JSON type; a body that is not JSON goes on to MLflow."""
    depth = json_depth(body)
    if depth > max_depth:
        raise Rejected(400, "INVALID_PARAMETER_VALUE", f"The JSON body is nested {depth} levels deep, more than "
                       f"the {max_depth} this server accepts ({ENV_MAX_DEPTH}); send a flatter payload.")
    try:
        document = json.loads(body)
    except ValueError:  # MLflow answers invalid JSON with a 400 of its own
        return
    if problem := prompt_problem(document):
        raise Rejected(400, "INVALID_PARAMETER_VALUE", problem)


class RequestGuard:
    """Pure ASGI middleware bounding ``POST /invocations`` requests before ``app`` sees them.

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
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            mime = check_content_type(_header(scope, b"content-type"))
            body = await self._read_body(scope, receive)
            if body is None:  # the client went away
                return
            if mime == "application/json":
                check_json(body, self.max_depth)
        except Rejected as e:
            await _reject(send, e)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
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


async def _reject(send: Send, error: Rejected) -> None:
    body = json.dumps({"error_code": error.code, "message": error.message}).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
