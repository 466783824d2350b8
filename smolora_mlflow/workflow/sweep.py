"""A hyperparameter search with Optuna: one parent run, each trial a nested training run, the best registered.

The search space is ``cfg.sweep_space`` (``field=choice:4|8|16``, ``int:4..32``, ``float:0..0.1``,
``log:1e-4..1e-2``), the objective ``cfg.sweep_metric`` of each trial (``eval_loss`` from its training, or a
task metric such as ``exact_match`` with ``task_eval``, from an evaluation nested beside it), minimised for
losses and maximised for task scores. The parent run records the space, every trial's value (step = trial
number) and the best; each trial run carries ``smolora.sweep_run_id`` and ``smolora.sweep_trial`` tags, so
:func:`smolora_mlflow.compare.sweep_trials` reads a sweep back. The best trial's model is logged into its
own run, registered when ``registered_model_name`` is set, and optionally promoted.

Optuna runs trials in this process, one after another. ``sweep_backend: ray`` runs them as Ray Tune trials
in parallel worker processes, on one machine or a Ray cluster (:mod:`~smolora_mlflow.workflow.sweep_ray`),
with the same record.

Example:
    >>> cfg = SmoloraConfig.from_yaml("configs/demo.yaml", {"eval_fraction": 0.1, "sweep_trials": 4,
    ...     "sweep_space": {"lora_r": "choice:4|8|16", "learning_rate": "log:1e-4..1e-2"}})
    >>> result = run_sweep(cfg)                       # doctest: +SKIP
    >>> result.best_params, result.best_value          # doctest: +SKIP
    ({'lora_r': 8, 'learning_rate': 0.0031}, 2.01)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import ConfigError, SmoloraConfig, coerce, field_names
from smolora_mlflow.workflow.runs import step_run

logger = logging.getLogger(__name__)

_KINDS = ("choice", "int", "float", "log")
_NOT_SEARCHABLE = {"sweep_space", "sweep_trials", "sweep_metric", "sweep_sampler", "tracking", "tracking_uri",
                   "experiment_name", "output_dir", "registered_model_name", "resume_from_checkpoint", "run_name",
                   "run_tags"}


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced."""

    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # number, run_id, params, value
    best_run_id: str | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    model_uri: str | None = None
    registered_version: str | None = None
    promotion: Any = None


def parse_space(space: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """``{field: (kind, values)}`` from ``sweep_space``; every bad entry is reported at once."""
    problems, out = [], {}
    if not space:
        problems.append("`sweep_space` is empty; give at least one field, e.g. lora_r=choice:4|8|16.")
    for name, spec in space.items():
        kind, _, body = str(spec).partition(":")
        if name not in field_names() or name in _NOT_SEARCHABLE:
            problems.append(f"`sweep_space` key {name!r} is not a searchable config field.")
            continue
        try:
            if kind == "choice":
                values = [coerce(name, v) for v in body.split("|") if v.strip()]
                if not values:
                    raise ValueError
            elif kind in ("int", "float", "log"):
                lo, hi = body.split("..")
                cast = int if kind == "int" else float
                values = (cast(float(lo)), cast(float(hi)))
                if not values[0] < values[1] or (kind == "log" and values[0] <= 0):
                    raise ValueError
            else:
                raise ValueError
        except (ValueError, ConfigError):
            problems.append(f"`sweep_space` entry {name}={spec!r} must be choice:A|B|C, int:LOW..HIGH, "
                            "float:LOW..HIGH or log:LOW..HIGH (0 < LOW < HIGH).")
            continue
        out[name] = (kind, values)
    if problems:
        raise ConfigError(problems)
    return out


def _suggest(trial, space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (kind, values) in space.items():
        if kind == "choice":
            params[name] = trial.suggest_categorical(name, values)
        elif kind == "int":
            params[name] = trial.suggest_int(name, *values)
        else:
            params[name] = trial.suggest_float(name, *values, log=kind == "log")
    return params


def sampler(cfg: SmoloraConfig):
    """The Optuna sampler of ``cfg.sweep_sampler``, seeded (both backends search with it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our runs say what each trial did
    return (optuna.samplers.RandomSampler(seed=cfg.seed) if cfg.sweep_sampler == "random"
            else optuna.samplers.TPESampler(seed=cfg.seed))


def _study(cfg: SmoloraConfig, maximize: bool):
    import optuna

    return optuna.create_study(direction="maximize" if maximize else "minimize", sampler=sampler(cfg))


def parent_params(cfg: SmoloraConfig, maximize: bool) -> dict[str, Any]:
    """What the sweep's parent run records about the search, whatever runs the trials."""
    return {"sweep_trials": cfg.sweep_trials, "sweep_metric": cfg.sweep_metric, "sweep_sampler": cfg.sweep_sampler,
            "sweep_direction": "max" if maximize else "min",
            **{f"sweep_space.{k}": v for k, v in cfg.sweep_space.items()}}


def run_sweep(cfg: SmoloraConfig, *, promote: bool = False, promote_options: dict[str, Any] | None = None,
              log_model_options: dict[str, Any] | None = None,
              on_step: Callable[[str], None] | None = None) -> SweepResult:
    """Search ``cfg.sweep_space`` for ``cfg.sweep_trials`` trials; log and register the best (see the module).

    Raises:
        ConfigError: a bad space, tracking off, or ``promote`` without ``registered_model_name``.
    """
    import mlflow

    from smolora_mlflow.registry.core import higher_is_better
    from smolora_mlflow.workflow import check_pipeline_config

    check_pipeline_config(cfg, promote=promote)
    space = parse_space(cfg.sweep_space)
    say = on_step or (lambda msg: logger.info("%s", msg))
    maximize = higher_is_better(cfg.sweep_metric)
    with step_run(cfg, cfg.run_name or "sweep", "sweep") as parent_id:
        result = SweepResult(parent_id)
        mlflow.log_params(parent_params(cfg, maximize))
        best: dict[str, Any] = {}
        bases: dict[str, Any] = {}  # base model -> loaded once for task_eval, whatever the trials change

        def record(number: int, params: dict[str, Any], run_id: str, value: float, lora=None) -> None:
            result.trials.append({"number": number, "run_id": run_id, "params": params, "value": value})
            if not best or (value > best["value"] if maximize else value < best["value"]):
                best.update(lora=lora, value=value, params=params, run_id=run_id, number=number)
            mlflow.log_metrics({cfg.sweep_metric: value, C.METRIC_SWEEP_BEST: best["value"]}, step=number)

        def objective(trial) -> float:
            params = _suggest(trial, space)
            say(f"trial {trial.number}: {params}")
            lora, value = _trial(cfg, parent_id, trial.number, params, bases)
            record(trial.number, params, lora.run_id, value, lora)
            return value

        if cfg.sweep_backend == "ray":
            from smolora_mlflow.workflow import sweep_ray

            mlflow.log_params(sweep_ray.run_params(cfg))
            trials = sweep_ray.run_trials(cfg, space, parent_id, maximize, sampler(cfg), _trial, say)
            for t in trials:
                record(t["number"], t["params"], t["run_id"], t["value"])
            best["lora"] = sweep_ray.trial_lora(cfg, next(t for t in trials if t["run_id"] == best["run_id"]))
        else:
            _study(cfg, maximize).optimize(objective, n_trials=cfg.sweep_trials)
        result.best_run_id, result.best_params, result.best_value = best["run_id"], best["params"], best["value"]
        mlflow.set_tag(C.TAG_SWEEP_BEST_RUN_ID, result.best_run_id)
        _publish_best(cfg, result, best["lora"], promote, promote_options or {}, log_model_options or {}, say)
    return result


def _trial(cfg: SmoloraConfig, parent_id: str, number: int, params: dict[str, Any], bases: dict[str, Any]):
    """Train one trial (a run nested under the sweep's) and read its objective value."""
    from smolora_mlflow.evaluation.loading import LoadedModel
    from smolora_mlflow.train import SmoLoRA
    from smolora_mlflow.workflow.evaluate import evaluate_run

    tags = {**cfg.run_tags, C.TAG_SWEEP_RUN_ID: parent_id, C.TAG_SWEEP_TRIAL: str(number)}
    trial_cfg = cfg.replace(**params, output_dir=f"{cfg.output_dir.rstrip('/')}/trial-{number}",
                            run_name=f"trial-{number}", run_tags=tags, registered_model_name=None)
    lora = SmoLoRA(config=trial_cfg)
    metrics = dict(lora.train().metrics)
    if cfg.sweep_metric not in metrics and cfg.task_eval:
        loaded = LoadedModel(lora.model.eval(), lora.tokenizer, str(lora.adapter_dir))
        from smolora_mlflow.workflow import task_eval

        if lora.config.base_model not in bases:
            bases[lora.config.base_model] = task_eval.load_base(lora.config)
        metrics.update(evaluate_run(None, lora.config, loaded=loaded, prepared=lora.data,
                                    base=bases[lora.config.base_model], run_name=f"trial-{number}-evaluate").metrics)
    if cfg.sweep_metric not in metrics:
        raise ConfigError([f"`sweep_metric` {cfg.sweep_metric!r} is not a metric of trial {number} (it has "
                           f"{sorted(metrics)}); set `eval_fraction` > 0 for eval_loss, or `task_eval` for "
                           "task scores."])
    return lora, float(metrics[cfg.sweep_metric])


def _publish_best(cfg, result: SweepResult, lora, promote: bool, promote_options: dict[str, Any],
                  log_model_options: dict[str, Any], say) -> None:
    import mlflow

    from smolora_mlflow.train.publish import log_trained_model

    name = cfg.registered_model_name
    say(f"best: trial run {result.best_run_id}, {cfg.sweep_metric}={result.best_value:.6g}"
        + (f"; registering it as a new version of {name}" if name else ""))
    tags = {C.METRIC_TAG_PREFIX + cfg.sweep_metric: repr(result.best_value), C.TAG_SWEEP_RUN_ID: result.parent_run_id}
    info = log_trained_model(lora, registered_model_name=name, registered_tags=tags, **log_model_options)
    result.model_uri = info.model_uri
    mlflow.set_tag(C.TAG_MODEL_URI, info.model_uri)
    if not name:
        return
    result.registered_version = str(info.registered_model_version)
    mlflow.set_tags({C.TAG_REGISTERED_MODEL: name, C.TAG_REGISTERED_VERSION: result.registered_version})
    if promote:
        from smolora_mlflow import registry

        options = {"to": "Production", "metric": cfg.sweep_metric, **promote_options}
        result.promotion = registry.promote(name, result.registered_version, **options)
        mlflow.set_tag(C.TAG_PROMOTION, "promoted" if result.promotion.promoted else "rejected")
