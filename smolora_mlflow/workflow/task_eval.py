"""Task evaluation inside an evaluation run: the fine-tuned and the base model answer the same prompts.

Both models see each prompt as training rendered it (``prompt_format``), greedy, ``task_max_new_tokens``.
The run records: the metrics of :mod:`smolora_mlflow.evaluation.tasks` for the fine-tuned model and, with
the ``base_`` prefix, for its base (linked to the LoggedModel when the model has one); a side-by-side
table (``task_eval.json``: prompt, expected, both answers, per-row scores); and ``mlflow.genai.evaluate``'s
per-row assessments of the fine-tuned answers, from the same rule-based scorers.

Example:
    >>> run_task_eval(loaded, split, cfg, model_id="m-123")["exact_match"]  # doctest: +SKIP
    0.75
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig

logger = logging.getLogger(__name__)


def resolved_prompt_format(cfg: SmoloraConfig, tokenizer) -> str:
    from smolora_mlflow.models.generation import resolve_prompt_format

    return resolve_prompt_format(cfg.prompt_format, tokenizer, cfg.base_model)


def measure_task(loaded, split, cfg: SmoloraConfig, base=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answers and scores of the fine-tuned model (``loaded``) and of ``base``; no MLflow involved."""
    from smolora_mlflow.evaluation import tasks

    pairs = tasks.task_rows(split.rows, split.format, cfg.task_max_rows)
    prompts, expected = [p["prompt"] for p in pairs], [p["expected"] for p in pairs]
    fmt = resolved_prompt_format(cfg, loaded.tokenizer)
    options = {"prompt_format": fmt, "max_new_tokens": cfg.task_max_new_tokens,
               "batch_size": cfg.per_device_train_batch_size}
    answers = tasks.generate_answers(loaded.model, loaded.tokenizer, prompts, **options)
    tuned = tasks.score_answers(answers, expected, cfg.task_answer_regex)
    metrics = dict(tuned["metrics"])
    table = [{"prompt": p, "expected": e, "answer": a, **s}
             for p, e, a, s in zip(prompts, expected, answers, tuned["rows"], strict=True)]
    if base is not None:
        base_answers = tasks.generate_answers(base.model, base.tokenizer, prompts, **options)
        scored = tasks.score_answers(base_answers, expected, cfg.task_answer_regex)
        metrics.update({C.BASE_PREFIX + k: v for k, v in scored["metrics"].items()})
        for row, answer, s in zip(table, base_answers, scored["rows"], strict=True):
            row.update({"base_answer": answer, **{C.BASE_PREFIX + k: v for k, v in s.items()}})
    return metrics, table


def load_base(cfg: SmoloraConfig):
    """The base model of ``cfg`` (what the fine-tune started from), for the side-by-side scores."""
    from smolora_mlflow.evaluation.loading import load_for_inference

    return load_for_inference(cfg.base_model, device=cfg.device, hub_kernels=cfg.hub_kernels)


def run_task_eval(loaded, split, cfg: SmoloraConfig, *, base=None, model_id: str | None = None) -> dict[str, float]:
    """Score both models and record it all in the active run (and on ``model_id``); returns the metrics."""
    import mlflow
    import pandas as pd

    from smolora_mlflow.evaluation import tasks

    metrics, table = measure_task(loaded, split, cfg, base if base is not None else load_base(cfg))
    mlflow.log_metrics(metrics, model_id=model_id)
    mlflow.log_table(pd.DataFrame(table), artifact_file=C.ARTIFACT_TASK_EVAL)
    data = [{"inputs": {"prompt": r["prompt"]}, "outputs": r["answer"],
             "expectations": {"expected_response": r["expected"]}} for r in table]
    # MLflow prints a banner when an evaluation ends; the CLI's stdout is for results, so it goes to stderr.
    with contextlib.redirect_stdout(sys.stderr), _eval_workers_for_store(mlflow.get_tracking_uri()):
        mlflow.genai.evaluate(data=data, scorers=tasks.genai_scorers(cfg.task_answer_regex), model_id=model_id)
    return metrics


@contextlib.contextmanager
def _eval_workers_for_store(uri: str):
    """Fewer evaluation threads on a SQLite store (unless the user set MLFLOW_GENAI_EVAL_MAX_WORKERS).

    MLflow's default of 10 scoring threads, each writing a trace, next to its 10 trace-export threads,
    exhausts SQLAlchemy's pool of 15 connections to the SQLite file: trace writes then wait 30 s and fail.
    """
    key = "MLFLOW_GENAI_EVAL_MAX_WORKERS"
    if not uri.startswith("sqlite") or key in os.environ:
        yield
        return
    os.environ[key] = "2"
    try:
        yield
    finally:
        os.environ.pop(key, None)
