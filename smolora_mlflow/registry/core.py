"""Read-only helpers of :mod:`smolora_mlflow.registry`: names, errors, lookups, legality, lineage.

Nothing here writes to MLflow, so the public functions can validate everything before their first write.
The second half answers "what does this reference to a model mean": its source URI, training run,
logged model, lineage tags and model card.
"""

from __future__ import annotations

import getpass
import json
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from smolora_mlflow import constants as C
from smolora_mlflow.constants import (
    METRIC_TAG_PREFIX,
    PARAM_TAG_PREFIX,
    TAG_MODEL_ID,
    TAG_RUN_ID,
    TRANSITION_TAG_PREFIX,
)
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.refs import MAX_VERSION, ModelRef

_logger = logging.getLogger(__name__)

STAGES = ("None", "Staging", "Production", "Archived")
STAGE_ALIASES = {"Staging": "staging", "Production": "production"}
LEGAL_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "None": ("Staging", "Production", "Archived"),
    "Staging": ("None", "Production", "Archived"),
    "Production": ("Staging", "Archived"),
    "Archived": ("Staging", "Production"),
}
LINEAGE_PARAMS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
KEY_METRICS = (C.METRIC_TRAIN_LOSS, C.METRIC_EVAL_LOSS, C.METRIC_EVAL_PERPLEXITY, C.METRIC_LOSS)
LINEAGE_TAGS = (C.TAG_BASE_MODEL, C.TAG_BASE_MODEL_REVISION, C.TAG_BASE_MODEL_SHA256, C.TAG_DATASET,
                C.TAG_DATASET_FINGERPRINT, C.TAG_GIT_COMMIT)



def missing(msg: str) -> MlflowException:
    return MlflowException(msg, error_code=RESOURCE_DOES_NOT_EXIST)


def has_code(e: MlflowException, *codes: int) -> bool:
    return e.error_code in {ErrorCode.Name(c) for c in codes}


def canonical_stage(stage: str | None) -> str:
    by_lower = {s.lower(): s for s in STAGES}
    if stage is None or (isinstance(stage, str) and stage.lower() in by_lower):
        return "None" if stage is None else by_lower[stage.lower()]
    raise invalid_input(f"Unknown stage {stage!r}; allowed stages are {', '.join(STAGES)} (case-insensitive).")


def get_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not has_code(e, RESOURCE_DOES_NOT_EXIST):
            raise
        known = ", ".join(m.name for m in client.search_registered_models(max_results=20)) or "none"
        raise missing(f"Registered model {name!r} does not exist; known models: {known}.") from e


def name_filter(name: str) -> str | None:
    """``name = '<name>'`` in MLflow's filter grammar, or None where that grammar cannot spell ``name``.

    MLflow's parser (sqlparse tokens, then ``SearchUtils._strip_quotes``; checked against MLflow 3.17) only
    trims the enclosing quotes: a doubled or backslash-escaped quote is kept as typed, never unescaped. So
    the one exact spelling is the name between the quote it does not contain; a name holding both kinds
    has none. ``%`` and ``_`` are literal: ``=`` is not ``LIKE``.
    """
    for quote in ("'", '"'):
        if quote not in name:
            return f"name = {quote}{name}{quote}"
    return None


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of ``name``, and of no other model, oldest first."""
    if (where := name_filter(name)) is None:
        return _versions_one_by_one(client, name)
    out, token = [], None
    while True:
        page = client.search_model_versions(where, page_token=token)
        # The store compares with its collation (case-blind on MySQL): keep the exact name only.
        out.extend(mv for mv in page if mv.name == name)
        if not (token := page.token):
            return sorted(out, key=lambda mv: int(mv.version))


def _versions_one_by_one(client: MlflowClient, name: str) -> list[ModelVersion]:
    """For a name no filter can spell: the newest version in each stage bounds the numbers, then one exact
    lookup per number (deleted numbers are skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated upstream, still answered
        newest = max((int(mv.version) for mv in client.get_latest_versions(name)), default=0)
    out = []
    for number in range(1, newest + 1):
        try:
            out.append(client.get_model_version(name, str(number)))
        except MlflowException as e:
            if not has_code(e, RESOURCE_DOES_NOT_EXIST):
                raise
    return out


def version_number(version: int | str) -> int | None:
    """``version`` as a positive int when it is written as one (ASCII digits: ``"²".isdigit()`` is True)."""
    text = str(version).strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        return None
    return int(text)


def get_version(client: MlflowClient, name: str, version: int | str) -> ModelVersion:
    get_model(client, name)
    number = version_number(version)
    if number is None:
        raise invalid_input(f"Model version must be a positive integer, got {version!r}.")
    try:
        if number > MAX_VERSION:  # past anything a store holds (SQLite would raise OverflowError)
            raise missing(f"version {number} is out of range")
        return client.get_model_version(name, str(number))
    except MlflowException as e:
        if not has_code(e, RESOURCE_DOES_NOT_EXIST):
            raise
        existing = ", ".join(str(mv.version) for mv in all_versions(client, name)) or "none"
        raise missing(f"Model {name!r} has no version {number}; its versions are: {existing}.") from e


def stage_holder(versions: Iterable[ModelVersion], stage: str) -> ModelVersion | None:
    """What ``models:/name/<stage>`` resolves to: the highest version in that stage."""
    held = [mv for mv in versions if mv.current_stage == stage]
    return max(held, key=lambda mv: int(mv.version)) if held else None


def check_legal(mv: ModelVersion, target: str) -> None:
    current = mv.current_stage or "None"
    if target not in LEGAL_TRANSITIONS[current]:
        raise invalid_input(f"Illegal transition of model {mv.name!r} version {mv.version} from {current} to "
                  f"{target}{' (it is already there)' if current == target else ''}; from {current} "
                  f"it may move to {', '.join(LEGAL_TRANSITIONS[current])}.")


# A reason or user is kept in tags (history, promotion decision): MLflow holds 100,000 characters a tag value
# and 250 a key; the notes stay well inside, so their tags can never be refused after a stage has moved.
MAX_NOTE = 5000
MAX_TAG_KEY, MAX_TAG_VALUE = 250, 100_000


def check_note(field: str, value: str | None) -> str | None:
    """``value`` (a reason or user) if it fits in a tag beside the rest of its entry; raises otherwise."""
    if value is not None and (not isinstance(value, str) or len(value) > MAX_NOTE):
        shown = f"{len(value)} characters" if isinstance(value, str) else repr(value)
        raise invalid_input(f"`{field}` must be text of at most {MAX_NOTE} characters, got {shown}; shorten it.")
    return value


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """Version tags MLflow will take (key and value lengths), checked before anything is written."""
    for key, value in tags.items():
        if not key.strip() or len(key) > MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
            raise invalid_input(f"Version tag {key[:80]!r} (value of {len(value)} characters) is not accepted: keys "
                                f"are 1-{MAX_TAG_KEY} characters, values at most {MAX_TAG_VALUE}; shorten it.")
    return tags


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers; the name is informative only
        return "unknown"


def history_rows(versions: Iterable[ModelVersion]) -> list[dict[str, Any]]:
    """Every ``smolora.transition.*`` tag as a dict, in key (= time) order."""
    rows = []
    for mv in versions:
        for key, value in mv.tags.items():
            if key.startswith(TRANSITION_TAG_PREFIX):
                try:
                    rows.append({"key": key, "version": int(mv.version), **json.loads(value)})
                except (ValueError, TypeError) as e:
                    _logger.warning("Skipping unreadable history tag %s of version %s: %s", key, mv.version, e)
    return sorted(rows, key=lambda r: r["key"])


def metric_value(client: MlflowClient, mv: ModelVersion, metric: str) -> float | None:
    """The version's ``smolora.metric.<metric>`` tag, else the newest point of ``metric`` in its run or
    linked to its LoggedModel (what ``smolora evaluate`` logs with ``model_id``, from its own run), else None."""
    if METRIC_TAG_PREFIX + metric in mv.tags:
        return float(mv.tags[METRIC_TAG_PREFIX + metric])
    history = list(client.get_metric_history(mv.run_id, metric)) if mv.run_id else []
    newest_in_run = max((m.timestamp for m in history), default=-1)
    model_id = getattr(mv, "model_id", None) or mv.tags.get(C.TAG_MODEL_ID)
    linked = []
    if model_id:
        try:
            linked = [m for m in (client.get_logged_model(model_id).metrics or [])
                      if m.key == metric and m.timestamp > newest_in_run]
        except MlflowException:  # the logged model was deleted: the run still holds its metrics
            linked = []
    if linked:  # a later evaluation of this model
        return float(max(linked, key=lambda m: (m.timestamp, m.step)).value)
    return client.get_run(mv.run_id).data.metrics.get(metric) if history else None


def higher_is_better(metric: str) -> bool:
    """Whether ``metric`` improves upwards (task scores, accuracy; their ``base_`` twins too); losses,
    perplexity and anything unknown improve downwards."""
    return metric.removeprefix(C.BASE_PREFIX) in C.HIGHER_IS_BETTER


# --- what a reference to a model means --------------------------------------------------------------

def _find_logged_model(client: MlflowClient, run_id: str, wanted: str | None):
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise missing(f"Run {run_id!r} does not exist in {client.tracking_uri}.") from e
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    names = sorted({m.name for m in models})
    wanted = wanted or ("model" if len(names) > 1 else None)
    if found := sorted((m for m in models if wanted in (None, m.name)), key=lambda m: m.creation_timestamp):
        return found[-1]
    path = wanted or "model"  # an MLflow 2 model kept in the run's own artifacts
    if any(f.path == f"{path}/MLmodel" for f in client.list_artifacts(run_id, path)):
        return None
    raise missing(f"Run {run_id} has no logged model named {path!r}; its logged models: "
                  f"{', '.join(names) or 'none'}. Pass runs:/{run_id}/<name> or models:/<model_id>.")


def logged_source(client: MlflowClient, ref: ModelRef) -> tuple[str, str | None, str | None, str]:
    """``(source, run_id, model_id, artifact_uri)`` of a run, logged-model or plain-URI reference.

    ``models:/<name>/...`` references to registered versions are resolved by the caller.
    """
    if ref.kind == "run":
        path = ref.artifact_path
        if lm := _find_logged_model(client, ref.run_id, path):
            return f"models:/{lm.model_id}", ref.run_id, lm.model_id, lm.artifact_location
        uri = f"runs:/{ref.run_id}/{path or 'model'}"
        return uri, ref.run_id, None, f"{client.get_run(ref.run_id).info.artifact_uri}/{path or 'model'}"
    if ref.kind == "logged_model":
        lm = client.get_logged_model(ref.model_id)
        return f"models:/{lm.model_id}", lm.source_run_id, lm.model_id, lm.artifact_location
    if ref.kind == "uri":
        return ref.text, None, None, ref.text
    raise invalid_input(f"Cannot register {ref.text!r}: expected runs:/<run_id>/<name>, models:/<model_id>, "
                        "m-<model_id>, models:/<name>/<version|stage>, models:/<name>@<alias> or a run id.")


def lineage_tags(run, model_id: str | None) -> dict[str, str]:
    """Version tags copied from the training run: ids, lineage tags, LoRA params, key metrics."""
    tags = {TAG_MODEL_ID: model_id} if model_id else {}
    if run is None:
        return tags
    data = run.data
    tags[TAG_RUN_ID] = run.info.run_id
    tags.update({k: v for k, v in data.tags.items() if k in LINEAGE_TAGS or k.startswith(C.TAG_VERSION_PREFIX)})
    tags.update({PARAM_TAG_PREFIX + p: data.params[p] for p in LINEAGE_PARAMS if p in data.params})
    tags.update({METRIC_TAG_PREFIX + m: repr(float(data.metrics[m])) for m in KEY_METRICS if m in data.metrics})
    return tags


def model_card(client: MlflowClient, artifact_uri: str) -> str | None:
    """The README.md at the top of the model's artifacts, without YAML front matter; None if absent."""
    files = mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri, tracking_uri=client.tracking_uri)
    if not any(f.path.rsplit("/", 1)[-1] == C.ARTIFACT_MODEL_CARD for f in files):
        return None
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{C.ARTIFACT_MODEL_CARD}",
                                                tracking_uri=client.tracking_uri)
    with open(local, encoding="utf-8") as f:
        text = f.read()
    if text.startswith("---\n") and "\n---" in text[4:]:  # Hugging Face YAML front matter
        text = text[4:].split("\n---", 1)[1].lstrip("-\n")
    return text.strip() or None


def summary(run, source: str) -> str:
    """A one-paragraph description of a version generated from its training run."""
    if run is None:
        return f"Registered from {source}."
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    lora = ", ".join(f"{p.removeprefix('lora_')}={params[p]}" for p in LINEAGE_PARAMS if p in params)
    scores = ", ".join(f"{m}={metrics[m]:.4g}" for m in KEY_METRICS if m in metrics)
    return (f"LoRA fine-tune of {tags.get(C.TAG_BASE_MODEL, 'an unrecorded base model')} on "
            f"{tags.get(C.TAG_DATASET, 'an unrecorded dataset')}" + (f" ({lora})" if lora else "")
            + f", trained in run {run.info.run_id}." + (f" Final metrics: {scores}." if scores else ""))
