"""The MLflow run of one pipeline step (the pipeline itself, an evaluation)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.tracking.experiments import experiment_id_for, mark_experiment


@contextlib.contextmanager
def step_run(cfg: SmoloraConfig, run_name: str, step: str) -> Iterator[str]:
    """An MLflow run for one step: nested under the active run, the run ``mlflow run`` made, or a new run in
    ``cfg.experiment_name``.

    It ends FINISHED, or FAILED (KILLED on Ctrl-C) with the error tagged, and re-raises.
    """
    import mlflow

    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    active = mlflow.active_run()
    if active is not None:
        run = mlflow.start_run(run_name=run_name, nested=True, experiment_id=active.info.experiment_id)
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # the run `mlflow run` created: keep its name
        mark_experiment(run.info.experiment_id)
    else:
        run = mlflow.start_run(run_name=run_name, experiment_id=experiment_id_for(cfg.experiment_name))
    mlflow.set_tag(C.TAG_STEP, step)
    try:
        yield run.info.run_id
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag(C.TAG_ERROR, f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")
