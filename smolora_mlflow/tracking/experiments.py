"""Which MLflow experiment a run goes to: the one place that resolves ``experiment_name``.

Not ``mlflow.set_experiment``: that changes the process's active experiment and exports
``MLFLOW_EXPERIMENT_ID`` to the whole process and its children, so a later run with another
``experiment_name`` would land in the first one.
"""

from __future__ import annotations

import os

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.errors import invalid_input

DEFAULT_EXPERIMENT = SmoloraConfig.__dataclass_fields__["experiment_name"].default


def experiment_id_for(name: str, client=None) -> str | None:
    """The id of experiment ``name``, created if needed; None lets MLflow choose.

    MLflow chooses when ``name`` is the default and ``MLFLOW_EXPERIMENT_ID``/``MLFLOW_EXPERIMENT_NAME`` is set
    (``mlflow run`` sets it), so a run lands in the experiment the user picked there.

    Raises:
        MlflowException: ``name`` is a deleted experiment (with how to restore it).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    chosen_by_env = os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name == DEFAULT_EXPERIMENT and chosen_by_env:
        return None
    client = client or mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as e:  # created meanwhile by another process
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise invalid_input(
            f"`experiment_name`={name!r} names a deleted MLflow experiment; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose another name.")
    return exp.experiment_id
