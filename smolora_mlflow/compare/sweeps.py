"""The trials of a ``smolora sweep`` read back from the tracking store, best first."""

from __future__ import annotations

import pandas as pd
from mlflow import MlflowClient

from smolora_mlflow import constants as C
from smolora_mlflow.compare.runs import not_found, search_all, typed_column


def sweep_trials(sweep_run_id: str, *, client: MlflowClient | None = None,
                 tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per trial of a ``smolora sweep`` (its parent run id), best first: trial number, run id, the
    searched params, the objective value and status; the best trial's row has ``best`` True.

    Example:
        >>> compare.sweep_trials(result.parent_run_id)[["trial", "lora_r", "eval_loss", "best"]]  # doctest: +SKIP
    """
    client = client or MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(sweep_run_id)
    metric = parent.data.params.get("sweep_metric")
    if metric is None:
        raise not_found(f"Run {sweep_run_id} is not a sweep (it has no `sweep_metric` param).")
    searched = [k.removeprefix("sweep_space.") for k in parent.data.params if k.startswith("sweep_space.")]
    runs = search_all(client, [parent.info.experiment_id], f"tags.`{C.TAG_SWEEP_RUN_ID}` = '{sweep_run_id}'", None,
                   10_000)
    rows = [{"trial": int(r.data.tags[C.TAG_SWEEP_TRIAL]), "run_id": r.info.run_id, "run_name": r.info.run_name,
             **{k: r.data.params.get(k) for k in searched}, metric: r.data.metrics.get(metric),
             "status": r.info.status} for r in runs if C.TAG_SWEEP_TRIAL in r.data.tags]
    df = pd.DataFrame(rows, columns=["trial", "run_id", "run_name", *searched, metric, "status"])
    for k in searched:
        df[k] = typed_column(df[k])
    df["best"] = df["run_id"] == parent.data.tags.get(C.TAG_SWEEP_BEST_RUN_ID)
    ascending = parent.data.params.get("sweep_direction", "min") == "min"
    return df.sort_values(metric, ascending=ascending, na_position="last").reset_index(drop=True)
