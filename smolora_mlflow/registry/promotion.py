"""Gated promotion: a version takes a stage only if it beats the holder on a metric; the decision is tagged."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from mlflow import MlflowClient

from smolora_mlflow import constants as C
from smolora_mlflow.constants import (
    METRIC_TAG_PREFIX,
    PROMOTION_TAG_PREFIX,
)
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.registry import core
from smolora_mlflow.registry.core import STAGE_ALIASES
from smolora_mlflow.registry.journal import all_or_nothing
from smolora_mlflow.registry.transitions import _apply, _now

_logger = logging.getLogger(__name__)


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
        raise invalid_input(f"`to` must be Staging or Production, got {to!r}.")
    if force and not (reason or "").strip():
        raise invalid_input("force=True overrides the metric gate and requires a `reason` saying why.")
    if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
        raise invalid_input(f"`min_delta` must be a finite number >= 0, got {min_delta!r}; e.g. 0 or 0.01.")
    user = core.check_note("user", user or core.default_user())
    core.check_note("reason", reason)
    if higher_is_better is None:
        higher_is_better = core.higher_is_better(metric)
    mv = core.get_version(client, name, version)
    core.check_legal(mv, target)
    incumbent = core.stage_holder(core.all_versions(client, name), target)
    cand = core.metric_value(client, mv, metric)
    inc = core.metric_value(client, incumbent, metric) if incumbent else None
    for who, value in ((mv, cand), (incumbent, inc)):
        if who is not None and value is None and not (force and who is incumbent):
            raise invalid_input(f"Version {who.version} of {name!r} has no metric {metric!r} (no tag "
                           f"{METRIC_TAG_PREFIX + metric!r}, nor in run {who.run_id}); pick another `metric`"
                           f"{' or force=True with a reason' if who is incumbent else ''}.")
    passed, why = _gate(metric, cand, incumbent, inc, higher_is_better, min_delta, target)
    forced = force and not passed
    decision = PromotionDecision(passed or forced, cand, str(incumbent.version) if incumbent else None, inc,
                                 f"forced: {reason} ({why})" if forced else why, metric, target, forced)
    fields = {"decision": "forced" if forced else ("promoted" if passed else "rejected"), "metric": metric,
              "stage": target, "candidate_value": cand, "incumbent_version": decision.incumbent_version,
              "incumbent_value": inc, "reason": decision.reason, "user": user}
    tags = core.check_tags({PROMOTION_TAG_PREFIX + k: "none" if v is None else str(v) for k, v in fields.items()})
    with all_or_nothing(client, name) as journal:  # the stage move and the decision, or neither
        if decision.promoted:
            _apply(journal, mv, target, True, reason or why, user)
        for key, value in {**tags, PROMOTION_TAG_PREFIX + "at": _now()[1]}.items():
            journal.set_tag(str(mv.version), key, value)
    return decision
