"""``smolora serve --api_key``: every route but ``/ping`` and ``/health`` requires ``Authorization: Bearer <key>``.

The key reaches the server process only through its environment (``SMOLORA_SERVE_API_KEY``), never its
command line, which any local user can read (``ps``, ``/proc/<pid>/cmdline``); ``/proc/<pid>/environ`` is
readable only by the same user and root. :class:`ApiKeyAuth` is a pure ASGI middleware placed outside the
request guard, so a client without the key gets its 401 before any body is read or parsed. The presented
token is compared with :func:`hmac.compare_digest` on SHA-256 digests of both, so the comparison takes the
same time whatever the token, its length included. ``/ping`` and ``/health`` stay open for load balancers
and orchestrators' probes; they say only that the server is up.

Example:
    >>> app = ApiKeyAuth(inner_app, "s3cret-key")      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

from smolora_mlflow.serving.guard import reject
from smolora_mlflow.serving.openai_api import is_openai_path

ENV_API_KEY = "SMOLORA_SERVE_API_KEY"
OPEN_PATHS = frozenset({"/ping", "/health"})
_CHALLENGE = [(b"www-authenticate", b'Bearer realm="smolora serve"')]


def check_api_key(key: str, source: str = ENV_API_KEY) -> str:
    """``key`` if it can be sent in an HTTP header as a bearer token; ValueError naming ``source`` if not.

    An empty key is refused, not taken as "no key": a deployment that templated an unset variable into
    ``SMOLORA_SERVE_API_KEY=`` meant to protect the server, so it fails closed.
    """
    if not key:
        raise ValueError(f"{source} is set but empty; set it to the key clients must send (or unset it to "
                         "serve without one).")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError(f"{source} must be printable ASCII without spaces (what an HTTP header can carry), "
                         f"got {len(key)} characters including others; generate one with "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    return key


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The key in ``SMOLORA_SERVE_API_KEY`` (checked), or None when the variable is not set."""
    environ = os.environ if environ is None else environ
    return None if ENV_API_KEY not in environ else check_api_key(environ[ENV_API_KEY])


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyAuth:
    """ASGI middleware: a request without ``Authorization: Bearer <api_key>`` gets a 401, except on
    :data:`OPEN_PATHS`. Errors are MLflow's ``{"error_code": "UNAUTHENTICATED", "message"}``, or OpenAI's
    shape (``code``: ``invalid_api_key``) on ``/v1/`` paths, as OpenAI clients expect."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = _digest(check_api_key(api_key, "the API key").encode("ascii"))

    def authorized(self, scope: dict[str, Any]) -> bool:
        values = [v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"]
        if len(values) != 1:  # two Authorization headers: which one a proxy checked is anyone's guess
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        # Both compared, always: the time taken says nothing about which part was wrong.
        return hmac.compare_digest(_digest(token.strip()), self._expected) & (scheme.lower() == b"bearer")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # closing before accepting answers the handshake with a 403
            await send({"type": "websocket.close", "code": 1008})
            return
        has_header = any(k.lower() == b"authorization" for k, _ in scope.get("headers") or [])
        message = ("The API key is wrong; send the server's key as `Authorization: Bearer <key>`." if has_header else
                   "This server requires an API key; send `Authorization: Bearer <key>` (the openai client's "
                   "api_key).")
        await reject(send, 401, message, code="UNAUTHENTICATED", openai=is_openai_path(scope.get("path")),
                     openai_code="invalid_api_key", headers=_CHALLENGE)


def protect(app, api_key: str | None):
    """``app`` behind :class:`ApiKeyAuth` when there is a key, else ``app`` itself."""
    return ApiKeyAuth(app, api_key) if api_key else app
