"""Model Registry: lineage on register, stages mirrored to aliases, gated promotion, rollback, history.

MLflow deprecated stages (2.9) for aliases, yet users ask for stages. Each stage change here also
points the alias of the same lower-case name (``staging``, ``production``) at the version MLflow's
stage URI resolves to (the highest one in that stage), so ``models:/name/Production`` and
``models:/name@production`` always name the same version. Legal transitions (anything else, "to the
same stage" included, raises before any write)::

    from \\ to    None  Staging  Production  Archived
    None           -      yes       yes        yes
    Staging       yes      -        yes        yes
    Production     -      yes        -         yes      (leaving service is recorded as Archived)
    Archived       -      yes       yes         -       (revive only; the archive is never emptied)

Version tags: lineage from the training run (``smolora.run_id``, ``smolora.model_id``, the lineage tags
of :mod:`smolora_mlflow.constants`, ``smolora.param.<lora_*>``, ``smolora.metric.<name>``); one tag per
transition, ``smolora.transition.<17-digit epoch µs>.<8 hex>`` = JSON ``{"from", "to", "at", "reason",
"user"}`` (a fresh key per event, so concurrent writers never overwrite each other and key order is
time order); the last promotion decision, ``smolora.promotion.<field>``.

Example:
    >>> mv = register(run_id, "reviews-lora")             # doctest: +SKIP
    >>> transition("reviews-lora", mv.version, "Staging")  # doctest: +SKIP
    >>> promote("reviews-lora", mv.version).promoted       # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS

from smolora_mlflow import constants as C
from smolora_mlflow.constants import (
    METRIC_TAG_PREFIX,
    PARAM_TAG_PREFIX,
    PROMOTION_TAG_PREFIX,
    TAG_MODEL_ID,
    TAG_RUN_ID,
    TRANSITION_TAG_PREFIX,
)
from smolora_mlflow.models import manifest
from smolora_mlflow.refs import parse_model_ref
from smolora_mlflow.registry import core
from smolora_mlflow.registry.core import KEY_METRICS, LEGAL_TRANSITIONS, LINEAGE_PARAMS, STAGE_ALIASES, STAGES

__all__ = [
    "KEY_METRICS", "LEGAL_TRANSITIONS", "LINEAGE_PARAMS", "METRIC_TAG_PREFIX", "PARAM_TAG_PREFIX",
    "PROMOTION_TAG_PREFIX", "STAGES", "STAGE_ALIASES", "TAG_MODEL_ID", "TAG_RUN_ID", "TRANSITION_TAG_PREFIX",
    "PromotionDecision", "delete_alias", "format_versions", "history", "load", "promote", "register",
    "resolve", "rollback", "set_alias", "transition", "versions",
]

_logger = logging.getLogger(__name__)
_MAX_DESCRIPTION = 4000  # MLflow keeps at most 5000 characters
_clock = threading.Lock()
_last_us = 0


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`promote`, also stored as ``smolora.promotion.*`` tags on the candidate."""

    promoted: bool
    candidate_value: float | None
    incumbent_version: str | None
    incumbent_value: float | None
    reason: str
    metric: str = C.METRIC_EVAL_LOSS
    stage: str = "Production"
    forced: bool = False


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
             client: MlflowClient | None = None) -> ModelVersion:
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

    Returns:
        The new ModelVersion. MLflow's store assigns the number, so concurrent calls never collide.

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
                    **{str(k): str(v) for k, v in (tags or {}).items()}}
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
    _logger.info("Registered %s version %s from %s", name, mv.version, source)
    return mv


# --- transitions and their history ----------------------------------------------------------------

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


def _gate(metric: str, cand: float, incumbent, inc, higher_is_better: bool, min_delta: float, stage: str):
    if incumbent is None:
        return True, f"no version holds {stage}; {metric}={cand:.6g}"
    if inc is None:  # reachable with force only
        return False, f"version {incumbent.version} has no {metric} to compare with"
    gain = cand - inc if higher_is_better else inc - cand
    return gain > min_delta, (f"{metric} {cand:.6g} {'beats' if gain > min_delta else 'does not beat'} version "
                              f"{incumbent.version} ({inc:.6g}) by more than min_delta={min_delta:g} "
                              f"({'higher' if higher_is_better else 'lower'} is better)")


def promote(name: str, version: int | str, *, to: str = "Production", metric: str = C.METRIC_EVAL_LOSS,
            higher_is_better: bool | None = None, min_delta: float = 0.0, force: bool = False,
            reason: str | None = None, user: str | None = None,
            client: MlflowClient | None = None) -> PromotionDecision:
    """Move ``version`` to ``to`` only if it beats the stage's current holder on ``metric``.

    The metric is read from the version's ``smolora.metric.<metric>`` tag, else the latest value on its
    LoggedModel (an evaluation's metrics), else the latest value in its run. Task metrics (``exact_match``,
    ``contains_answer``, ``regex_match``) are better when higher, losses when lower; ``higher_is_better``
    overrides. Promotes if there is no holder or the candidate wins by more than ``min_delta``; ``force``
    (with a ``reason``) overrides. The decision and both values are tagged on the candidate either way.

    Example:
        >>> promote("reviews-lora", 4, min_delta=0.01).promoted  # doctest: +SKIP
        False
    """
    client = client or MlflowClient()
    target = core.canonical_stage(to)
    if target not in STAGE_ALIASES:
        raise core.bad(f"`to` must be Staging or Production, got {to!r}.")
    if force and not (reason or "").strip():
        raise core.bad("force=True overrides the metric gate and requires a `reason` saying why.")
    if min_delta < 0:
        raise core.bad(f"`min_delta` must be >= 0, got {min_delta!r}.")
    if higher_is_better is None:
        higher_is_better = core.higher_is_better(metric)
    mv = core.get_version(client, name, version)
    core.check_legal(mv, target)
    incumbent = core.stage_holder(core.all_versions(client, name), target)
    cand = core.metric_value(client, mv, metric)
    inc = core.metric_value(client, incumbent, metric) if incumbent else None
    for who, value in ((mv, cand), (incumbent, inc)):
        if who is not None and value is None and not (force and who is incumbent):
            raise core.bad(f"Version {who.version} of {name!r} has no metric {metric!r} (no tag "
                           f"{METRIC_TAG_PREFIX + metric!r}, nor in run {who.run_id}); pick another `metric`"
                           f"{' or force=True with a reason' if who is incumbent else ''}.")
    passed, why = _gate(metric, cand, incumbent, inc, higher_is_better, min_delta, target)
    forced = force and not passed
    decision = PromotionDecision(passed or forced, cand, str(incumbent.version) if incumbent else None, inc,
                                 f"forced: {reason} ({why})" if forced else why, metric, target, forced)
    user = user or core.default_user()
    if decision.promoted:
        _apply(client, mv, target, True, reason or why, user)
    fields = {"decision": "forced" if forced else ("promoted" if passed else "rejected"), "metric": metric,
              "stage": target, "candidate_value": cand, "incumbent_version": decision.incumbent_version,
              "incumbent_value": inc, "reason": decision.reason, "user": user, "at": _now()[1]}
    for key, value in fields.items():
        client.set_model_version_tag(name, str(mv.version), PROMOTION_TAG_PREFIX + key,
                                     "none" if value is None else str(value))
    return decision


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
        raise core.bad(f"Model {name!r} has no previous Production version to roll back to "
                       f"(versions that held Production: {', '.join(dict.fromkeys(entered)) or 'none'}).")
    why = reason or f"rollback from version {current.version if current else 'none'} to {previous}"
    return _apply(client, candidates[previous], "Production", True, why, user or core.default_user())


# --- aliases, loading, listing ---------------------------------------------------------------------

def _free_alias(alias: str) -> str:
    if not isinstance(alias, str) or alias.lower() in STAGE_ALIASES.values():
        raise core.bad(f"Alias {alias!r} mirrors a stage and is moved by transition(); pick another name, "
                       "e.g. 'champion'.")
    return alias


def set_alias(name: str, alias: str, version: int | str, *, client: MlflowClient | None = None) -> None:
    """Point ``alias`` at ``version``; ``staging``/``production`` are reserved for stages.

    Example:
        >>> set_alias("reviews-lora", "champion", 3)  # doctest: +SKIP
    """
    client = client or MlflowClient()
    mv = core.get_version(client, name, version)
    client.set_registered_model_alias(name, _free_alias(alias), str(mv.version))


def delete_alias(name: str, alias: str, *, client: MlflowClient | None = None) -> None:
    """Remove ``alias``; RESOURCE_DOES_NOT_EXIST if it is not set.

    Example:
        >>> delete_alias("reviews-lora", "champion")  # doctest: +SKIP
    """
    client = client or MlflowClient()
    aliases = core.get_model(client, name).aliases
    if _free_alias(alias) not in aliases:
        raise core.missing(f"Model {name!r} has no alias {alias!r}; its aliases: {', '.join(aliases) or 'none'}.")
    client.delete_registered_model_alias(name, alias)


def resolve(name: str, stage_or_alias: int | str = "production", *,
            client: MlflowClient | None = None) -> ModelVersion:
    """The version named by a stage (any case), an alias, a number or ``latest``.

    Example:
        >>> resolve("reviews-lora", "Production").version  # doctest: +SKIP
        '3'
    """
    client = client or MlflowClient()
    key = str(stage_or_alias)
    if key.isdigit():
        return core.get_version(client, name, key)
    model, versions = core.get_model(client, name), core.all_versions(client, name)
    stage = {s.lower(): s for s in STAGE_ALIASES}.get(key.lower())
    if key.lower() == "latest" and versions:
        return versions[-1]
    if stage and (holder := core.stage_holder(versions, stage)):
        return holder
    if not stage and key in model.aliases:
        return client.get_model_version(name, str(model.aliases[key]))
    raise core.missing(f"Model {name!r} has nothing at {stage_or_alias!r}; use a version "
                       f"({', '.join(str(v.version) for v in versions) or 'none'}), 'latest', Staging, "
                       f"Production or an alias ({', '.join(model.aliases) or 'none'}).")


def load(name: str, stage_or_alias: int | str = "production") -> mlflow.pyfunc.PyFuncModel:
    """Load a registered version as a pyfunc model; see :func:`resolve` for ``stage_or_alias``.

    Example:
        >>> load("reviews-lora", "champion").predict({"prompt": ["Great phone"]})  # doctest: +SKIP
    """
    local = manifest.download_checked(f"models:/{name}/{resolve(name, stage_or_alias).version}")
    return mlflow.pyfunc.load_model(local)


def versions(name: str, *, client: MlflowClient | None = None) -> pd.DataFrame:
    """One row per version: number, stage, aliases, run, creation time, description head, key metrics.

    Example:
        >>> versions("reviews-lora")[["version", "stage", "eval_loss"]]  # doctest: +SKIP
    """
    client = client or MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, v in core.get_model(client, name).aliases.items():
        aliases.setdefault(str(v), []).append(alias)
    columns = ["version", "stage", "aliases", "run_id", "created", "description", *KEY_METRICS, "promotion"]
    rows = [[int(mv.version), mv.current_stage, ",".join(sorted(aliases.get(str(mv.version), []))),
             mv.run_id or "", pd.Timestamp(mv.creation_timestamp, unit="ms", tz="UTC"),
             (mv.description or "").strip().split("\n", 1)[0][:60],
             *(float(mv.tags.get(METRIC_TAG_PREFIX + m, "nan")) for m in KEY_METRICS),
             mv.tags.get(PROMOTION_TAG_PREFIX + "decision", "")] for mv in core.all_versions(client, name)]
    return pd.DataFrame(rows, columns=columns)


def history(name: str, *, client: MlflowClient | None = None) -> pd.DataFrame:
    """Every recorded transition of every version, oldest first: version, from, to, at, reason, user.

    Example:
        >>> history("reviews-lora")[["version", "from", "to", "reason"]]  # doctest: +SKIP
    """
    client = client or MlflowClient()
    core.get_model(client, name)
    columns = ["version", "from", "to", "at", "reason", "user"]
    df = pd.DataFrame([[r.get(c) for c in columns] for r in core.history_rows(core.all_versions(client, name))],
                      columns=columns)
    df["at"] = pd.to_datetime(df["at"], utc=True)
    return df


def format_versions(df: pd.DataFrame) -> str:
    """:func:`versions` as a plain-text table for the CLI.

    Example:
        >>> print(format_versions(versions("reviews-lora")))  # doctest: +SKIP
    """
    if df.empty:
        return "(no versions)"
    out = df.copy()
    if "created" in out:
        out["created"] = out["created"].dt.strftime("%Y-%m-%d %H:%M")
    for col in out.select_dtypes("float").columns:
        out[col] = out[col].map(lambda x: "-" if pd.isna(x) else f"{x:.4g}")
    return out.fillna("-").replace("", "-").to_string(index=False)
