"""The one place that chains train -> merge -> evaluate -> log -> register -> promote.

:mod:`~smolora_mlflow.workflow.pipeline` runs the whole chain, :mod:`~smolora_mlflow.workflow.evaluate` the
evaluation step, :mod:`~smolora_mlflow.workflow.sweep` hyperparameter sweeps.
"""

from __future__ import annotations

from smolora_mlflow.train.publish import log_trained_model
from smolora_mlflow.workflow.evaluate import EvalResult, evaluate_run
from smolora_mlflow.workflow.pipeline import PipelineResult, check_pipeline_config, run_pipeline
from smolora_mlflow.workflow.runs import step_run

__all__ = [
    "EvalResult", "PipelineResult", "check_pipeline_config", "evaluate_run",
    "log_trained_model", "run_pipeline", "step_run",
]
