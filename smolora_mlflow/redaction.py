"""Secrets never reach a param, a tag or an artifact in clear (stdlib only).

Example:
    >>> redact({"hf_token": "abc", "max_new_tokens": 8, "uri": "postgresql://u:pw@db/x"})
    {'hf_token': '***', 'max_new_tokens': 8, 'uri': 'postgresql://u:***@db/x'}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Names that look like credentials are never logged as params or written to artifacts in clear.
SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "apikey", "credential", "credentials", "auth"})


def is_secret(key: str) -> bool:
    """Whether ``key`` names a credential (``hf_token``, ``API_KEY``, ``db.password``; not ``max_new_tokens``)."""
    words = [w for w in key.lower().replace("-", "_").replace(".", "_").split("_") if w]
    return bool(SECRET_WORDS.intersection(words)) or "api_key" in "_".join(words) or words[-1:] == ["key"]


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^/@:\s]+:)[^/@\s]+@")


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with secret-looking keys (and nested ones) replaced by ``***``, and passwords in URLs masked."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret(key) and value not in (None, ""):
            out[key] = "***"
        elif isinstance(value, Mapping):
            out[key] = redact(value)
        elif isinstance(value, str):
            out[key] = _URL_PASSWORD.sub(r"\g<head>***@", value)
        else:
            out[key] = value
    return out
