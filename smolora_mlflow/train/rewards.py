"""GRPO reward functions: the built-ins, a user's ``module:function``, and the recorder that tables them.

A reward function has TRL's signature, ``f(prompts, completions, **kwargs) -> list[float]``, where the
keywords hold the dataset's other columns (``answer``) and ``trainer_state``. TRL names each function's
metrics after its ``__name__`` (``rewards/<name>/mean``, ``rewards/<name>/std``), so every function here
carries the name the user wrote.

Built-ins (``cfg.rewards``, e.g. ``length_target=40,regex_match``):

- ``length_target[=N]``: 1 - |characters - N| / N, floored at 0 (N defaults to 32): dense, so it learns fast.
- ``regex_match[=PATTERN]``: 1.0 when the completion matches PATTERN (default ``cfg.task_answer_regex``,
  whose ``{answer}`` stands for the row's answer, escaped), else 0.0.
- ``exact_answer``: 1.0 when the stripped completion equals the row's stripped ``answer``, else 0.0.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from smolora_mlflow.config import SmoloraConfig

BUILTINS = ("length_target", "regex_match", "exact_answer")
DEFAULT_REWARDS = ["length_target"]
DEFAULT_LENGTH = 32
TABLE_ROWS_PER_STEP = 32  # sampled completions kept per logged step: a readable table, not a dump

RewardFn = Callable[..., list[float]]


def text_of(completion: Any) -> str:
    """A completion as text: plain, or the content of chat messages (TRL's conversational form)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _named(fn: RewardFn, name: str) -> RewardFn:
    fn.__name__ = fn.__qualname__ = name
    return fn


def length_target(target: int = DEFAULT_LENGTH) -> RewardFn:
    def reward(prompts, completions, **kwargs) -> list[float]:
        return [max(0.0, 1.0 - abs(len(text_of(c)) - target) / target) for c in completions]

    return _named(reward, "length_target")


def regex_match(pattern: str) -> RewardFn:
    def reward(prompts, completions, answer=None, **kwargs) -> list[float]:
        answers = answer if answer is not None else [""] * len(completions)
        return [float(re.search(pattern.replace("{answer}", re.escape(str(a).strip())), text_of(c)) is not None)
                for c, a in zip(completions, answers, strict=True)]

    return _named(reward, "regex_match")


def exact_answer() -> RewardFn:
    def reward(prompts, completions, answer=None, **kwargs) -> list[float]:
        if answer is None:
            raise ValueError("reward `exact_answer` needs an `answer` column in the GRPO dataset.")
        return [float(text_of(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]

    return _named(reward, "exact_answer")


def resolve_rewards(cfg: SmoloraConfig) -> list[RewardFn]:
    """The reward functions ``cfg.rewards`` names (``length_target`` when none), each named as written.

    Raises:
        ValueError: an unknown built-in, a bad argument, or a ``module:function`` that cannot be imported.
    """
    out = []
    for spec in cfg.rewards or DEFAULT_REWARDS:
        name, _, arg = spec.partition("=")
        name = name.strip()
        if name == "length_target":
            try:
                target = int(arg) if arg else DEFAULT_LENGTH
            except ValueError as e:
                raise ValueError(f"`rewards`: length_target takes a length in characters, got {arg!r}.") from e
            out.append(length_target(max(target, 1)))
        elif name == "regex_match":
            pattern = arg or cfg.task_answer_regex
            if not pattern:
                raise ValueError("`rewards`: regex_match needs a pattern: `regex_match=PATTERN` or "
                                 "`task_answer_regex`.")
            out.append(regex_match(pattern))
        elif name == "exact_answer":
            out.append(exact_answer())
        elif ":" in spec:
            out.append(_import(spec))
        else:
            raise ValueError(f"`rewards`: unknown reward {spec!r}; use one of {', '.join(BUILTINS)} or "
                             "`module:function`.")
    return out


def _import(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name.strip()), attr.strip())
    except (ImportError, AttributeError) as e:
        raise ValueError(f"`rewards`: cannot import {spec!r} ({e}); give `module:function` of an importable "
                         "module.") from e
    if not callable(fn):
        raise ValueError(f"`rewards`: {spec!r} is not callable.")
    return fn


class RewardRecorder:
    """Wraps reward functions to keep what they scored, for a per-step MLflow table of sampled completions.

    TRL sends its completions table only to W&B and Trackio; recording at the reward call keeps us on its
    public reward-function contract. Every function is called once per generation batch with the same
    prompts and completions, so the columns line up.
    """

    def __init__(self, funcs: list[RewardFn]):
        self.names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
        self.funcs = [self._wrap(f, n) for f, n in zip(funcs, self.names, strict=True)]
        self._rows: dict[str, list] = {}

    def _wrap(self, fn: RewardFn, name: str) -> RewardFn:
        def recorded(prompts, completions, **kwargs):
            rewards = fn(prompts=prompts, completions=completions, **kwargs)
            if name == self.names[0]:
                self._rows.setdefault("prompt", []).extend(text_of(p) for p in prompts)
                self._rows.setdefault("completion", []).extend(text_of(c) for c in completions)
            self._rows.setdefault(name, []).extend(float("nan") if r is None else float(r) for r in rewards)
            return rewards

        return _named(recorded, name)

    def take(self, step: int) -> list[dict[str, Any]]:
        """The rows scored since the last call (at most TABLE_ROWS_PER_STEP), each with ``step``."""
        rows, self._rows = self._rows, {}
        n = min(len(rows.get("prompt", [])), *(len(rows.get(k, [])) for k in self.names))
        return [{"step": step, **{k: v[i] for k, v in rows.items()}} for i in range(min(n, TABLE_ROWS_PER_STEP))]
