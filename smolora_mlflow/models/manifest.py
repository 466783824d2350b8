"""The manifest of a smolora model and a digest of it kept where the artifact writer cannot reach it.

The ``smolora`` block of a model's ``MLmodel`` lists every file of the model's data folder with its
sha256 (the manifest). Those hashes live beside the weights: whoever can rewrite the weights in the
artifact store can rewrite the hashes too. So a digest of the manifest is also kept in the tracking
and registry stores, which the artifact store's writer cannot reach:

- the run the model was logged to: tag ``smolora.manifest_sha256.<model name>``;
- the LoggedModel (MLflow 3): tag ``smolora.manifest_sha256``;
- each registered model version: tag ``smolora.manifest_sha256``.

Loading by ``models:/`` or ``runs:/`` URI compares the downloaded manifest against that digest and
refuses a mismatch, naming the version or run (:func:`resolve` and :func:`check`, called by the integrity
gate, :mod:`smolora_mlflow.models.integrity`). A model logged before the digest existed has no tag: it
loads with a warning.

Since format 2 (:data:`FORMAT_VERSION`) the digest covers the whole ``smolora`` block (file hashes, the
hashes of the shipped ``code`` folder, generation settings, adapter references) and the whole
``python_function`` block (loader module, code path, data, env), so whatever decides which code a load
runs is covered. Models of format 1 (no ``format_version`` key) keep the digest over the four keys it
always covered.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

logger = logging.getLogger(__name__)

TAG = "smolora.manifest_sha256"
FORMAT_VERSION = 2  # `format_version` written by save_model; absent means 1 (no code hashes)
_FORMAT_1_FIELDS = ("mode", "data", "file_sha256", "base_model_sha256")


def run_tag(name: str) -> str:
    """The run tag holding the digest of the model logged under ``name`` in that run."""
    return f"{TAG}.{name.strip('/')}"


def format_version(conf: Mapping[str, Any]) -> int:
    """The smolora block's format: 1 when it declares none (models saved before formats were numbered)."""
    value = conf.get("format_version")
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def digest(flavors: Mapping[str, Any]) -> str:
    """sha256 of the manifest in an MLmodel's ``flavors`` (see the module docstring for what it covers)."""
    conf = flavors.get("smolora") or {}
    if format_version(conf) >= 2:
        body: dict[str, Any] = {"smolora": conf, "python_function": flavors.get("python_function")}
    else:
        body = {k: conf.get(k) for k in _FORMAT_1_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# recording


def record(info: Any, registered_model_name: str | None = None, client: Any = None) -> str | None:
    """Store the digest of a just-logged model on its run, its LoggedModel and its registered version."""
    import mlflow

    if not (info.flavors or {}).get("smolora"):
        return None
    client = client or mlflow.MlflowClient()
    value = digest(info.flavors)
    if info.run_id:
        client.set_tag(info.run_id, run_tag(info.name or info.artifact_path or "model"), value)
    if getattr(info, "model_id", None):
        client.set_logged_model_tags(info.model_id, {TAG: value})
    if registered_model_name and info.registered_model_version:
        client.set_model_version_tag(registered_model_name, str(info.registered_model_version), TAG, value)
    return value


def for_registration(client: Any, run: Any, model_id: str | None, name: str | None) -> str | None:
    """The recorded digest of the model being registered: its LoggedModel's tag, else its run's tag."""
    if model_id:
        try:
            lm = client.get_logged_model(model_id)
        except MlflowException:
            lm = None
        if lm is not None and lm.tags.get(TAG):
            return lm.tags[TAG]
        name = name or (lm.name if lm is not None else None)
    if run is not None and name:
        return run.data.tags.get(run_tag(name))
    return None


# ----------------------------------------------------------------------------------------------------
# checking


class Expected(NamedTuple):
    """What a URI must load: a concrete URI to download, the digest on record, and who recorded it."""

    uri: str
    digest: str | None
    source: str | None  # None: not a tracked URI (a local path, s3://...), so nothing to compare


def resolve(uri: str, client: Any = None) -> Expected:
    """Pin ``models:/``/``runs:/`` URIs to one version or model and look up the digest recorded for it.

    ``models:/name@alias`` and stage URIs become ``models:/name/<version>``, so the files checked are
    the files of the version whose tag was read, even if the alias moves meanwhile.
    """
    import mlflow

    uri = str(uri)
    if not uri.startswith(("models:/", "runs:/")):
        return Expected(uri, None, None)
    client = client or mlflow.MlflowClient()
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").strip("/").partition("/")
        tags = client.get_run(run_id).data.tags
        return Expected(uri, tags.get(run_tag(path or "model")), f"run {run_id} (model `{path or 'model'}`)")
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    found = get_model_name_and_version(client, uri)
    if len(found) == 1:  # models:/<model_id>
        return Expected(uri, client.get_logged_model(found[0]).tags.get(TAG), f"logged model {found[0]}")
    name, version = found
    mv = client.get_model_version(name, version)
    value = mv.tags.get(TAG) or for_registration(client, None, mv.model_id, None)
    return Expected(f"models:/{name}/{version}", value, f"registered model '{name}' version {version}")


def check(flavors: Mapping[str, Any], expected: Expected) -> None:
    """Refuse a manifest whose digest is not the one on record; warn when none is on record."""
    if expected.source is None:
        return
    if not expected.digest:
        logger.warning("%s has no manifest digest on record (tag %s; it was logged before smolora-mlflow "
                       "kept one): its file hashes are checked, but only against its own MLmodel.",
                       expected.source, TAG)
        return
    actual = digest(flavors)
    if actual != expected.digest:
        raise MlflowException(
            f"The manifest (MLmodel file hashes) of {expected.source} has digest {actual}, but {expected.source} "
            f"recorded {expected.digest} when it was logged: its files or their hashes were changed in the "
            "artifact store. Refusing to load it. Re-log the model from its training run.",
            error_code=INVALID_STATE,
        )
