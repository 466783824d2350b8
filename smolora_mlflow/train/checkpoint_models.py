"""Each kept checkpoint as an MLflow 3 LoggedModel: found, compared and registered from the UI or the API.

When a checkpoint is complete, its adapter is logged to the training run as a ``smolora`` flavor model in
adapter mode, named ``checkpoint-<step>``, with ``step`` set, and the metrics the run holds at that step
(loss, eval loss...) linked to it (``log_metric(model_id=...)``, without a second row in the run's history).
When training ends, the checkpoints are ranked on ``eval_loss`` (on ``loss`` unless every checkpoint has an
``eval_loss``, so two checkpoints are never ranked on different metrics): the
``save_total_limit`` best keep a rank tag, the best and the latest a role tag, and the others are deleted.

Example:
    >>> import mlflow
    >>> best = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'",   # doctest: +SKIP
    ...                                    order_by=[{"field_name": "metrics.eval_loss", "ascending": True}],
    ...                                    output_format="list")[0]
    >>> mlflow.register_model(f"models:/{best.model_id}", "reviews")                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C

logger = logging.getLogger(__name__)


class CheckpointModels:
    """Logs complete checkpoints as LoggedModels of one training run, and ranks them at the end."""

    def __init__(self, lora, run_id_getter, reachable=lambda: True):
        self.lora = lora
        self._run_id = run_id_getter
        self._reachable = reachable

    def log(self, ckpt: Path, step: int) -> str | None:
        """Log ``ckpt`` (a complete checkpoint) and link the run's metrics at ``step``; returns the model id.

        A failure is logged as a warning: the checkpoint on disk stays resumable, and training goes on. While
        the tracking server is not taking the run's writes, the checkpoint is not logged at all: uploading a
        model would hold the training loop through every HTTP retry.
        """
        run_id = self._run_id()
        if not run_id:
            return None
        if not self._reachable():
            logger.warning("MLflow is not taking writes now; %s is not logged as a LoggedModel (it stays on "
                           "disk and resumable).", ckpt)
            return None
        try:
            return self._log(ckpt, step, run_id)
        except Exception as e:
            logger.warning("Could not log %s as an MLflow LoggedModel (training continues; the checkpoint is "
                           "on disk): %s", ckpt, e)
            return None

    def _log(self, ckpt: Path, step: int, run_id: str) -> str:
        import mlflow

        from smolora_mlflow import flavor
        from smolora_mlflow.tracking.linking import link_run_metrics
        from smolora_mlflow.train.publish import lineage

        values = lineage(self.lora)
        info = flavor.log_model(
            f"{C.CHECKPOINT_MODEL_PREFIX}{step}", mode="adapter", adapter_dir=str(ckpt), run_id=run_id, step=step,
            training_run_id=run_id, pip_requirements=flavor.get_default_pip_requirements("adapter"),
            tags={C.TAG_CHECKPOINT_STEP: str(step)}, **values)
        link_run_metrics(mlflow.MlflowClient(), run_id, info.model_id, step=step)
        return info.model_id

    def finish(self, keep: int) -> dict[str, Any]:
        """Rank the run's checkpoint models, tag the kept ones, delete the rest; returns ``{role: model_id}``.

        A failure (an unreachable tracking server) is a warning and ``{}``: training has succeeded and its
        adapter is saved; the checkpoint models stay as they are, unranked.
        """
        run_id = self._run_id()
        if not run_id or not self._reachable():
            return {}
        try:
            return self._finish(run_id, keep)
        except Exception as e:
            logger.warning("Could not rank the checkpoint models of run %s (they stay, unranked): %s", run_id, e)
            return {}

    def _finish(self, run_id: str, keep: int) -> dict[str, Any]:
        import mlflow

        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        models = [m for m in client.search_logged_models([run.info.experiment_id],
                                                         filter_string=f"source_run_id = '{run_id}'")
                  if C.TAG_CHECKPOINT_STEP in m.tags]
        if not models:
            return {}
        key = C.METRIC_EVAL_LOSS if all(C.METRIC_EVAL_LOSS in _values(m) for m in models) else C.METRIC_LOSS
        ranked = sorted(models, key=lambda m: _ranking_value(m, key))
        latest = max(models, key=lambda m: int(m.tags[C.TAG_CHECKPOINT_STEP]))
        roles = {"best": ranked[0].model_id, "latest": latest.model_id}
        for rank, m in enumerate(ranked, start=1):
            mine = [role for role, mid in roles.items() if mid == m.model_id]
            if rank > keep and not mine:
                client.delete_logged_model(m.model_id)
                continue
            tags = {C.TAG_CHECKPOINT_RANK: str(rank)}
            if mine:
                tags[C.TAG_CHECKPOINT_ROLE] = ",".join(mine)
            client.set_logged_model_tags(m.model_id, tags)
        return roles


def _values(model) -> dict[str, float]:
    return {m.key: m.value for m in (model.metrics or [])}


def _ranking_value(model, key: str) -> tuple[float, int]:
    """(``key``'s value, else +inf; then later steps first) of a checkpoint model."""
    return float(_values(model).get(key, float("inf"))), -int(model.tags[C.TAG_CHECKPOINT_STEP])
