"""Link metrics a run already holds to an MLflow 3 LoggedModel (``log_metric(model_id=...)``).

A metric point is identified in a run by (key, value, step, timestamp), and MLflow's stores ignore a point
they already hold. So a point re-sent with its own timestamp and a ``model_id`` adds the link (the model's
metrics, ``search_logged_models`` ordering, the UI's model page) and no second row to the run's history.

Example:
    >>> link_run_metrics(client, run_id, model_id, step=20)     # doctest: +SKIP
    {'loss': 1.93, 'eval_loss': 2.01}
"""

from __future__ import annotations

from collections.abc import Iterable


def link_run_metrics(client, run_id: str, model_id: str, *, keys: Iterable[str] | None = None,
                     step: int | None = None) -> dict[str, float]:
    """Link the run's points of ``keys`` (default: every metric of the run) at ``step`` (default: each
    key's latest point) to ``model_id``; returns the values linked."""
    from mlflow.entities import Metric

    run = client.get_run(run_id)
    names = list(keys) if keys is not None else list(run.data.metrics)
    points = []
    for key in names:
        history = client.get_metric_history(run_id, key)
        if step is not None:
            history = [m for m in history if m.step == step]
        if not history:
            continue
        m = max(history, key=lambda p: (p.step, p.timestamp))
        points.append(Metric(key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id))
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])
    return {p.key: p.value for p in points}
