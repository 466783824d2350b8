"""Compare smolora runs in a notebook: runs as DataFrames, metric histories, plots, generations side by side.

Reads the tracking store only (mlflow and pandas; matplotlib inside the plot functions; never torch), so it
works on runs trained anywhere. Every function takes an optional ``client`` (an ``MlflowClient``) or
``tracking_uri``; without them it uses MLflow's current URI. Runs are labelled by the params that differ
between them (``lora_r=8``), so legends and columns say what changed.

The tables (runs, histories, param diffs, labels, generations, the best run) are in
:mod:`~smolora_mlflow.compare.runs`, the plots in :mod:`~smolora_mlflow.compare.plots` and a sweep's trials in
:mod:`~smolora_mlflow.compare.sweeps`.

Example:
    >>> from smolora_mlflow import compare
    >>> table = compare.runs_frame("smolora")                          # doctest: +SKIP
    >>> ids = table["run_id"].tolist()                                 # doctest: +SKIP
    >>> compare.plot_loss_curves(ids)                                  # doctest: +SKIP
    >>> compare.best_run("smolora", metric="eval_loss")["run_id"]      # doctest: +SKIP
"""

from __future__ import annotations

from smolora_mlflow.compare.plots import plot_loss_curves, plot_loss_vs_trainable
from smolora_mlflow.compare.runs import (
    BOOKKEEPING_PARAMS,
    KEY_METRICS,
    KEY_PARAMS,
    RUN_METRICS,
    best_run,
    generations,
    metric_history,
    param_diff,
    run_labels,
    runs_frame,
)
from smolora_mlflow.compare.sweeps import sweep_trials

__all__ = [
    "BOOKKEEPING_PARAMS", "KEY_METRICS", "KEY_PARAMS", "RUN_METRICS",
    "best_run", "generations", "metric_history", "param_diff", "plot_loss_curves", "plot_loss_vs_trainable",
    "run_labels", "runs_frame", "sweep_trials",
]
