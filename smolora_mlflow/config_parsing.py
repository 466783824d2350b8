"""Turning raw config values (YAML, CLI flags, ``mlflow run -P key=value`` text) into typed ones.

Stdlib only, like :mod:`smolora_mlflow.config` which it serves. Nothing here knows a config field by name: a
value is read against the type annotation it is given, and every failure is a :class:`ConfigError` that
names the field, the value and what is allowed.

Example:
    >>> coerce_value("lora_r", int, "8")
    8
    >>> as_list("q_proj, v_proj")
    ['q_proj', 'v_proj']
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """Raised with every problem of a config at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid smolora config ({len(problems)} problem(s)):\n{lines}")


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(tp, False)``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def describe_type(tp: Any) -> str:
    """A type annotation in words, for messages and ``--help`` (``an integer``, ``one of 'a', 'b'``)."""
    tp, optional = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(describe_type(a) for a in typing.get_args(tp))
    elif origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif origin is list:
        text = "a list of " + typing.get_args(tp)[0].__name__
    elif origin is dict:
        text = "a mapping of str to " + ("values" if typing.get_args(tp)[1] is Any else "str")
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
    return text + (" (or null)" if optional else "")


def as_list(value: Any) -> Any:
    """A list from a JSON list text, a comma-separated text or a tuple; anything else unchanged."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, tuple):
        return list(value)
    return value


_REGEX_CHARS = set("*()[]|\\^$?+{}")


def target_modules(value: Any) -> Any:
    """A list of module names, or one regular expression (PEFT's str form) when the text has regex characters."""
    if isinstance(value, str) and not value.strip().startswith("[") and _REGEX_CHARS & set(value):
        return value.strip()
    return as_list(value)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(name: str, raw: Any) -> bool:
    """``true/false/yes/no/on/off/1/0`` (as ``mlflow run -P`` passes them) to a bool, else ConfigError."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError([f"`{name}` must be true or false, got {raw!r}."])


def coerce_value(name: str, hint: Any, raw: Any) -> Any:
    """Turn a command-line string into a value of type ``hint`` (field ``name``'s); raise ConfigError if it can't."""
    if not isinstance(raw, str):
        return raw
    tp, optional = unwrap_optional(hint)
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            return parse_bool(name, text)
        if tp is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if tp is float:
            return float(text)
        if origin is list:
            return as_list(text)
        if origin in (typing.Union, types.UnionType):  # list[str] | str: names, or one regular expression
            return target_modules(text)
        if origin is dict:
            parsed = json.loads(text) if text.startswith("{") else dict(
                kv.split("=", 1) for kv in text.split(",") if kv
            )
            if typing.get_args(tp)[1] is Any:  # upstream options: typed later against the upstream dataclass
                return {str(k).strip(): v.strip() if isinstance(v, str) else v for k, v in parsed.items()}
            return {str(k): str(v) for k, v in parsed.items()}
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError([f"`{name}` must be {describe_type(hint)}, got {raw!r}."]) from e
    return text
