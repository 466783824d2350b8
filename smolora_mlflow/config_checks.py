"""The checks ``SmoloraConfig.__post_init__`` runs; each returns problems as text, and the config raises once.

Stdlib only, like :mod:`smolora_mlflow.config` which it serves. A check takes the config instance (and, where
it needs them, the field type hints the config module resolved once), so it never imports the config
module back. Every message names the field, the value and what is allowed (litgpt ``validate_args``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from smolora_mlflow.config_parsing import describe_type, target_modules, unwrap_optional

# `lora_*` fields are aliases of these LoraConfig keys; a key given both ways is an error.
PEFT_ALIASES = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "target_modules": "lora_target_modules", "bias": "lora_bias"}
# Config fields that are TRL config keys of the same name (for every method that has the key).
TRAINER_ALIASES = {k: k for k in (
    "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "seed",
    "logging_steps", "save_total_limit", "output_dir")}


def unknown_key_message(key: str, names: Iterable[str]) -> str:
    """The problem for a key that is none of ``names`` (the config's fields), with the closest one if any."""
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" Did you mean `{close[0]}`?" if close else " See `smolora train --help` for the fields."
    return f"`{key}` is not a config field.{hint}"


def field_default(cfg: Any, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cfg`` (its ``default_factory`` called)."""
    f = next(f for f in dataclasses.fields(cfg) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def alias_problems(cfg: Any) -> list[str]:
    """Move alias keys of ``peft``/``trainer_args`` into their fields; a key set both ways is a problem.

    A field still at its default counts as not given (a dataclass cannot tell the two apart).
    """
    problems = []
    for option, aliases in (("peft", PEFT_ALIASES), ("trainer_args", TRAINER_ALIASES)):
        options = getattr(cfg, option)
        if not isinstance(options, dict):
            continue
        options = dict(options)  # never change the caller's mapping
        setattr(cfg, option, options)
        for key in [k for k in options if k in aliases]:
            name = aliases[key]
            value = options.pop(key)
            if getattr(cfg, name) != field_default(cfg, name):
                problems.append(f"`{option}.{key}` and `{name}` set the same option ({value!r} and "
                                f"{getattr(cfg, name)!r}); set only `{name}`.")
                continue
            setattr(cfg, name, target_modules(value) if name == "lora_target_modules" else value)
    return problems


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of type annotation ``tp`` (an int is no bool, and is a float)."""
    tp, optional = unwrap_optional(tp)
    if value is None:
        return optional
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def type_problems(cfg: Any, hints: Mapping[str, Any]) -> list[str]:
    """One problem per field of ``cfg`` whose value is not of its type in ``hints``."""
    problems = []
    for name, tp in hints.items():
        value = getattr(cfg, name)
        if not matches(value, tp):
            problems.append(f"`{name}` must be {describe_type(tp)}, got {value!r}.")
    return problems


# (field, predicate, allowed range text)
RANGES: list[tuple[str, Any, str]] = [
    ("lora_r", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("lora_alpha", lambda v: v > 0, "a number > 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("learning_rate", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("max_grad_norm", lambda v: v > 0, "a number > 0"),
    ("num_train_epochs", lambda v: v > 0, "a number > 0"),
    ("per_device_train_batch_size", lambda v: 1 <= v <= 4096, "an integer in 1..4096"),
    ("gradient_accumulation_steps", lambda v: 1 <= v <= 4096, "an integer in 1..4096"),
    ("max_length", lambda v: 8 <= v <= 131072, "an integer in 8..131072"),
    ("eval_fraction", lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    ("logging_steps", lambda v: v >= 1, "an integer >= 1"),
    ("eval_steps", lambda v: v >= 0, "an integer >= 0"),
    ("save_steps", lambda v: v >= 0, "an integer >= 0"),
    ("save_total_limit", lambda v: v >= 1, "an integer >= 1"),
    ("chunk_words", lambda v: v >= 0, "an integer >= 0"),
    ("max_samples", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("sample_max_new_tokens", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("system_metrics_interval", lambda v: v > 0, "a number > 0"),
    ("task_max_rows", lambda v: v >= 1, "an integer >= 1"),
    ("task_max_new_tokens", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("sweep_trials", lambda v: 1 <= v <= 10000, "an integer in 1..10000"),
    ("sweep_workers", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("sweep_trial_cpus", lambda v: v > 0, "a number > 0"),
    ("sweep_trial_gpus", lambda v: v >= 0, "a number >= 0"),
]


def range_problems(cfg: Any, hints: Mapping[str, Any]) -> list[str]:
    """Values out of range, empty names, a bad regex, options of another method; fields of a wrong type
    (see :func:`type_problems`) are left to that check."""
    problems = []
    bad_types = {p.split("`")[1] for p in type_problems(cfg, hints)}
    for name, ok, allowed in RANGES:
        if name in bad_types:
            continue
        value = getattr(cfg, name)
        if not ok(value):
            problems.append(f"`{name}` must be {allowed}, got {value!r}.")
    for name in ("base_model", "dataset", "output_dir", "experiment_name"):
        if name not in bad_types and not getattr(cfg, name).strip():
            problems.append(f"`{name}` must not be empty.")
    if "task_answer_regex" not in bad_types and cfg.task_answer_regex is not None:
        try:
            re.compile(cfg.task_answer_regex.replace("{answer}", "x"))
        except re.error as e:
            problems.append(f"`task_answer_regex` must be a valid regular expression, got "
                            f"{cfg.task_answer_regex!r} ({e}).")
    if "rewards" not in bad_types and cfg.rewards and cfg.method != "grpo":
        problems.append(f"`rewards` is read by `method: grpo` only, got {cfg.rewards!r} with method "
                        f"{cfg.method!r}; drop `rewards` or set `method: grpo`.")
    if "lora_target_modules" not in bad_types and not cfg.lora_target_modules:
        problems.append("`lora_target_modules` must name at least one module, or be `all-linear`.")
    return problems
