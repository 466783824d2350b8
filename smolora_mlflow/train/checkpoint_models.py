"""Each kept checkpoint as an MLflow 3 LoggedModel: found, compared and registered from the UI or the API.

When a checkpoint is complete, its adapter is logged to the training run as a ``smolora`` flavor model in
adapter mode, named ``checkpoint-<step>``, with ``step`` set, and the metrics the run holds at that step
(loss, eval loss...) linked to it (``log_metric(model_id=...)``, without a second row in the run's history).
When training ends, the checkpoints are ranked on ``eval_loss`` (``loss`` without an eval split): the
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

    def __init__(self, lora, run_id_getter):
        self.lora = lora
        self._run_id = run_id_getter

    def log(self, ckpt: Path, step: int) -> str | None:
        """Log ``ckpt`` (a complete checkpoint) and link the run's metrics at ``step``; returns the model id.

        A failure is logged as a warning: the checkpoint on disk stays resumable, and training goes on.
        """
        run_id = self._run_id()
        if not run_id:
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
        """Rank the run's checkpoint models, tag the kept ones, delete the rest; returns ``{role: model_id}``."""
        run_id = self._run_id()
        if not run_id:
            return {}
        import mlflow

        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        models = [m for m in client.search_logged_models([run.info.experiment_id],
                                                         filter_string=f"source_run_id = '{run_id}'")
                  if C.TAG_CHECKPOINT_STEP in m.tags]
        if not models:
            return {}
        ranked = sorted(models, key=_ranking_value)
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


def _ranking_value(model) -> tuple[float, int]:
    """(eval_loss, else loss, else +inf; then later steps first) of a checkpoint model."""
    values = {m.key: m.value for m in (model.metrics or [])}
    value = values.get(C.METRIC_EVAL_LOSS, values.get(C.METRIC_LOSS, float("inf")))
    return float(value), -int(model.tags[C.TAG_CHECKPOINT_STEP])
