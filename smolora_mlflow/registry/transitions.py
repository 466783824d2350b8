"""Registering versions with lineage, stage transitions mirrored to aliases, their history, rollback.

See :mod:`smolora_mlflow.registry` for the transition table and the tags written.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS

from smolora_mlflow.constants import (
    TAG_MODEL_ID,
    TRANSITION_TAG_PREFIX,
)
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.models import manifest
from smolora_mlflow.refs import parse_model_ref
from smolora_mlflow.registry import core
from smolora_mlflow.registry import semver as semvers
from smolora_mlflow.registry.core import STAGE_ALIASES
from smolora_mlflow.registry.lookup import resolve

_logger = logging.getLogger(__name__)
_MAX_DESCRIPTION = 4000  # MLflow keeps at most 5000 characters
_clock = threading.Lock()
_last_us = 0


def _source(client: MlflowClient, ref: str) -> tuple[str, str | None, str | None, str]:
    """``(source, run_id, model_id, artifact_uri)``; ``models:/<name>/...`` names a registered version."""
    parsed = parse_model_ref(ref)
    if parsed.kind != "registered":
        return core.logged_source(client, parsed)
    mv = resolve(parsed.name, parsed.key, client=client)
    source = parse_model_ref(mv.source)  # a version MLflow registered itself has no TAG_MODEL_ID
    model_id = mv.model_id or mv.tags.get(TAG_MODEL_ID) or source.model_id
    return mv.source, mv.run_id, model_id, (client.get_logged_model(model_id).artifact_location
                                            if model_id else mv.source)


def register(model_uri_or_run_id: str, name: str, *, description: str | None = None,
             tags: dict[str, Any] | None = None, await_registration_for: int = 300,
             client: MlflowClient | None = None, semver: str | None = None) -> ModelVersion:
    """Register a logged model as a new version of ``name``, with lineage tags from its training run.

    Args:
        model_uri_or_run_id: ``runs:/<run_id>/<name>``, ``models:/<model_id>``, ``m-<model_id>``,
            ``models:/<name>/<version|stage>``, ``models:/<name>@<alias>``, or a run id (its only
            logged model, or the one named ``model``).
        name: Registered model; created, with a description, if missing.
        description: Version description; default: the model card (README.md) in the model's
            artifacts, else a summary of the run.
        tags: Extra version tags; they win over the lineage tags.
        await_registration_for: Seconds to wait for the version to be READY.
        client: MLflow client; default: one for the current tracking/registry URIs.
        semver: ``MAJOR.MINOR.PATCH`` for this version instead of the derived one (see
            :mod:`~smolora_mlflow.registry.semver`); greater than every existing one.

    Returns:
        The new ModelVersion, tagged with its semver. MLflow's store assigns the number, so concurrent
        calls never collide.

    Example:
        >>> register("runs:/0a1b.../model", "reviews-lora").tags["smolora.param.lora_r"]  # doctest: +SKIP
        '8'
    """
    client = client or MlflowClient()
    source, run_id, model_id, artifact_uri = _source(client, model_uri_or_run_id)
    run = client.get_run(run_id) if run_id else None
    path = model_uri_or_run_id.removeprefix("runs:/").strip("/").partition("/")[2] or None
    digest = manifest.for_registration(client, run, model_id, path)  # recorded when the model was logged
    version_tags = {**core.lineage_tags(run, model_id), **({manifest.TAG: digest} if digest else {}),
                    **{str(k): str(v) for k, v in (tags or {}).items()},
                    **semvers.creation_tags(client, name, run, semver)}
    text = description or core.model_card(client, artifact_uri) or core.summary(run, source)
    try:
        client.create_registered_model(name, description="LoRA fine-tunes of causal LMs managed by "
                                       "smolora-mlflow. Stages Staging/Production are mirrored to the aliases "
                                       "`staging`/`production`; versions carry lineage tags.")
    except MlflowException as e:
        if not core.has_code(e, RESOURCE_ALREADY_EXISTS, ALREADY_EXISTS):
            raise
    mv = client.create_model_version(name, source, run_id=run_id, tags=version_tags, model_id=model_id,
                                     description=text[:_MAX_DESCRIPTION], await_creation_for=await_registration_for)
    mv = semvers.assign(client, mv)
    _logger.info("Registered %s version %s from %s", name, mv.version, source)
    return mv


# --- transitions and their history --------------------------------------------------------------------

def _now() -> tuple[int, str]:
    global _last_us
    with _clock:  # strictly increasing in a process; the random key suffix separates processes
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        us = _last_us
    return us, datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="microseconds")


def _record(client, name: str, version, frm: str, to: str, reason: str | None, user: str) -> None:
    us, at = _now()
    value = json.dumps({"from": frm, "to": to, "at": at, "reason": reason, "user": user})
    client.set_model_version_tag(name, str(version), f"{TRANSITION_TAG_PREFIX}{us:017d}.{secrets.token_hex(4)}",
                                 value)


def _apply(client: MlflowClient, mv: ModelVersion, target: str, archive_existing: bool, reason: str | None,
           user: str) -> ModelVersion:
    name, version, current = mv.name, str(mv.version), mv.current_stage or "None"
    archive = archive_existing and target in STAGE_ALIASES
    before = {str(v.version) for v in core.all_versions(client, name) if archive and v.current_stage == target}
    with warnings.catch_warnings():
        # Stages are deprecated upstream but are this module's contract; the aliases below mirror them.
        warnings.simplefilter("ignore", FutureWarning)
        moved = client.transition_model_version_stage(name, version, target, archive_existing_versions=archive)
    after = core.all_versions(client, name)
    for other in after:  # archived by MLflow in the same write: give each its own history entry
        same_write = other.last_updated_timestamp == moved.last_updated_timestamp
        if archive and str(other.version) != version and other.current_stage == "Archived" and (
                str(other.version) in before or same_write):
            _record(client, name, other.version, target, "Archived", f"replaced by version {version}", user)
    _record(client, name, version, current, target, reason, user)
    for stage in sorted({current, target} & set(STAGE_ALIASES)):
        if holder := core.stage_holder(after, stage):
            client.set_registered_model_alias(name, STAGE_ALIASES[stage], str(holder.version))
        else:
            client.delete_registered_model_alias(name, STAGE_ALIASES[stage])
    return client.get_model_version(name, version)


def transition(name: str, version: int | str, stage: str | None, *, archive_existing: bool = True,
               reason: str | None = None, user: str | None = None,
               client: MlflowClient | None = None) -> ModelVersion:
    """Move a version to ``stage``, mirror the stage to its alias and record the event in the history.

    Args:
        name, version: The registered model and version.
        stage: ``None``/``Staging``/``Production``/``Archived``, case-insensitive; see the module table.
        archive_existing: For Staging/Production, archive the versions that held the stage.
        reason, user: Kept in the history; ``user`` defaults to the OS user.
        client: MLflow client.

    Raises:
        MlflowException: RESOURCE_DOES_NOT_EXIST for an unknown model or version,
            INVALID_PARAMETER_VALUE for an unknown stage or an illegal transition; nothing is written.

    Example:
        >>> transition("reviews-lora", 3, "Production", reason="beats v2").current_stage  # doctest: +SKIP
        'Production'
    """
    client = client or MlflowClient()
    target = core.canonical_stage(stage)
    mv = core.get_version(client, name, version)
    core.check_legal(mv, target)
    return _apply(client, mv, target, archive_existing, reason, user or core.default_user())


def rollback(name: str, *, reason: str | None = None, user: str | None = None,
             client: MlflowClient | None = None) -> ModelVersion:
    """Give Production back to the version that held it before the current one; archive the current one.

    The previous holder comes from the transition history, so rolling back twice rolls forward.

    Example:
        >>> rollback("reviews-lora", reason="v4 answers in the wrong language").version  # doctest: +SKIP
        '3'
    """
    client = client or MlflowClient()
    core.get_model(client, name)
    versions = core.all_versions(client, name)
    current = core.stage_holder(versions, "Production")
    entered = [str(r["version"]) for r in core.history_rows(versions) if r["to"] == "Production"]
    candidates = {str(mv.version): mv for mv in versions if mv.current_stage != "Production"}
    if (previous := next((v for v in reversed(entered) if v in candidates), None)) is None:
        raise invalid_input(f"Model {name!r} has no previous Production version to roll back to "
                       f"(versions that held Production: {', '.join(dict.fromkeys(entered)) or 'none'}).")
    why = reason or f"rollback from version {current.version if current else 'none'} to {previous}"
    return _apply(client, candidates[previous], "Production", True, why, user or core.default_user())
