"""The trials of a :mod:`~smolora_mlflow.workflow.sweep` run as Ray Tune trials, in parallel.

``sweep_backend: ray`` runs the same search (``sweep_space`` turned into a Tune search space, Optuna's
sampler searching through Ray Tune's ``OptunaSearch``) with ``sweep_workers`` trials at once, each in a Ray
worker process holding ``sweep_trial_cpus`` CPUs and ``sweep_trial_gpus`` GPUs. Each trial trains exactly
as an Optuna-backend trial does (:func:`~smolora_mlflow.workflow.sweep._trial`) into its own MLflow run,
nested under the sweep's parent run (tag ``mlflow.parentRunId``) with ``smolora.sweep_run_id`` and
``smolora.sweep_trial``; the parent records the space, each trial's value (step = trial number) and the best,
and the best trial's model is logged, registered and optionally promoted by this process.

Workers write to the tracking URI of this process (made absolute) and their trial's ``output_dir`` below
this sweep's. Without ``RAY_ADDRESS`` a local Ray instance is started (and stopped) with just the CPUs the
trials need; with it (``ray start --head`` on one machine, ``ray start --address ...`` on the others) the
trials spread over the cluster: point ``tracking_uri`` at a tracking server every machine reaches, and the
best trial's adapter is then fetched from its run's artifacts when this machine does not have it.

Example:
    >>> cfg = SmoloraConfig.from_yaml("configs/demo.yaml", {"sweep_backend": "ray", "sweep_workers": 2})
    >>> sweep.run_sweep(cfg).best_params                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig

logger = logging.getLogger(__name__)
_PARENT_TAG = "mlflow.parentRunId"  # what MLflow's own nested runs carry; the UI nests by it
# sweep._trial: (config, parent run id, trial number, params, base-model cache) -> (SmoLoRA, objective value)
TrainTrial = Callable[[SmoloraConfig, str, int, dict[str, Any], dict[str, Any]], tuple[Any, float]]


def _tune_space(space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for name, (kind, values) in space.items():
        if kind == "choice":
            out[name] = tune.choice(values)
        elif kind == "int":
            out[name] = tune.randint(values[0], values[1] + 1)  # Tune's upper bound is exclusive
        elif kind == "log":
            out[name] = tune.loguniform(*values)
        else:
            out[name] = tune.uniform(*values)
    return out


def _absolute_uri(uri: str) -> str:
    """A tracking URI a worker process resolves the same way, whatever its working folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return os.path.abspath(uri)
    return uri


def trial_name(trial) -> str:
    """Tune's ``trial_name_creator``: ``trial-<n>``, n counting from 0 in the order the searcher made the trials.

    The number cannot come from the trial id: with a searcher (``OptunaSearch``) Tune's ids are 8 random hex
    digits, whose trailing digits collide between trials (two trials then shared a number, an ``output_dir``
    and, at the end, the wrong run got the best model). Tune's search generator starts each trial's
    ``experiment_tag`` with its own counter (``"3_lora_r=4,..."``, from 1); the name is made once, in the
    driver, and the worker reads it back with ``tune.get_context().get_trial_name()``.
    """
    counter, _, _ = str(trial.experiment_tag).partition("_")
    if not counter.isdigit():
        raise RuntimeError(f"unexpected Ray Tune experiment_tag {trial.experiment_tag!r}: it should start with "
                           "the trial counter (checked against Ray 2.60's SearchGenerator).")
    return f"trial-{int(counter) - 1}"


def trial_number(name: str) -> int:
    """The number in a name made by :func:`trial_name`."""
    m = re.fullmatch(r"trial-(\d+)", name)
    if m is None:
        raise RuntimeError(f"Ray Tune trial name {name!r} was not made by sweep_ray.trial_name.")
    return int(m[1])


def _ray_trial(params: dict[str, Any], *, base: dict[str, Any], parent_id: str, experiment_id: str,
               tracking_uri: str, train_trial: TrainTrial) -> None:
    """One Tune trial, in a worker process: train like an Optuna trial and report the objective."""
    import mlflow
    from ray import tune

    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id  # the parent's, when the name leaves it to MLflow
    cfg = SmoloraConfig.from_dict(base)
    cfg = cfg.replace(run_tags={**cfg.run_tags, _PARENT_TAG: parent_id})
    number = trial_number(tune.get_context().get_trial_name())
    lora, value = train_trial(cfg, parent_id, number, params, {})
    tune.report({cfg.sweep_metric: value, "run_id": lora.run_id, "number": number,
                 "prompt_format": lora.config.prompt_format})


def _init_ray(cfg: SmoloraConfig, env: dict[str, str]) -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local instance sized for the trials; whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING,
                               "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):  # a local instance; a cluster has its own resources
        gpus = math.ceil(cfg.sweep_workers * cfg.sweep_trial_gpus)
        options.update(num_cpus=max(1, math.ceil(cfg.sweep_workers * cfg.sweep_trial_cpus)), num_gpus=gpus or None,
                       include_dashboard=False)
    ray.init(**options)
    return True


def _worker_env() -> dict[str, str]:
    """What a worker needs to import this package and run quietly, on this machine or another."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "SMOLORA_PROGRESS": "0",
           "RAY_CHDIR_TO_TRIAL_DIR": "0", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "SMOLORA_CACHE", "HF_HOME", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def run_params(cfg: SmoloraConfig) -> dict[str, Any]:
    """What the sweep's parent run records about the Ray backend."""
    return {"sweep_backend": "ray", "sweep_workers": cfg.sweep_workers, "sweep_trial_cpus": cfg.sweep_trial_cpus,
            "sweep_trial_gpus": cfg.sweep_trial_gpus}


def run_trials(cfg: SmoloraConfig, space: dict[str, tuple[str, Any]], parent_id: str, maximize: bool, sampler,
               train_trial: TrainTrial, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``cfg.sweep_trials`` trials on Ray Tune, ``cfg.sweep_workers`` at a time; their records by number.

    Each record: ``number``, ``run_id``, ``params``, ``value``, ``prompt_format``, ``output_dir``.

    Raises:
        ImportError: Ray Tune is not installed. RuntimeError: a trial failed.
    """
    import mlflow

    try:
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise ImportError("`sweep_backend: ray` needs Ray Tune: pip install 'smolora-mlflow[ray]'.") from e
    base = cfg.replace(output_dir=os.path.abspath(cfg.output_dir))
    started = _init_ray(cfg, _worker_env())
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_ray_trial, base=base.to_dict(), parent_id=parent_id,
                                 experiment_id=mlflow.active_run().info.experiment_id,
                                 tracking_uri=_absolute_uri(mlflow.get_tracking_uri()), train_trial=train_trial),
            {"cpu": cfg.sweep_trial_cpus, "gpu": cfg.sweep_trial_gpus})
        searcher = OptunaSearch(metric=cfg.sweep_metric, mode="max" if maximize else "min", sampler=sampler)
        say(f"running {cfg.sweep_trials} trials on Ray Tune, {cfg.sweep_workers} at a time")
        grid = tune.Tuner(
            trainable, param_space=_tune_space(space),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=cfg.sweep_trials,
                                        max_concurrent_trials=cfg.sweep_workers, reuse_actors=True,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=f"sweep-{parent_id}", verbose=0,
                                      storage_path=str(Path(base.output_dir) / "ray_results")),
        ).fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    if failed := [r for r in grid if r.error is not None]:
        raise RuntimeError(f"{len(failed)} of {len(grid)} sweep trials failed; the first: {failed[0].error}")
    trials = []
    for r in sorted(grid, key=lambda r: r.metrics["number"]):
        m, number = r.metrics, int(r.metrics["number"])
        trials.append({"number": number, "run_id": m["run_id"], "params": dict(r.config),
                       "value": float(m[cfg.sweep_metric]), "prompt_format": m["prompt_format"],
                       "output_dir": f"{base.output_dir.rstrip('/')}/trial-{number}"})
        say(f"trial {number}: {dict(r.config)} -> {cfg.sweep_metric}={trials[-1]['value']:.6g}")
    return trials


def trial_lora(cfg: SmoloraConfig, trial: dict[str, Any]):
    """A SmoLoRA for a trial as its worker trained it; its adapter is fetched from the run if not on this machine."""
    import mlflow

    from smolora_mlflow.train import SmoLoRA

    number = trial["number"]
    trial_cfg = cfg.replace(**trial["params"], output_dir=trial["output_dir"], run_name=f"trial-{number}",
                            registered_model_name=None, prompt_format=trial["prompt_format"])
    lora = SmoLoRA(config=trial_cfg)
    lora.run_id = trial["run_id"]
    if not (lora.adapter_dir / "adapter_config.json").is_file():  # trained on another machine of the cluster
        mlflow.artifacts.download_artifacts(f"runs:/{trial['run_id']}/{C.ARTIFACT_ADAPTER}",
                                            dst_path=str(lora.output_dir))
    return lora
