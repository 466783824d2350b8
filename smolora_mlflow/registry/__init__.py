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
time order); the last promotion decision, ``smolora.promotion.<field>``; the semantic version
``smolora.semver`` (``MAJOR.MINOR.PATCH``, also the alias ``v<MAJOR>-<MINOR>-<PATCH>``), its reason
``smolora.semver_reason`` and the training recipe it was derived from, ``smolora.recipe`` (see
:mod:`smolora_mlflow.registry.semver`).

Example:
    >>> mv = register(run_id, "reviews-lora")             # doctest: +SKIP
    >>> transition("reviews-lora", mv.version, "Staging")  # doctest: +SKIP
    >>> promote("reviews-lora", mv.version).promoted       # doctest: +SKIP
    True
"""

from __future__ import annotations

from smolora_mlflow.constants import (
    METRIC_TAG_PREFIX,
    PARAM_TAG_PREFIX,
    PROMOTION_TAG_PREFIX,
    TAG_MODEL_ID,
    TAG_RUN_ID,
    TRANSITION_TAG_PREFIX,
)
from smolora_mlflow.registry.core import KEY_METRICS, LEGAL_TRANSITIONS, LINEAGE_PARAMS, STAGE_ALIASES, STAGES
from smolora_mlflow.registry.lookup import delete_alias, format_versions, history, load, resolve, set_alias, versions
from smolora_mlflow.registry.promotion import PromotionDecision, promote
from smolora_mlflow.registry.semver import TAG_SEMVER, TAG_SEMVER_REASON
from smolora_mlflow.registry.semver import alias as semver_alias
from smolora_mlflow.registry.transitions import register, rollback, transition

__all__ = [
    "KEY_METRICS", "LEGAL_TRANSITIONS", "LINEAGE_PARAMS", "METRIC_TAG_PREFIX", "PARAM_TAG_PREFIX",
    "PROMOTION_TAG_PREFIX", "STAGES", "STAGE_ALIASES", "TAG_MODEL_ID", "TAG_RUN_ID", "TAG_SEMVER", "TAG_SEMVER_REASON",
    "TRANSITION_TAG_PREFIX",
    "PromotionDecision", "delete_alias", "format_versions", "history", "load", "promote", "register",
    "resolve", "rollback", "semver_alias", "set_alias", "transition", "versions",
]
