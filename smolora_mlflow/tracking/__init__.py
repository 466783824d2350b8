"""What a training run records in MLflow, and how.

:mod:`~smolora_mlflow.tracking.tracker` (``RunTracker``: start/attach, finish, fail), the Trainer callback
(:mod:`~smolora_mlflow.tracking.callback`), what is logged (:mod:`~smolora_mlflow.tracking.record`), the
metric outbox that survives a tracking outage (:mod:`~smolora_mlflow.tracking.outbox`), MLflow's fluent run
state (:mod:`~smolora_mlflow.tracking.fluent_run`), the tracker that logs nothing
(:mod:`~smolora_mlflow.tracking.null_tracker`) and experiments.
"""

from __future__ import annotations

from smolora_mlflow.redaction import redact
from smolora_mlflow.tracking.null_tracker import NullTracker
from smolora_mlflow.tracking.record import git_commit
from smolora_mlflow.tracking.tracker import (
    RunTracker,
    checkpoint_dir_of_run,
    is_main_process,
    make_tracker,
)

__all__ = [
    "NullTracker", "RunTracker", "checkpoint_dir_of_run", "git_commit",
    "is_main_process", "make_tracker", "redact",
]
