"""Validation of the ``peft`` and ``trainer_args`` options against the upstream dataclasses themselves.

Stdlib only at import time, like the config it serves: PEFT and TRL are imported inside
:func:`upstream_problems`, and only when a run sets one of these options. Nothing here knows an upstream
field by name; the fields, their types and their defaults are read from ``LoraConfig`` and the method's
TRL config class (as TRL's own ``TrlParser`` reads them), so a new upstream option is reachable the day
it ships.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> SmoloraConfig(peft={"use_dora": "true"}).peft
    {'use_dora': True}
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from typing import Any, Literal

TRL_CONFIG_CLASSES = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig", "grpo": "GRPOConfig"}
# Options smolora owns: setting them through `trainer_args` would break the run record or the layout.
_RESERVED_TRAINER = {
    "report_to": "smolora logs the run to MLflow itself; set `tracking: false` to turn that off",
    "logging_dir": "smolora logs the run to MLflow itself",
}
_RESERVED_PEFT = {"task_type": "smolora trains causal LMs (CAUSAL_LM)", "peft_type": "smolora trains LoRA"}
_UNSET = object()


def upstream_class(option: str, method: str) -> type:
    """``LoraConfig`` for ``peft``, else the TRL config class of ``method``."""
    if option == "peft":
        from peft import LoraConfig

        return LoraConfig
    import trl

    return getattr(trl, TRL_CONFIG_CLASSES[method])


def upstream_fields(cls: type) -> dict[str, Any]:
    """Init fields of an upstream dataclass and their resolved types (``Any`` where a hint cannot resolve)."""
    import sys

    module = sys.modules.get(cls.__module__)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = f.type
        if isinstance(tp, str):
            try:
                # The upstream class's own annotation text, evaluated in its module as typing.get_type_hints does
                # (per field, so one unresolvable hint does not lose the others).
                tp = eval(tp, vars(module) if module else {}, {"Literal": Literal})
            except Exception:  # a hint naming what the module does not import: accept any value
                tp = Any
        out[f.name] = tp
    return out


def upstream_problems(cfg: Any) -> list[str]:
    """Check (and type, in place) ``cfg.peft`` and ``cfg.trainer_args``; one message per problem.

    Strings (from the CLI or ``mlflow run -P``) are turned into the field's type; an unknown key names the
    closest upstream field; a wrong type names the field and the value. ``peft`` is then handed to
    ``LoraConfig`` itself, whose own checks (e.g. an ``init_lora_weights`` it does not know) are reported too.
    """
    problems: list[str] = []
    for option, reserved in (("peft", _RESERVED_PEFT), ("trainer_args", _RESERVED_TRAINER)):
        options = getattr(cfg, option)
        if not options:
            continue
        cls = upstream_class(option, cfg.method)
        fields = upstream_fields(cls)
        typed = {}
        for key, value in options.items():
            if key in reserved:
                problems.append(f"`{option}.{key}` cannot be set: {reserved[key]}.")
            elif key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                problems.append(f"`{option}.{key}` is not a field of {cls.__name__}.{hint}")
            else:
                coerced = coerce_upstream(value, fields[key])
                if coerced is _UNSET:
                    problems.append(f"`{option}.{key}` must be {_describe(fields[key])} ({cls.__name__}), "
                                    f"got {value!r}.")
                else:
                    typed[key] = coerced
        options.update(typed)
    if cfg.peft and not problems:
        problems += _lora_config_problems(cfg)
    return problems


def _lora_config_problems(cfg: Any) -> list[str]:
    """Let ``LoraConfig`` check the combination (its ``__post_init__`` refuses e.g. DoRA with some options)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    try:
        LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   target_modules=targets if isinstance(targets, str) else list(targets), bias=cfg.lora_bias,
                   task_type="CAUSAL_LM", **cfg.peft)
    except (ValueError, TypeError) as e:
        return [f"`peft` {cfg.peft!r} is refused by LoraConfig: {e}"]
    return []


# ----------------------------------------------------------------------------------------------------
# typing a value against an upstream hint


def coerce_upstream(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (a string is parsed: ``true``, ``0.1``, JSON lists/maps), or ``_UNSET``.

    A value that already fits any member of a union is kept as it is, so ``init_lora_weights=pissa`` stays
    the text `pissa` rather than being read as a bool.
    """
    if _fits(value, tp):
        return value
    if isinstance(value, str):
        for candidate in _parses(value.strip()):
            if _fits(candidate, tp):
                return candidate
    return _UNSET


def _parses(text: str) -> list[Any]:
    out: list[Any] = []
    low = text.lower()
    if low in ("true", "yes", "on"):
        out.append(True)
    elif low in ("false", "no", "off"):
        out.append(False)
    elif low in ("none", "null"):
        out.append(None)
    for parse in (int, float, json.loads):
        try:
            out.append(parse(text))
        except ValueError:
            continue
    if "|" in text:  # lists on the command line, where a comma separates options: q_proj|v_proj
        out.append([_scalar(v) for v in text.split("|") if v.strip()])
    return out


def _scalar(text: str) -> Any:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any or tp is dataclasses.MISSING:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None) or tp is None:
        return value is None
    if origin is Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in {m.name for m in tp}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, dict)  # upstream builds its nested config from a mapping
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a hint form we do not model: upstream checks it


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list (JSON, or A|B|C) of {_describe(typing.get_args(tp)[0]) if typing.get_args(tp) else 'values'}"
    if tp is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))
