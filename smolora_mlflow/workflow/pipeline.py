"""The one place that chains train -> merge -> evaluate -> log -> register -> promote.

Every step is one call that hands a plain value (a folder, a URI, a run id, a version) to the next. The
pipeline runs under one parent MLflow run (the one ``mlflow run`` created, else a new one); training and
evaluation are its nested runs, the model is logged into the training run, and the parent records what
came out (model URI, registered version, promotion decision, metrics). No printing here: callers pass
``on_step`` to hear about progress.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> from smolora_mlflow.workflow import run_pipeline
    >>> cfg = SmoloraConfig.from_yaml("configs/demo.yaml", {"max_steps": 8})
    >>> result = run_pipeline(cfg, promote=True)                  # doctest: +SKIP
    >>> result.model_uri, result.registered_version, result.promoted  # doctest: +SKIP
    ('models:/m-3f2a...', '1', True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import ConfigError, SmoloraConfig
from smolora_mlflow.train.publish import log_trained_model
from smolora_mlflow.workflow.evaluate import evaluate_run
from smolora_mlflow.workflow.runs import step_run

logger = logging.getLogger(__name__)

StepCallback = Callable[[str], None]

__all__ = ["PipelineResult", "check_pipeline_config", "run_pipeline"]


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    parent_run_id: str | None
    train_run_id: str | None
    eval_run_id: str | None
    model_uri: str | None
    registered_model_name: str | None = None
    registered_version: str | None = None
    promotion: Any = None  # registry.PromotionDecision
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    merged_dir: Path | None = None

    @property
    def promoted(self) -> bool:
        return bool(self.promotion is not None and self.promotion.promoted)


def check_pipeline_config(cfg: SmoloraConfig, *, promote: bool = False) -> None:
    """Refuse a pipeline that cannot finish, before anything runs."""
    problems = []
    if not cfg.tracking:
        problems.append("`tracking` must be true for the pipeline: it logs and registers the model in MLflow.")
    if promote and not cfg.registered_model_name:
        problems.append("`promote` needs a `registered_model_name` to register the version it promotes.")
    if problems:
        raise ConfigError(problems)


def run_pipeline(cfg: SmoloraConfig, *, promote: bool = False, dataset: Any = None, eval_dataset: Any = None,
                 mode: str = "merged", promote_options: dict[str, Any] | None = None,
                 log_model_options: dict[str, Any] | None = None,
                 on_step: StepCallback | None = None) -> PipelineResult:
    """Train, merge, evaluate, log, register (when ``cfg.registered_model_name`` is set) and promote.

    Args:
        cfg: the run config.
        promote: promote the new version with the registry's metric gate.
        dataset: an in-memory training dataset that replaces ``cfg.dataset``.
        eval_dataset: evaluate on all rows of this dataset instead of the held-out split.
        mode: log the ``merged`` model or only the ``adapter``.
        promote_options: keyword arguments of :func:`smolora_mlflow.registry.promote` (``to``, ``metric``,
            ``min_delta``, ``higher_is_better``, ``force``, ``reason``).
        log_model_options: keyword arguments of :func:`log_trained_model` (e.g. ``pip_requirements``).
        on_step: called with a short message as each step starts.

    Returns:
        A :class:`PipelineResult`.
    """
    check_pipeline_config(cfg, promote=promote)
    say = on_step or (lambda msg: logger.info("%s", msg))
    with step_run(cfg, cfg.run_name or "pipeline", "pipeline") as parent_id:
        result = PipelineResult(parent_id, None, None, None, cfg.registered_model_name)
        _pipeline_steps(cfg, result, promote=promote, dataset=dataset, eval_dataset=eval_dataset, mode=mode,
                        promote_options=promote_options or {}, log_model_options=log_model_options or {}, say=say)
    return result


def _pipeline_steps(cfg, result: PipelineResult, *, promote, dataset, eval_dataset, mode, promote_options,
                    log_model_options, say: StepCallback) -> None:
    import mlflow

    from smolora_mlflow.evaluation.loading import LoadedModel
    from smolora_mlflow.train import SmoLoRA

    mlflow.log_text(cfg.to_yaml(), C.ARTIFACT_CONFIG)
    say("train: fine-tuning the LoRA adapter")
    lora = SmoLoRA(dataset=dataset, config=cfg)
    trained = lora.train()
    result.train_run_id, result.adapter_dir = trained.run_id, trained.adapter_dir
    mlflow.set_tag(C.TAG_TRAIN_RUN_ID, trained.run_id)
    result.metrics.update({k: float(v) for k, v in trained.metrics.items() if k in ("train_loss", "train_runtime")})
    if mode == "merged":
        say("merge: merging the adapter into the base model")
        result.merged_dir = lora.save()
    say("evaluate: eval loss, perplexity and sample generations" + (
        ", task scores of the base and the fine-tuned model" if cfg.task_eval else ""))
    in_memory = LoadedModel(lora.model, lora.tokenizer, str(result.merged_dir or result.adapter_dir))
    evaluated = evaluate_run(None, lora.config, dataset=eval_dataset, loaded=in_memory, prepared=lora.data,
                             run_name="evaluate")
    result.eval_run_id = evaluated.run_id
    result.metrics.update(evaluated.metrics)
    mlflow.set_tag(C.TAG_EVAL_RUN_ID, evaluated.run_id)
    mlflow.log_metrics(result.metrics)
    name = cfg.registered_model_name
    say(f"log: logging the {mode} model with the smolora flavor" + (f" as a new version of {name}" if name else ""))
    # The version carries the metrics of this evaluation, so every version is gated on the same measure.
    gated = (C.METRIC_EVAL_LOSS, C.METRIC_EVAL_PERPLEXITY, *C.TASK_METRICS,
             *(C.BASE_PREFIX + m for m in C.TASK_METRICS))
    tags = {C.METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in evaluated.metrics.items() if k in gated}
    tags.update({C.TAG_EVAL_RUN_ID: evaluated.run_id or "", C.TAG_PIPELINE_RUN_ID: result.parent_run_id or ""})
    info = log_trained_model(lora, mode=mode, registered_model_name=name, registered_tags=tags, **log_model_options)
    result.model_uri = info.model_uri
    mlflow.set_tag(C.TAG_MODEL_URI, info.model_uri)
    if evaluated.run_id and info.model_id:  # the evaluation ran before the model existed: link it now
        from smolora_mlflow.tracking.linking import link_run_metrics

        link_run_metrics(mlflow.MlflowClient(), evaluated.run_id, info.model_id)
    if not name:
        return
    result.registered_version = str(info.registered_model_version)
    mlflow.set_tags({C.TAG_REGISTERED_MODEL: name, C.TAG_REGISTERED_VERSION: result.registered_version})
    if promote:
        _promote(cfg, result, promote_options, say)


def _promote(cfg, result: PipelineResult, promote_options: dict[str, Any], say: StepCallback) -> None:
    import mlflow

    from smolora_mlflow import registry

    options = {"to": "Production", **promote_options}
    say(f"promote: version {result.registered_version} to {options['to']} if it beats the current one")
    decision = registry.promote(cfg.registered_model_name, result.registered_version, **options)
    result.promotion = decision
    mlflow.set_tags({C.TAG_PROMOTION: "promoted" if decision.promoted else "rejected",
                     f"{C.TAG_PROMOTION}.reason": decision.reason[:5000]})
