"""Turn what a pyfunc caller sends into prompts and generation params, or say exactly what is wrong.

Every problem raises ``MlflowException.invalid_parameter_value`` (HTTP 400 from a scoring server)
naming the field, the value and what is allowed.

Accepted inputs: a DataFrame (or dict of lists, or list of records) with a ``prompt`` column; a
``str``; a ``list[str]``; chat messages (a list of ``{"role", "content"}`` dicts, or a ``prompt`` cell
holding such a list) when the tokenizer has a chat template. A ``prompt`` cell holding a list of
strings expands to one row per string (MLflow's schema enforcement turns ``{"prompt": [...]}`` into a
single row holding the list).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from smolora_mlflow.errors import invalid_input
from smolora_mlflow.models.generation import GENERATION_DEFAULTS, GENERATION_PARAMS, MIN_TEMPERATURE, format_chat

try:  # what a chat template's raise_exception raises (e.g. "roles must alternate"): the caller's mistake
    from jinja2 import TemplateError
except ImportError:  # no jinja2, no chat templates: transformers says so with an ImportError of its own
    TemplateError = ValueError

PROMPT_COLUMN = "prompt"
OUTPUT_COLUMN = "generated_text"
PARAM_TYPES: dict[str, type] = {name: tp for name, (tp, _) in GENERATION_PARAMS.items()}
_TYPE_TEXT = {int: "an integer", float: "a number", bool: "true or false"}



# ----------------------------------------------------------------------------------------------------
# params


def _coerce(value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError
    if tp is int:
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise TypeError
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise TypeError
    return value


def _range_problems(p: dict[str, Any], max_new_tokens_limit: int) -> list[str]:
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("max_new_tokens", lambda v: 1 <= v <= max_new_tokens_limit, f"in 1..{max_new_tokens_limit}"),
        ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("top_k", lambda v: v >= 0, ">= 0"),
        ("repetition_penalty", lambda v: v > 0, "> 0"),
        ("seed", lambda v: -1 <= v < 2**63, "in 0..2**63-1, or -1 for no seed"),
    ]
    problems = [f"`{k}` must be {text}, got {p[k]!r}." for k, ok, text in checks if k in p and not ok(p[k])]
    if p.get("do_sample") and "temperature" in p and p["temperature"] < MIN_TEMPERATURE:
        problems.append(
            f"`temperature` must be >= {MIN_TEMPERATURE} when `do_sample` is true, got {p['temperature']!r}; "
            "use do_sample=false for greedy decoding."
        )
    return problems


def validate_params(
    params: Mapping[str, Any] | None, defaults: Mapping[str, Any], max_new_tokens_limit: int
) -> dict[str, Any]:
    """Merge ``params`` over ``defaults`` and check names, types and ranges; all problems at once."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise invalid_input(f"`params` must be a dict of generation parameters, got {type(params).__name__}.")
    problems = []
    unknown = sorted(str(k) for k in params if k not in PARAM_TYPES)
    if unknown:
        problems.append(f"unknown parameter(s) {unknown}; allowed: {sorted(PARAM_TYPES)}.")
    merged = {**GENERATION_DEFAULTS, **defaults, **{k: v for k, v in params.items() if k in PARAM_TYPES}}
    typed: dict[str, Any] = {}
    for key, tp in PARAM_TYPES.items():
        try:
            typed[key] = _coerce(merged[key], tp)
        except TypeError:
            problems.append(f"`{key}` must be {_TYPE_TEXT[tp]}, got {merged[key]!r}.")
    problems += _range_problems(typed, max_new_tokens_limit)
    if problems:
        raise invalid_input("Invalid generation parameters: " + " ".join(problems))
    return typed


# ----------------------------------------------------------------------------------------------------
# inputs


def _is_message(x: Any) -> bool:
    return isinstance(x, Mapping) and "role" in x and "content" in x


def _is_conversation(x: Any) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) and len(x) > 0 and all(_is_message(m) for m in x)


def _chat(tokenizer, messages: Any, where: str, chat: bool = True) -> str:
    """Chat messages as the model was trained to read them: through the chat template for a ``chat`` model;
    for a ``plain`` one, a lone user message is its text (a plain prompt, as training rendered prompts), and
    anything more is refused, since no rendering of a conversation is what the model learned."""
    messages = [dict(m) for m in messages]
    if not chat:
        if len(messages) == 1 and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str):
            if not messages[0]["content"].strip():
                raise invalid_input(f"{where}: the user message is empty; every prompt must contain text.")
            return messages[0]["content"]
        roles = [m.get("role") for m in messages]
        _check_unicode([str(r) for r in roles])  # a role no text can hold is that mistake, said first
        raise invalid_input(
            f"{where}: this model was trained on plain prompts (prompt_format: plain), not chat turns, so a "
            f"conversation of {len(messages)} messages (roles {roles}) has no rendering it was trained on. Send "
            "the prompt text itself (to /v1/completions, or as a `prompt` string), or a single user message.")
    try:
        return format_chat(tokenizer, messages)
    except (ValueError, TemplateError) as e:
        raise invalid_input(f"{where}: {e}") from e


def _check_unicode(prompts: list[str]) -> None:
    """A lone surrogate (``"\\ud800"`` from JSON, or Python) is text no tokenizer can encode: a 400, not a
    TypeError deep in the tokenizer."""
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise invalid_input(f"Prompt {i} holds a lone surrogate (U+{ord(p[e.start]):04X}) at character {e.start}; "
                                "send valid Unicode text.") from None


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _cell_prompts(cell: Any, tokenizer, where: str, chat: bool = False) -> list[str]:
    if isinstance(cell, str):
        if not cell.strip():
            raise invalid_input(f"{where} is an empty string; every prompt must contain text.")
        # A model trained on chat-rendered prompts gets plain prompts as a user turn, as in training.
        return [_chat(tokenizer, [{"role": "user", "content": cell.strip()}], where)] if chat else [cell]
    if _is_conversation(cell):
        return [_chat(tokenizer, cell, where, chat)]
    if isinstance(cell, (list, tuple, np.ndarray)) and len(cell) > 0 and not _is_message(cell[0]):
        out: list[str] = []
        for j, item in enumerate(cell):
            if not isinstance(item, str):
                raise invalid_input(f"{where}[{j}] must be a string, got {type(item).__name__} {item!r}.")
            out += _cell_prompts(item, tokenizer, f"{where}[{j}]", chat)
        return out
    if _is_missing(cell):
        raise invalid_input(f"{where} is missing (null); every prompt must be a non-empty string.")
    raise invalid_input(
        f"{where} must be a string or a list of chat messages, got {type(cell).__name__} {cell!r}."
    )


def _frame_prompts(df: pd.DataFrame, tokenizer, chat: bool = False) -> list[str]:
    if PROMPT_COLUMN not in df.columns:
        if {"role", "content"} <= set(df.columns):  # a message list that was turned into a frame
            return [_chat(tokenizer, df.to_dict(orient="records"), "messages", chat)]
        raise invalid_input(
            f"The input has no `{PROMPT_COLUMN}` column; it has columns {[str(c) for c in df.columns]}. "
            f"Send a `{PROMPT_COLUMN}` column of strings."
        )
    out: list[str] = []
    for i, cell in enumerate(df[PROMPT_COLUMN].tolist()):
        out += _cell_prompts(cell, tokenizer, f"`{PROMPT_COLUMN}` at row {i}", chat)
    return out


def to_prompts(model_input: Any, tokenizer, prompt_format: str = "plain") -> list[str]:
    """Normalise any accepted input to a non-empty list of prompt strings (chat already formatted).

    Prompts reach the model as its training rendered them. With ``prompt_format="chat"`` (a model trained on
    chat-rendered prompts) plain string prompts are rendered with the chat template as a user turn too; with
    ``plain``, chat messages are a lone user message's text, and a longer conversation is refused.
    """
    chat = prompt_format == "chat"
    x = model_input
    if isinstance(x, pd.Series):
        x = x.to_frame(PROMPT_COLUMN if x.name in (None, 0) else x.name)
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, str):
        prompts = _cell_prompts(x, tokenizer, "the prompt", chat)
    elif isinstance(x, pd.DataFrame):
        prompts = _frame_prompts(x, tokenizer, chat)
    elif isinstance(x, Mapping):
        if PROMPT_COLUMN in x:
            prompts = _cell_prompts(_unwrap(x[PROMPT_COLUMN]), tokenizer, f"`{PROMPT_COLUMN}`", chat)
        elif "messages" in x:
            prompts = _cell_prompts(_unwrap(x["messages"]), tokenizer, "`messages`", chat)
        else:
            raise invalid_input(
                f"The input has no `{PROMPT_COLUMN}` key; it has keys {[str(k) for k in x]}. "
                f"Send {{'{PROMPT_COLUMN}': [...]}}."
            )
    elif isinstance(x, (list, tuple)):
        prompts = _list_prompts(list(x), tokenizer, chat)
    else:
        raise invalid_input(
            f"Unsupported input type {type(model_input).__name__}; send a DataFrame with a "
            f"`{PROMPT_COLUMN}` column, a string, a list of strings or a list of chat messages."
        )
    if not prompts:
        raise invalid_input("The input holds no prompts; send at least one.")
    _check_unicode(prompts)
    return prompts


def _unwrap(value: Any) -> Any:
    return value.tolist() if isinstance(value, (np.ndarray, pd.Series)) else value


def _list_prompts(items: list[Any], tokenizer, chat: bool = False) -> list[str]:
    if not items:
        raise invalid_input("The input holds no prompts; send at least one.")
    if _is_conversation(items):
        return [_chat(tokenizer, items, "messages", chat)]
    if all(isinstance(r, Mapping) for r in items):  # records
        return _frame_prompts(pd.DataFrame(items), tokenizer, chat)
    out: list[str] = []
    for i, item in enumerate(items):
        out += _cell_prompts(item, tokenizer, f"prompt {i}", chat)
    return out


def check_request_size(prompts: list[str], max_prompts: int, max_chars: int) -> None:
    """One request must not be able to exhaust memory or hold the model for minutes."""
    if len(prompts) > max_prompts:
        raise invalid_input(f"The request holds {len(prompts)} prompts, more than max_prompts_per_request "
                       f"({max_prompts}); split it into smaller requests.")
    for i, p in enumerate(prompts):
        if len(p) > max_chars:
            raise invalid_input(f"Prompt {i} has {len(p):,} characters, more than max_prompt_chars ({max_chars:,}); "
                           "shorten it.")


def check_prompt_lengths(lengths: list[int], max_new_tokens: int, max_prompt_tokens: int | None,
                         context_length: int | None) -> None:
    """Each prompt's token count against the model's prompt limit and its context (with the new tokens)."""
    for i, n in enumerate(lengths):
        if max_prompt_tokens and n > max_prompt_tokens:
            raise invalid_input(f"Prompt {i} has {n} tokens, more than this model's max_prompt_tokens "
                           f"({max_prompt_tokens}); shorten it.")
        if context_length and n + max_new_tokens > context_length:
            raise invalid_input(f"Prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                           f"model's context of {context_length} tokens. Shorten the prompt or lower max_new_tokens.")
