"""The manifest of a smolora model and a digest of it kept where the artifact writer cannot reach it.

The ``smolora`` block of a model's ``MLmodel`` lists every file of the model's data folder with its
sha256 (the manifest). Those hashes live beside the weights: whoever can rewrite the weights in the
artifact store can rewrite the hashes too. So a digest of the manifest is also kept in the tracking
and registry stores, which the artifact store's writer cannot reach:

- the run the model was logged to: tag ``smolora.manifest_sha256.<model name>``;
- the LoggedModel (MLflow 3): tag ``smolora.manifest_sha256``;
- each registered model version: tag ``smolora.manifest_sha256``.

Loading by ``models:/`` or ``runs:/`` URI compares the downloaded manifest against that digest and
refuses a mismatch, naming the version or run (see :func:`resolve` and :func:`check`). A model logged
before the digest existed has no tag: it loads with a warning. Which load paths check what is listed
in the README (Reliability).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from smolora_mlflow.refs import parse_model_ref

logger = logging.getLogger(__name__)

TAG = "smolora.manifest_sha256"
ENV_DIGEST = "SMOLORA_MANIFEST_SHA256"  # set by `smolora serve` for the server process
ENV_SOURCE = "SMOLORA_MANIFEST_SOURCE"  # what recorded that digest, for the error message
_FIELDS = ("mode", "data", "file_sha256", "base_model_sha256")


def run_tag(name: str) -> str:
    """The run tag holding the digest of the model logged under ``name`` in that run."""
    return f"{TAG}.{name.strip('/')}"


def digest(conf: Mapping[str, Any]) -> str:
    """sha256 of the manifest: the data folder, the mode, every file's sha256 and the base weights' sha256."""
    body = {k: conf.get(k) for k in _FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def refuse_unlisted_files(data_dir: Path, expected: Mapping[str, str]) -> None:
    """Refuse a data folder holding files the manifest does not list (e.g. an added tokenizer file).

    ``from_pretrained`` reads whatever it finds (``added_tokens.json``, ``special_tokens_map.json``,
    ...), so a file dropped in beside the verified ones changes what loads. A model saved without a
    manifest (no ``file_sha256``) is not checked here.
    """
    if not expected:
        return
    unlisted = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
                      if p.is_file() and p.relative_to(data_dir).as_posix() not in expected)
    if unlisted:
        raise MlflowException(
            f"Model folder `{data_dir}` holds files its manifest (MLmodel `file_sha256`) does not list: "
            f"{unlisted}. They were added after the model was saved and would change what loads. "
            "Refusing to load it: remove them, or re-download or re-log the model.",
            error_code=INVALID_STATE,
        )


# ----------------------------------------------------------------------------------------------------
# recording


def record(info: Any, registered_model_name: str | None = None, client: Any = None) -> str | None:
    """Store the digest of a just-logged model on its run, its LoggedModel and its registered version."""
    import mlflow

    conf = (info.flavors or {}).get("smolora")
    if not conf:
        return None
    client = client or mlflow.MlflowClient()
    value = digest(conf)
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


def read_mlmodel(model_root: str | Path) -> dict[str, Any]:
    """The parsed MLmodel file of a local model folder ({} when it holds none)."""
    import yaml

    path = Path(model_root) / "MLmodel"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        document = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return document if isinstance(document, dict) else {}


def download_checked(uri: str, dst_path: str | None = None) -> str:
    """Download a model URI (pinned by :func:`resolve`) and check a smolora manifest against the record."""
    return fetch_checked(uri, dst_path)[0]


def fetch_checked(uri: str, dst_path: str | None = None) -> tuple[str, dict[str, Any] | None, Expected]:
    """:func:`download_checked`, also returning the ``smolora`` flavor block (None for another flavor) and
    what was expected of it."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    expected = resolve(uri)
    local = _download_artifact_from_uri(artifact_uri=expected.uri, output_path=dst_path)
    conf = (read_mlmodel(local).get("flavors") or {}).get("smolora")
    if conf:
        check(conf, expected)
    return local, conf, expected


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

    uri = parse_model_ref(str(uri)).text  # every model download starts here: no '..', no impossible version
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


def check(conf: Mapping[str, Any], expected: Expected) -> None:
    """Refuse a manifest whose digest is not the one on record; warn when none is on record."""
    if expected.source is None:
        return
    if not expected.digest:
        logger.warning("%s has no manifest digest on record (tag %s; it was logged before smolora-mlflow "
                       "kept one): its file hashes are checked, but only against its own MLmodel.",
                       expected.source, TAG)
        return
    actual = digest(conf)
    if actual != expected.digest:
        raise MlflowException(
            f"The manifest (MLmodel file hashes) of {expected.source} has digest {actual}, but {expected.source} "
            f"recorded {expected.digest} when it was logged: its files or their hashes were changed in the "
            "artifact store. Refusing to load it. Re-log the model from its training run.",
            error_code=INVALID_STATE,
        )


def check_environment(conf: Mapping[str, Any]) -> None:
    """In a server started by ``smolora serve``: compare against the digest the launcher looked up."""
    value = os.environ.get(ENV_DIGEST)
    if value:
        check(conf, Expected("", value, os.environ.get(ENV_SOURCE) or "the served model"))


def check_logged_model(model_root: Path, conf: Mapping[str, Any]) -> None:
    """``mlflow.pyfunc.load_model``'s path: the flavor sees only a local folder, so it follows the
    MLmodel's ``model_id`` to the LoggedModel's tag, when a tracking URI is set and has that model.

    Best effort: an MLmodel whose ``model_id`` was removed, or a store that does not know it, is not
    compared (``smolora_mlflow.flavor.load_model`` and ``smolora serve`` check the URI strictly).
    """
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if os.environ.get(ENV_DIGEST) or not is_tracking_uri_set():
        return
    model_id = read_mlmodel(model_root).get("model_id")
    if not model_id:
        return
    import mlflow

    try:
        value = mlflow.MlflowClient().get_logged_model(model_id).tags.get(TAG)
    except Exception as e:  # another store, or none reachable: nothing on record to compare with
        logger.debug("no LoggedModel %s to compare the manifest with: %s", model_id, e)
        return
    if value:
        check(conf, Expected("", value, f"logged model {model_id}"))
