"""Plots of smolora runs: loss curves per step, and final loss against adapter size.

matplotlib is imported inside the plot functions (a ``Figure``, not pyplot: no global state), so importing
:mod:`smolora_mlflow.compare` stays light.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mlflow import MlflowClient

from smolora_mlflow import constants as C
from smolora_mlflow.compare.runs import history_frame, labels_by_run, no_metric_error, open_runs


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure  # not pyplot: no global state, and a notebook shows the figure once

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def plot_loss_curves(run_ids: str | Iterable[str], key: str = C.METRIC_LOSS, *, ax: Any = None,
                     title: str | None = None, client: MlflowClient | None = None,
                     tracking_uri: str | None = None):
    """One line per run of metric ``key`` against step, labelled by the params that differ.

    Args:
        run_ids: the runs to draw.
        key: the metric, e.g. ``loss`` or ``eval_loss``.
        ax: draw on this matplotlib Axes instead of a new figure.
        title: figure title (default: ``"<key> per step"``).
        client, tracking_uri: where the runs are.

    Returns:
        A matplotlib Figure (shown inline in a notebook; elsewhere ``fig.savefig("loss.png")``).

    Example:
        >>> fig = plot_loss_curves(ids, key="eval_loss")  # doctest: +SKIP
    """
    client, runs = open_runs(run_ids, client, tracking_uri)
    history, labels = history_frame(client, runs, key), labels_by_run(runs)
    fig, ax = _axes(ax, (7, 4))
    for run in runs:
        part = history[history["run_id"] == run.info.run_id]
        if not part.empty:
            ax.plot(part["step"], part["value"], marker="o", markersize=3, label=labels[run.info.run_id])
    ax.set(xlabel="step", ylabel=key, title=title or f"{key} per step")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_loss_vs_trainable(run_ids: str | Iterable[str], metric: str = C.METRIC_LOSS, *, ax: Any = None,
                           title: str | None = None, client: MlflowClient | None = None,
                           tracking_uri: str | None = None):
    """Final ``metric`` against the number of trainable parameters, one labelled point per run.

    Answers "does a bigger adapter buy a lower loss?". The x axis is logarithmic when the counts span more
    than a factor of ten.

    Example:
        >>> fig = plot_loss_vs_trainable(ids, metric="eval_loss")  # doctest: +SKIP
    """
    client, runs = open_runs(run_ids, client, tracking_uri)
    labels = labels_by_run(runs)
    for key in (metric, C.METRIC_TRAINABLE_PARAMS):
        lacking = [r.info.run_id for r in runs if key not in r.data.metrics]
        if lacking:
            raise no_metric_error(runs, key, f"Run(s) {lacking} never")
    xs = [r.data.metrics[C.METRIC_TRAINABLE_PARAMS] for r in runs]
    ys = [r.data.metrics[metric] for r in runs]
    fig, ax = _axes(ax, (6, 4))
    ax.plot(xs, ys, "o")
    for run, x, y in zip(runs, xs, ys, strict=True):
        ax.annotate(labels[run.info.run_id], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.set(xlabel="trainable parameters", ylabel=f"final {metric}", title=title or f"final {metric} vs adapter size")
    ax.grid(alpha=0.3)
    return fig
