"""Find prompts of the wrong JSON type in a scoring request, before MLflow turns them into strings.

MLflow's scoring server parses ``{"inputs": ...}`` and ``{"instances": ...}`` against the model's
signature (``prompt``: string) and casts every value to ``str`` on the way, so ``null`` reaches the
model as ``"None"`` and ``7`` as ``"7"``, and would be answered with generated text. Here the JSON
types are still there: a prompt that is ``null``, a number or a boolean is named by its row, in every
payload form (``dataframe_records``, ``dataframe_split``, ``inputs``, ``instances`` and the unified
``{"prompt": ...}``). Everything else is left to the flavor, which checks the rest (empty strings,
chat messages, lengths).
"""

from __future__ import annotations

import json
from typing import Any

PROMPT = "prompt"


def _kind(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({json.dumps(value)})"
    return None


def _cell(value: Any, where: str) -> str | None:
    kind = _kind(value)
    if kind is None and isinstance(value, list):  # a list of prompts in one cell expands to rows
        return next((p for j, item in enumerate(value) if (p := _cell_scalar(item, f"{where}[{j}]"))), None)
    return _cell_scalar(value, where)


def _cell_scalar(value: Any, where: str) -> str | None:
    kind = _kind(value)
    return None if kind is None else f"{where} must be a string or a list of chat messages, got {kind}."


def _rows(values: Any) -> str | None:
    """A column of prompts (one per row) or a single prompt."""
    if isinstance(values, list):
        return next((p for i, v in enumerate(values) if (p := _cell(v, f"`{PROMPT}` at row {i}"))), None)
    return _cell(values, f"`{PROMPT}` at row 0")


def _records(rows: Any) -> str | None:
    if not isinstance(rows, list):
        return None
    for i, row in enumerate(rows):
        if isinstance(row, dict) and PROMPT in row:
            if problem := _cell(row[PROMPT], f"`{PROMPT}` at row {i}"):
                return problem
        elif not isinstance(row, (dict, list)) and (problem := _cell(row, f"`{PROMPT}` at row {i}")):
            return problem
    return None


def _split(frame: Any) -> str | None:
    if not isinstance(frame, dict) or not isinstance(frame.get("data"), list):
        return None
    columns = frame.get("columns")
    index = columns.index(PROMPT) if isinstance(columns, list) and PROMPT in columns else None
    if index is None:
        return None
    for i, row in enumerate(frame["data"]):
        if isinstance(row, list) and len(row) > index and (problem := _cell(row[index], f"`{PROMPT}` at row {i}")):
            return problem
    return None


def _tensor_input(value: Any) -> str | None:
    if isinstance(value, dict):
        return _rows(value[PROMPT]) if PROMPT in value else None
    return _records(value)


def prompt_problem(document: Any) -> str | None:
    """A message naming the first prompt that is not a string or chat messages; None if there is none."""
    if not isinstance(document, dict):
        return None  # MLflow refuses it with its own message
    if "dataframe_records" in document:
        return _records(document["dataframe_records"])
    if "dataframe_split" in document:
        return _split(document["dataframe_split"])
    for key in ("inputs", "instances"):
        if key in document:
            return _tensor_input(document[key])
    if PROMPT in document:  # MLflow's unified LLM payload: {"prompt": ..., "max_new_tokens": ...}
        return _rows(document[PROMPT])
    return None
