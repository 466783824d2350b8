"""Find prompts of the wrong JSON type in a scoring request, before MLflow turns them into strings.

MLflow's scoring server parses ``{"inputs": ...}`` and ``{"instances": ...}`` against the model's
signature (``prompt``: string) and casts every value to ``str`` on the way, so ``null`` reaches the
model as ``"None"`` and ``7`` as ``"7"``, and would be answered with generated text. Here the JSON
types are still there: a prompt that is ``null``, a number or a boolean is named by its row, in every
payload form (``dataframe_records``, ``dataframe_split``, ``inputs``, ``instances`` and the unified
``{"prompt": ...}``). In ``inputs`` and ``instances`` (MLflow's tensor forms) an object is refused too,
chat messages included: MLflow casts it to its Python ``str`` (``"{'a': 1}"``), which the model would
complete; chat messages go in ``dataframe_records`` or to ``/v1/chat/completions``. Everything else is
left to the flavor, which checks the rest (empty strings, chat messages, lengths).
"""

from __future__ import annotations

import json
from typing import Any

PROMPT = "prompt"


def _kind(value: Any, objects: bool = False) -> str | None:
    """What is wrong with ``value`` as a prompt's JSON type; ``objects``: an object is wrong too."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({json.dumps(value)})"
    if objects and isinstance(value, dict):
        return ("an object, which MLflow's inputs/instances forms turn into its Python text; send chat messages "
                "as dataframe_records or to /v1/chat/completions")
    return None


def _cell(value: Any, where: str, objects: bool = False) -> str | None:
    if isinstance(value, list):  # a list of prompts in one cell expands to rows (depth is bounded by the guard)
        return next((p for j, item in enumerate(value) if (p := _cell(item, f"{where}[{j}]", objects))), None)
    return _cell_scalar(value, where, objects)


def _cell_scalar(value: Any, where: str, objects: bool = False) -> str | None:
    kind = _kind(value, objects)
    return None if kind is None else f"{where} must be a string or a list of chat messages, got {kind}."


def _rows(values: Any, objects: bool = False) -> str | None:
    """A column of prompts (one per row) or a single prompt."""
    if isinstance(values, list):
        return next((p for i, v in enumerate(values) if (p := _cell(v, f"`{PROMPT}` at row {i}", objects))), None)
    return _cell(values, f"`{PROMPT}` at row 0", objects)


def _records(rows: Any, objects: bool = False) -> str | None:
    if not isinstance(rows, list):
        return None
    for i, row in enumerate(rows):
        if isinstance(row, dict) and PROMPT in row:
            if problem := _cell(row[PROMPT], f"`{PROMPT}` at row {i}", objects):
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
        return _rows(value[PROMPT], objects=True) if PROMPT in value else None
    return _records(value, objects=True)


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
