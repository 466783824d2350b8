"""Task evaluation: generate answers to held-out prompts and score them against the expected completions.

Rule-based scores, no judge model, all offline: ``exact_match`` (normalised answer equals the expected
one), ``contains_answer`` (the expected answer appears in the generated one), ``regex_match`` (the answer
matches ``task_answer_regex``, where ``{answer}`` stands for the escaped expected answer) and
``answer_length`` (characters). The same functions are MLflow GenAI scorers (:func:`genai_scorers`), so
``mlflow.genai.evaluate`` records per-row assessments that agree with the metrics logged here.

Example:
    >>> score_answers(["Paris."], ["paris"], None)["metrics"]
    {'exact_match': 1.0, 'contains_answer': 1.0, 'answer_length': 6.0}
"""

from __future__ import annotations

import re
import string
from typing import Any

from smolora_mlflow import constants as C

_PUNCT = re.escape(string.punctuation)
_EDGE_PUNCT = re.compile(rf"^[{_PUNCT}\s]+|[{_PUNCT}\s]+$")


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, punctuation at both ends dropped (SQuAD-like, kept simple)."""
    return _EDGE_PUNCT.sub("", " ".join(str(text).split()).lower())


def exact_match(output: str, expected: str) -> bool:
    return normalize(output) == normalize(expected)


def contains_answer(output: str, expected: str) -> bool:
    wanted = normalize(expected)
    return bool(wanted) and wanted in normalize(output)


def regex_match(output: str, expected: str, pattern: str) -> bool:
    return re.search(pattern.replace("{answer}", re.escape(expected.strip())), output, re.IGNORECASE) is not None


def answer_length(output: str) -> int:
    return len(output.strip())


def task_rows(rows: list[dict[str, Any]], fmt: str, max_rows: int) -> list[dict[str, str]]:
    """``{"prompt", "expected"}`` pairs of a prompt/completion split (or of chats: last user turn -> reply).

    Raises:
        ValueError: a text-format split, which has no expected answers.
    """
    out: list[dict[str, str]] = []
    for row in rows[:max_rows]:
        if fmt == "prompt_completion":
            out.append({"prompt": row["prompt"], "expected": row["completion"]})
        elif fmt == "chat":
            msgs = row["messages"]
            if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
                out.append({"prompt": msgs[-2]["content"], "expected": msgs[-1]["content"]})
        else:
            raise ValueError(f"`task_eval` needs prompt/completion or chat rows with expected answers; the "
                             f"eval data is {fmt!r}. Turn `task_eval` off or pass prompt/completion data.")
    if not out:
        raise ValueError("`task_eval` found no rows with an expected answer (chats must end user -> assistant).")
    return out


def score_answers(outputs: list[str], expected: list[str], pattern: str | None) -> dict[str, Any]:
    """Per-row scores and their means.

    Returns:
        ``{"rows": [{exact_match, contains_answer, [regex_match], answer_length}, ...], "metrics": {...}}``.
    """
    rows = []
    for out, want in zip(outputs, expected, strict=True):
        row: dict[str, Any] = {C.METRIC_EXACT_MATCH: float(exact_match(out, want)),
                               C.METRIC_CONTAINS_ANSWER: float(contains_answer(out, want))}
        if pattern:
            row[C.METRIC_REGEX_MATCH] = float(regex_match(out, want, pattern))
        row[C.METRIC_ANSWER_LENGTH] = float(answer_length(out))
        rows.append(row)
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}
    return {"rows": rows, "metrics": metrics}


def generate_answers(model, tokenizer, prompts: list[str], *, prompt_format: str, max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers, each prompt rendered as in training (through the chat template when ``chat``)."""
    from smolora_mlflow.models.generation import generate, render_prompts

    return generate(model, tokenizer, render_prompts(tokenizer, prompts, prompt_format), batch_size=batch_size,
                    max_new_tokens=max_new_tokens)


def genai_scorers(pattern: str | None) -> list:
    """The scores above as ``mlflow.genai`` rule-based scorers (``@scorer``; no LLM judge is called)."""
    from mlflow.genai.scorers import scorer

    def _want(expectations: dict[str, Any]) -> str:
        return str(expectations["expected_response"])

    @scorer(name=C.METRIC_EXACT_MATCH)
    def _exact(outputs: str, expectations: dict[str, Any]) -> bool:
        return exact_match(outputs, _want(expectations))

    @scorer(name=C.METRIC_CONTAINS_ANSWER)
    def _contains(outputs: str, expectations: dict[str, Any]) -> bool:
        return contains_answer(outputs, _want(expectations))

    @scorer(name=C.METRIC_ANSWER_LENGTH)
    def _length(outputs: str) -> int:
        return answer_length(outputs)

    found = [_exact, _contains, _length]
    if pattern:
        @scorer(name=C.METRIC_REGEX_MATCH)
        def _regex(outputs: str, expectations: dict[str, Any]) -> bool:
            return regex_match(outputs, _want(expectations), pattern)

        found.append(_regex)
    return found
