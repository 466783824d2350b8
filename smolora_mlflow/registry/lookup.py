"""Aliases, resolving a name + stage/alias/version, loading, and listing versions and their history."""

from __future__ import annotations

import logging

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from smolora_mlflow.constants import (
    METRIC_TAG_PREFIX,
    PROMOTION_TAG_PREFIX,
)
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.models import integrity
from smolora_mlflow.registry import core
from smolora_mlflow.registry import semver as semvers
from smolora_mlflow.registry.core import KEY_METRICS, STAGE_ALIASES

_logger = logging.getLogger(__name__)



def _free_alias(alias: str) -> str:
    if not isinstance(alias, str) or alias.lower() in STAGE_ALIASES.values():
        raise invalid_input(f"Alias {alias!r} mirrors a stage and is moved by transition(); pick another name, "
                       "e.g. 'champion'.")
    if semvers.is_alias(alias):
        raise invalid_input(f"Alias {alias!r} names a semantic version, set by register(); pick another name, "
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
    """The version named by a stage (any case), an alias, a number, a semver (``1.2.0``) or ``latest``.

    Example:
        >>> resolve("reviews-lora", "Production").version  # doctest: +SKIP
        '3'
    """
    client = client or MlflowClient()
    key = str(stage_or_alias)
    if key.isdigit():
        return core.get_version(client, name, key)
    if semvers.parse(key):  # 1.2.0: what the alias v1-2-0 names
        return semvers.find(client, name, key)
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

    A smolora model passes the integrity gate (:mod:`smolora_mlflow.models.integrity`) before MLflow's
    loader sees it; a model of another flavor is loaded as ``mlflow.pyfunc.load_model`` would.

    Example:
        >>> load("reviews-lora", "champion").predict({"prompt": ["Great phone"]})  # doctest: +SKIP
    """
    vm = integrity.open_verified(f"models:/{name}/{resolve(name, stage_or_alias).version}", other_flavors=True)
    with integrity.handed_to_loader(vm):  # the flavor's loader takes this folder as checked, not again
        return mlflow.pyfunc.load_model(str(vm.root))


def versions(name: str, *, client: MlflowClient | None = None) -> pd.DataFrame:
    """One row per version: number, semver, stage, aliases, run, creation time, description head, key metrics.

    Example:
        >>> versions("reviews-lora")[["version", "stage", "eval_loss"]]  # doctest: +SKIP
    """
    client = client or MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, v in core.get_model(client, name).aliases.items():
        if not semvers.is_alias(alias):  # the semver column shows it
            aliases.setdefault(str(v), []).append(alias)
    columns = ["version", "semver", "stage", "aliases", "run_id", "created", "description", *KEY_METRICS, "promotion"]
    rows = [[int(mv.version), mv.tags.get(semvers.TAG_SEMVER, ""), mv.current_stage,
             ",".join(sorted(aliases.get(str(mv.version), []))),
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
