"""Semantic versions of registered versions, derived from what changed in the training recipe.

MLflow numbers versions 1, 2, 3...; this module gives each one a ``MAJOR.MINOR.PATCH`` as well (tag
``smolora.semver``, the reason in ``smolora.semver_reason``, the alias ``v<MAJOR>-<MINOR>-<PATCH>`` since an
alias cannot hold dots), by comparing its recipe with its predecessor's, the nearest existing lower version
number:

- MAJOR: what the adapter is applied to or how text reaches it changed: the base model id, revision or
  weights hash, the tokenizer, the prompt format or chat template.
- MINOR: what it was trained on or how: the dataset fingerprint, the LoRA settings, the method, any other
  hyperparameter (every run param but the operational ones in :data:`OPERATIONAL_PARAMS`).
- PATCH: nothing in the recipe changed (a re-run).

The first version is 1.0.0. The recipe is recorded on the version at creation (tag ``smolora.recipe``), so
a version's semver is a function of the versions up to it, in MLflow's number order: two registrations
racing for the same name each compute their predecessor's semver the same way even before its tag is
written, so they get distinct, increasing semvers without a lock. ``semver=`` overrides the derivation
(it must be greater than every existing semver) and is written at creation, in the same write.

Example:
    >>> mv = register(run_id, "reviews-lora")     # doctest: +SKIP
    >>> mv.tags["smolora.semver"], mv.tags["smolora.semver_reason"]  # doctest: +SKIP
    ('1.1.0', 'MINOR: learning_rate 0.0002 -> 0.001 (since version 3, 1.0.1)')
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from smolora_mlflow import constants as C
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.registry import core

_logger = logging.getLogger(__name__)

TAG_SEMVER = "smolora.semver"
TAG_SEMVER_REASON = "smolora.semver_reason"
TAG_RECIPE = "smolora.recipe"  # JSON {"major": {...}, "minor": {...}} of the training run
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_ALIAS_RE = re.compile(r"^v(0|[1-9]\d*)-(0|[1-9]\d*)-(0|[1-9]\d*)$")
FIRST = (1, 0, 0)
# Run params that say where and how a run was recorded, not what was trained: they never bump a version.
OPERATIONAL_PARAMS = frozenset({
    "base_model", "base_model_revision", "prompt_format",  # MAJOR keys, compared there
    "dataset", "dataset_split",  # where the data came from; its content is the fingerprint
    "output_dir", "tracking", "experiment_name", "run_name", "registered_model_name", "resume_from_checkpoint",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "device", "system_metrics",
    "system_metrics_interval", "checkpoint_models", "sample_prompts", "sample_max_new_tokens", "task_eval",
    "task_max_rows", "task_max_new_tokens", "task_answer_regex", "trust_remote_code", "num_train_rows",
    "num_eval_rows",
})
_MAJOR_PARAMS = ("base_model", "base_model_revision")
_MAJOR_TAGS = (C.TAG_BASE_MODEL, C.TAG_BASE_MODEL_REVISION, C.TAG_BASE_MODEL_SHA256, C.TAG_TOKENIZER_SHA256,
               C.TAG_PROMPT_FORMAT, C.TAG_CHAT_TEMPLATE_SHA256)
_SHORT = 120  # longer values are recorded as a digest


def parse(text: str) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of ``X.Y.Z``, else None."""
    m = SEMVER_RE.match(str(text).strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def text(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def alias(v: tuple[int, int, int] | str) -> str:
    """The alias of a semver: ``1.2.0`` -> ``v1-2-0`` (MLflow aliases cannot hold dots)."""
    v = parse(v) if isinstance(v, str) else v
    return "v" + "-".join(map(str, v))


def is_alias(name: str) -> bool:
    """Whether ``name`` has the form of a semver alias (``v1-2-0``)."""
    return bool(_ALIAS_RE.match(str(name)))


def _short(value: str) -> str:
    value = str(value)
    return value if len(value) <= _SHORT else "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def recipe(run) -> dict[str, dict[str, str]]:
    """The recipe of a training run: ``{"major": {...}, "minor": {...}}`` from its params and lineage tags."""
    if run is None:
        return {"major": {}, "minor": {}}
    params, tags = run.data.params, run.data.tags
    major = {k: _short(tags[k]) for k in _MAJOR_TAGS if k in tags}
    major.update({f"param.{k}": _short(params[k]) for k in _MAJOR_PARAMS if k in params})
    minor = {k: _short(v) for k, v in params.items() if k not in OPERATIONAL_PARAMS and not k.startswith("sweep")}
    if C.TAG_DATASET_FINGERPRINT in tags:
        minor[C.TAG_DATASET_FINGERPRINT] = tags[C.TAG_DATASET_FINGERPRINT]
    return {"major": dict(sorted(major.items())), "minor": dict(sorted(minor.items()))}


def _recipe_of_version(mv: ModelVersion) -> dict[str, dict[str, str]]:
    """The recorded recipe, else what the lineage tags of a version registered before semvers tell."""
    try:
        return json.loads(mv.tags[TAG_RECIPE])
    except (KeyError, ValueError):
        tags = mv.tags
        return {"major": {k: tags[k] for k in _MAJOR_TAGS if k in tags},
                "minor": {k: v for k, v in tags.items()
                          if k == C.TAG_DATASET_FINGERPRINT or k.startswith(C.PARAM_TAG_PREFIX)}}


def _changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    def show(v: str | None) -> str:
        return "unset" if v is None else (v if len(v) <= 24 else v[:12] + "...")

    return [f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def bump(previous: tuple[int, int, int], old: dict, new: dict) -> tuple[tuple[int, int, int], str]:
    """The next semver after ``previous`` for a recipe change ``old`` -> ``new``, and why."""
    if changed := _changes(old.get("major", {}), new.get("major", {})):
        return (previous[0] + 1, 0, 0), "MAJOR: " + ", ".join(changed)
    if changed := _changes(old.get("minor", {}), new.get("minor", {})):
        return (previous[0], previous[1] + 1, 0), "MINOR: " + ", ".join(changed)
    return (previous[0], previous[1], previous[2] + 1), "PATCH: same recipe (a re-run)"


def _get(client: MlflowClient, name: str, version: int) -> ModelVersion | None:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if core.has_code(e, RESOURCE_DOES_NOT_EXIST):  # deleted: the predecessor is the one before
            return None
        raise


def derive(client: MlflowClient, name: str, version: int | str) -> tuple[tuple[int, int, int] | None, str]:
    """The semver of ``version`` and why, from the versions below it (exact lookups, no search filter).

    Walks down to the nearest version that carries a semver tag (or to version 1), then bumps upwards
    through the versions that carry none yet: those being registered at this moment by someone else,
    who computes the same values.
    """
    chain: list[ModelVersion] = []
    n = int(version)
    while n >= 1:
        mv = _get(client, name, n)
        n -= 1
        if mv is None:
            continue
        chain.append(mv)
        if parse(mv.tags.get(TAG_SEMVER, "")):
            break
    chain.reverse()
    current: tuple[int, int, int] | None = None
    reason, prev, prev_semver = "", None, FIRST
    for mv in chain:
        tagged = parse(mv.tags.get(TAG_SEMVER, ""))
        if tagged:
            current, reason = tagged, mv.tags.get(TAG_SEMVER_REASON, "")
        elif current is None:
            current, reason = FIRST, "first version"
        else:
            current, reason = bump(current, _recipe_of_version(prev), _recipe_of_version(mv))
            reason += f" (since version {prev.version}, {text(prev_semver)})"
        prev, prev_semver = mv, current
    return current, reason


def latest(client: MlflowClient, name: str) -> tuple[int, int, int] | None:
    """The highest semver of ``name`` (that of its highest version: semvers grow with version numbers)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if core.has_code(e, RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    numbers = [int(mv.version) for mv in model.latest_versions or []]  # the newest version of each stage
    return derive(client, name, max(numbers))[0] if numbers else None


def creation_tags(client: MlflowClient, name: str, run, override: str | None) -> dict[str, str]:
    """Tags written with the new version: its recipe and, for an override, the semver itself.

    Raises:
        MlflowException: INVALID_PARAMETER_VALUE for an override that is not ``X.Y.Z`` or not greater than
            every existing semver of ``name``; nothing is written.
    """
    tags = {TAG_RECIPE: json.dumps(recipe(run), sort_keys=True)}
    if override is None:
        return tags
    wanted = parse(override)
    if wanted is None:
        raise invalid_input(f"`semver` must be MAJOR.MINOR.PATCH (e.g. 1.2.0), got {override!r}.")
    if (top := latest(client, name)) is not None and wanted <= top:
        raise invalid_input(f"`semver` {override} is not greater than {text(top)}, the highest semver of model "
                            f"{name!r}; pass a higher one or leave it out to derive it.")
    return {**tags, TAG_SEMVER: text(wanted), TAG_SEMVER_REASON: "set by --semver (override)"}


def assign(client: MlflowClient, mv: ModelVersion) -> ModelVersion:
    """Tag a just-created version with its semver and reason, point its alias at it; the refreshed version.

    Raises:
        MlflowException: an override that a concurrent registration overtook (it is not greater than the
            semver of the version before it); the new version is deleted again, so nothing half-made stays.
    """
    name, number = mv.name, int(mv.version)
    if (given := parse(mv.tags.get(TAG_SEMVER, ""))) is not None:
        below = derive(client, name, number - 1)[0] if number > 1 else None
        if below is not None and given <= below:
            client.delete_model_version(name, str(number))
            raise invalid_input(f"`semver` {text(given)} is not greater than {text(below)}, registered meanwhile "
                                f"as the version before; registration of model {name!r} undone.")
        semver = given
    else:
        semver, reason = derive(client, name, number)
        client.set_model_version_tag(name, str(number), TAG_SEMVER_REASON, reason)
        client.set_model_version_tag(name, str(number), TAG_SEMVER, text(semver))
    client.set_registered_model_alias(name, alias(semver), str(number))
    _logger.info("Model %s version %s is %s", name, number, text(semver))
    return client.get_model_version(name, str(number))


def find(client: MlflowClient, name: str, semver: str) -> ModelVersion:
    """The version whose semver is ``semver``: through its alias (an exact lookup), else by its tag."""
    wanted = parse(semver)
    model = core.get_model(client, name)
    if (number := model.aliases.get(alias(wanted))) is not None:
        return client.get_model_version(name, str(number))
    top = max((int(mv.version) for mv in model.latest_versions or []), default=0)
    for n in range(top, 0, -1):  # a tag written before its alias, or an alias someone deleted
        mv = _get(client, name, n)
        if mv is not None and parse(mv.tags.get(TAG_SEMVER, "")) == wanted:
            return mv
    raise core.missing(f"Model {name!r} has no version with semver {semver}; the highest is "
                       f"{text(derive(client, name, top)[0]) if top else 'none'}.")
