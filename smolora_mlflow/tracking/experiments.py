"""Which MLflow experiment a run goes to: the one place that resolves ``experiment_name``.

Not ``mlflow.set_experiment``: that changes the process's active experiment and exports
``MLFLOW_EXPERIMENT_ID`` to the whole process and its children, so a later run with another
``experiment_name`` would land in the first one.

Every experiment the project creates, or writes a run into while it has no kind yet, is tagged
``mlflow.experimentKind=custom_model_development``: MLflow 3's UI shows an experiment without that tag in its
GenAI view ("Evaluation runs", traces), while these are training runs with params, metrics and charts.
A kind someone set is left alone.
"""

from __future__ import annotations

import os

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.errors import invalid_input

DEFAULT_EXPERIMENT = SmoloraConfig.__dataclass_fields__["experiment_name"].default
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # read by MLflow's UI to pick the experiment's view
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI picks its view from a global GenAI / Model training switch (the `workflowType` query
# parameter, else the browser's last choice, else GenAI), before the experiment's kind: links we print carry it.
UI_VIEW_QUERY = "?workflowType=machine_learning"


def run_ui_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI of an http(s) tracking server, opened in the training view."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW_QUERY}"


def mark_experiment(experiment_id: str, client=None, tags: dict[str, str] | None = None) -> None:
    """Tag experiment ``experiment_id`` as model development unless it has a kind (``tags``: its tags, if read)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    if TAG_EXPERIMENT_KIND not in tags:
        client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)


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

    client = client or mlflow.MlflowClient()
    env_id, env_name = os.environ.get("MLFLOW_EXPERIMENT_ID"), os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name == DEFAULT_EXPERIMENT and (env_id or env_name):
        exp = client.get_experiment(env_id) if env_id else client.get_experiment_by_name(env_name)
        if exp is not None and exp.lifecycle_stage == "active":
            mark_experiment(exp.experiment_id, client, exp.tags)
        return None
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException as e:  # created meanwhile by another process
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise invalid_input(
            f"`experiment_name`={name!r} names a deleted MLflow experiment; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose another name.")
    mark_experiment(exp.experiment_id, client, exp.tags)
    return exp.experiment_id
