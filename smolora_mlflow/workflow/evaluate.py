"""Evaluate a model and record it in an MLflow run: eval loss, perplexity, sample generations, the dataset.

Example:
    >>> result = evaluate_run("models:/reviews/1", SmoloraConfig.from_yaml("configs/demo.yaml"))  # doctest: +SKIP
    >>> result.metrics["eval_loss"]                                                             # doctest: +SKIP
    2.1
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.tracking.record import prompt_tags
from smolora_mlflow.workflow import task_eval
from smolora_mlflow.workflow.runs import step_run


@dataclass
class EvalResult:
    """What an evaluation measured, and the run that records it."""

    run_id: str | None
    metrics: dict[str, float]
    generations: list[dict[str, str]] = field(default_factory=list)
    split: str = ""


def evaluate_run(model_ref: str | os.PathLike | None, cfg: SmoloraConfig, *, dataset: Any = None,
                 loaded: Any = None, prepared: Any = None, run_name: str | None = None,
                 model_id: str | None = None, base: Any = None) -> EvalResult:
    """Evaluate a model and record it in an MLflow run (nested when a run is active).

    Args:
        model_ref: a run id, ``runs:/``/``models:/`` URI or a local model folder (see
            :func:`smolora_mlflow.evaluation.loading.load_for_inference`); None with ``loaded``.
        cfg: which dataset, split, ``max_length``, batch size and sample prompts to use.
        dataset: score all rows of this dataset (a path or an in-memory dataset) instead of the held-out
            split of ``cfg.dataset``.
        loaded: an :class:`~smolora_mlflow.evaluation.loading.LoadedModel` already in memory.
        prepared: the training's :class:`~smolora_mlflow.data.PreparedData` of ``cfg``, so its held-out split
            is not prepared again.
        run_name: name of the evaluation run.
        model_id: the LoggedModel the metrics are linked to (default: the one ``model_ref`` names).
        base: the base model already in memory, for ``task_eval`` (default: loaded from ``cfg.base_model``).

    With ``cfg.task_eval`` the fine-tuned and the base model also answer the eval prompts, and
    ``exact_match``, ``contains_answer``, ``regex_match``, ``answer_length`` (and their ``base_`` twins) are
    logged, with a side-by-side table (see :mod:`smolora_mlflow.workflow.task_eval`).

    Returns:
        The metrics (``eval_loss``, ``eval_perplexity``, ``eval_tokens``, ``eval_rows``, task metrics), the
        sample generations and the run id (None when ``cfg.tracking`` is off).
    """
    from smolora_mlflow.evaluation import eval_split
    from smolora_mlflow.evaluation.loading import load_for_inference

    split = eval_split(cfg, dataset, prepared=prepared)  # data problems surface before a model loads or a run
    loaded = loaded or load_for_inference(model_ref, device=cfg.device, hub_kernels=cfg.hub_kernels)
    source = str(model_ref) if model_ref is not None else loaded.source
    cfg = cfg.replace(prompt_format=task_eval.resolved_prompt_format(cfg, loaded.tokenizer))
    if not cfg.tracking:
        metrics, gens = _measure(loaded, split, cfg)
        if cfg.task_eval:
            metrics.update(task_eval.measure_task(loaded, split, cfg, base or task_eval.load_base(cfg))[0])
        return EvalResult(None, metrics, gens, split.description)
    import mlflow

    from smolora_mlflow.data import mlflow_dataset
    from smolora_mlflow.evaluation.loading import model_id_of

    if model_id is None and model_ref is not None:
        model_id = model_id_of(model_ref)

    with step_run(cfg, run_name or f"evaluate-{Path(source.rstrip('/')).name[:40]}", "evaluate") as run_id:
        mlflow.set_tags({C.TAG_EVALUATED_MODEL: source, C.TAG_EVAL_SPLIT: split.description,
                         C.TAG_DATASET: split.data.source, C.TAG_DATASET_FINGERPRINT: split.data.fingerprint,
                         **prompt_tags(cfg.prompt_format, loaded.tokenizer)})
        _log_new_params(run_id, {"max_length": cfg.max_length, "eval_batch_size": cfg.per_device_train_batch_size,
                                 "sample_max_new_tokens": cfg.sample_max_new_tokens,
                                 "prompt_format": cfg.prompt_format})
        mlflow.log_input(mlflow_dataset(split.dataset, source=split.data.source, name=split.data.name),
                         context="evaluation")
        metrics, gens = _measure(loaded, split, cfg)
        mlflow.log_metrics(metrics, model_id=model_id)
        if cfg.task_eval:
            _log_new_params(run_id, {"task_max_rows": cfg.task_max_rows,
                                     "task_max_new_tokens": cfg.task_max_new_tokens,
                                     "task_answer_regex": cfg.task_answer_regex})
            metrics.update(task_eval.run_task_eval(loaded, split, cfg, base=base, model_id=model_id))
        if gens:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(gens), artifact_file=C.ARTIFACT_GENERATIONS)
    return EvalResult(run_id, metrics, gens, split.description)


def _log_new_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params the run does not hold yet (`mlflow run -P` may have logged some with its own spelling)."""
    import mlflow

    held = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in held})


def _measure(loaded, split, cfg: SmoloraConfig) -> tuple[dict[str, float], list[dict[str, str]]]:
    from smolora_mlflow import evaluation as ev

    metrics = ev.eval_loss(loaded.model, loaded.tokenizer, split.rows, split.format, max_length=cfg.max_length,
                           batch_size=cfg.per_device_train_batch_size, prompt_format=cfg.prompt_format)
    gens = ev.sample_generations(loaded.model, loaded.tokenizer, cfg.sample_prompts, cfg.sample_max_new_tokens,
                                 cfg.prompt_format)
    return metrics, gens
