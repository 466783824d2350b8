"""The one place that chains train -> merge -> evaluate -> log -> register -> promote.

Every step is one call that hands a plain value (a folder, a URI, a run id, a version) to the next. The
pipeline runs under one parent MLflow run (the one ``mlflow run`` created, else a new one); training and
evaluation are its nested runs, the model is logged into the training run, and the parent records what
came out (model URI, registered version, promotion decision, metrics). No printing here: callers pass
``on_step`` to hear about progress.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> from smolora_mlflow.workflow import run_pipeline
    >>> cfg = SmoloraConfig.from_yaml("configs/demo.yaml", {"max_steps": 8})
    >>> result = run_pipeline(cfg, promote=True)                  # doctest: +SKIP
    >>> result.model_uri, result.registered_version, result.promoted  # doctest: +SKIP
    ('models:/m-3f2a...', '1', True)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import ConfigError, SmoloraConfig
from smolora_mlflow.evaluation import TAG_TRAIN_RUN_ID

logger = logging.getLogger(__name__)

TAG_EVAL_RUN_ID = "smolora.eval_run_id"
TAG_MODEL_URI = "smolora.model_uri"
TAG_REGISTERED_MODEL = "smolora.registered_model"
TAG_REGISTERED_VERSION = "smolora.registered_version"
TAG_PROMOTION = "smolora.promotion"
TAG_EVALUATED_MODEL = "smolora.evaluated_model"
TAG_EVAL_SPLIT = "smolora.eval_split"
TAG_STEP = "smolora.step"

StepCallback = Callable[[str], None]


@dataclass
class EvalResult:
    """What an evaluation measured, and the run that records it."""

    run_id: str | None
    metrics: dict[str, float]
    generations: list[dict[str, str]] = field(default_factory=list)
    split: str = ""


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    parent_run_id: str | None
    train_run_id: str | None
    eval_run_id: str | None
    model_uri: str | None
    registered_model_name: str | None = None
    registered_version: str | None = None
    promotion: Any = None  # registry.PromotionDecision
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    merged_dir: Path | None = None

    @property
    def promoted(self) -> bool:
        return bool(self.promotion is not None and self.promotion.promoted)


# ----------------------------------------------------------------------------------------------------
# runs


def _experiment_id(cfg: SmoloraConfig) -> str | None:
    """The configured experiment, created if needed; None lets MLflow choose (``mlflow run``'s experiment).

    As in :mod:`smolora_mlflow.tracking`: not ``mlflow.set_experiment``, which exports MLFLOW_EXPERIMENT_ID to
    the whole process (and its children), so a later run with another ``experiment_name`` would land here.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    default = SmoloraConfig.__dataclass_fields__["experiment_name"].default
    if cfg.experiment_name == default and (os.environ.get("MLFLOW_EXPERIMENT_ID")
                                           or os.environ.get("MLFLOW_EXPERIMENT_NAME")):
        return None
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is None:
        try:
            return client.create_experiment(cfg.experiment_name)
        except MlflowException as e:  # created meanwhile by another process
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(cfg.experiment_name)
    return exp.experiment_id


@contextlib.contextmanager
def step_run(cfg: SmoloraConfig, run_name: str, step: str) -> Iterator[str]:
    """An MLflow run for one step: nested under the active run, the run ``mlflow run`` made, or a new run in
    ``cfg.experiment_name``.

    It ends FINISHED, or FAILED (KILLED on Ctrl-C) with the error tagged, and re-raises.
    """
    import mlflow

    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    active = mlflow.active_run()
    if active is not None:
        run = mlflow.start_run(run_name=run_name, nested=True, experiment_id=active.info.experiment_id)
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # the run `mlflow run` created: keep its name
    else:
        run = mlflow.start_run(run_name=run_name, experiment_id=_experiment_id(cfg))
    mlflow.set_tag(TAG_STEP, step)
    try:
        yield run.info.run_id
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag("smolora.error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")


# ----------------------------------------------------------------------------------------------------
# evaluate


def evaluate_run(model_ref: str | os.PathLike | None, cfg: SmoloraConfig, *, dataset: Any = None,
                 loaded: Any = None, run_name: str | None = None) -> EvalResult:
    """Evaluate a model and record it in an MLflow run (nested when a run is active).

    Args:
        model_ref: a run id, ``runs:/``/``models:/`` URI or a local model folder (see
            :func:`smolora_mlflow.evaluation.load_for_inference`); None with ``loaded``.
        cfg: which dataset, split, ``max_length``, batch size and sample prompts to use.
        dataset: score all rows of this dataset (a path or an in-memory dataset) instead of the held-out
            split of ``cfg.dataset``.
        loaded: an :class:`~smolora_mlflow.evaluation.LoadedModel` already in memory.
        run_name: name of the evaluation run.

    Returns:
        The metrics (``eval_loss``, ``eval_perplexity``, ``eval_tokens``, ``eval_rows``), the sample
        generations and the run id (None when ``cfg.tracking`` is off).
    """
    from smolora_mlflow import evaluation as ev

    split = ev.eval_split(cfg, dataset)  # data problems surface before a model loads or a run starts
    loaded = loaded or ev.load_for_inference(model_ref, device=cfg.device)
    source = str(model_ref) if model_ref is not None else loaded.source
    if not cfg.tracking:
        metrics, gens = _measure(loaded, split, cfg)
        return EvalResult(None, metrics, gens, split.description)
    import mlflow

    from smolora_mlflow.data import mlflow_dataset

    with step_run(cfg, run_name or f"evaluate-{Path(source.rstrip('/')).name[:40]}", "evaluate") as run_id:
        mlflow.set_tags({TAG_EVALUATED_MODEL: source, TAG_EVAL_SPLIT: split.description,
                         C.TAG_DATASET: split.data.source, C.TAG_DATASET_FINGERPRINT: split.data.fingerprint})
        _log_new_params(run_id, {"max_length": cfg.max_length, "eval_batch_size": cfg.per_device_train_batch_size,
                                 "sample_max_new_tokens": cfg.sample_max_new_tokens})
        mlflow.log_input(mlflow_dataset(split.dataset, source=split.data.source, name=split.data.name),
                         context="evaluation")
        metrics, gens = _measure(loaded, split, cfg)
        mlflow.log_metrics(metrics)
        if gens:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(gens), artifact_file=C.ARTIFACT_GENERATIONS)
    return EvalResult(run_id, metrics, gens, split.description)


def _log_new_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params the run does not hold yet (`mlflow run -P` may have logged some with its own spelling)."""
    import mlflow

    held = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in held})


def _measure(loaded, split, cfg: SmoloraConfig) -> tuple[dict[str, float], list[dict[str, str]]]:
    from smolora_mlflow import evaluation as ev

    metrics = ev.eval_loss(loaded.model, loaded.tokenizer, split.rows, split.format, max_length=cfg.max_length,
                           batch_size=cfg.per_device_train_batch_size)
    gens = ev.sample_generations(loaded.model, loaded.tokenizer, cfg.sample_prompts, cfg.sample_max_new_tokens)
    return metrics, gens


def evaluate(model_uri_or_run_id: str | os.PathLike, cfg: SmoloraConfig, *, dataset: Any = None) -> dict[str, float]:
    """Eval loss and perplexity of a model on the held-out split of ``cfg.dataset`` (or on ``dataset``),
    logged with sample generations to an MLflow run.

    Example:
        >>> evaluate("models:/smolora-demo/1", SmoloraConfig.from_yaml("configs/demo.yaml"))  # doctest: +SKIP
        {'eval_loss': 2.1, 'eval_perplexity': 8.2, 'eval_tokens': 790.0, 'eval_rows': 40.0}
    """
    return evaluate_run(model_uri_or_run_id, cfg, dataset=dataset).metrics


# ----------------------------------------------------------------------------------------------------
# log


def _lineage(lora) -> dict[str, Any]:
    from smolora_mlflow.merge import read_adapter_base

    info = dict(lora.base_info or {})
    if not info.get("sha256") and (Path(lora.adapter_dir) / "adapter_config.json").is_file():
        info = {**read_adapter_base(lora.adapter_dir), **{k: v for k, v in info.items() if v}}
    cfg = lora.config
    return {
        "base_model": cfg.base_model,
        "base_model_revision": cfg.base_model_revision or info.get("revision"),
        "base_model_sha256": info.get("sha256"),
        "lora_config": {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                        "target_modules": list(cfg.lora_target_modules), "bias": cfg.lora_bias},
    }


def _run_model_card(run_id: str) -> str | None:
    import mlflow

    names = {f.path for f in mlflow.MlflowClient().list_artifacts(run_id)}
    if C.ARTIFACT_MODEL_CARD not in names:
        return None
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{C.ARTIFACT_MODEL_CARD}")


def _ensure_merged(lora) -> Path:
    """The merged folder of ``lora``, merging first when it is missing or older than the adapter."""
    merged, adapter = Path(lora.merged_dir), Path(lora.adapter_dir)
    weights = sorted(merged.glob("*.safetensors"))
    adapter_file = adapter / "adapter_model.safetensors"
    fresh = (merged / "config.json").is_file() and weights and (
        not adapter_file.is_file() or min(w.stat().st_mtime for w in weights) >= adapter_file.stat().st_mtime)
    return merged if fresh else lora.save()


def log_trained_model(lora, name: str = "model", mode: str = "merged", registered_model_name: str | None = None,
                      **kwargs: Any):
    """Log a trained :class:`~smolora_mlflow.train.SmoLoRA` with the ``smolora`` flavor, with lineage.

    Merges first if needed (``mode="merged"``), logs into the training run (``lora.run_id``; ``run_id=``
    overrides), records the base model id and weights hash, the LoRA settings, the training run and the
    run's README.md as the model card, and registers the model (with lineage tags) when
    ``registered_model_name`` is given.

    Args:
        lora: a SmoLoRA that has trained (its adapter folder exists).
        name: the logged model's name.
        mode: ``merged`` (full weights) or ``adapter`` (LoRA weights plus a reference to the base).
        registered_model_name: register the logged model as a new version of this name.
        **kwargs: any other argument of :func:`smolora_mlflow.flavor.log_model` (``pip_requirements``,
            ``input_example``, ``tags``...); they override the lineage computed here.

    Returns:
        MLflow's ModelInfo (``registered_model_version`` set when registered).

    Example:
        >>> info = log_trained_model(lora, registered_model_name="reviews")  # doctest: +SKIP
        >>> info.model_uri                                                   # doctest: +SKIP
        'models:/m-...'
    """
    from smolora_mlflow import flavor

    if mode not in ("merged", "adapter"):
        raise ValueError(f"`mode` must be 'merged' or 'adapter', got {mode!r}.")
    adapter = Path(lora.adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise RuntimeError(f"no adapter at `{adapter}`; call train() before logging the model.")
    run_id = kwargs.pop("run_id", None) or lora.run_id
    values: dict[str, Any] = {**_lineage(lora), "training_run_id": run_id, "run_id": run_id}
    if run_id and "model_card" not in kwargs:
        values["model_card"] = _run_model_card(run_id)
    values.update(kwargs)
    if mode == "merged":
        info = flavor.log_model(name, model_dir=str(_ensure_merged(lora)), mode="merged", **values)
    else:
        info = flavor.log_model(name, mode="adapter", adapter_dir=str(adapter), **values)
    if registered_model_name:
        from smolora_mlflow import registry

        mv = registry.register(info.model_uri, registered_model_name)
        info.registered_model_version = int(mv.version)
    return info


# ----------------------------------------------------------------------------------------------------
# the pipeline


def check_pipeline_config(cfg: SmoloraConfig, *, promote: bool = False) -> None:
    """Refuse a pipeline that cannot finish, before anything runs."""
    problems = []
    if not cfg.tracking:
        problems.append("`tracking` must be true for the pipeline: it logs and registers the model in MLflow.")
    if promote and not cfg.registered_model_name:
        problems.append("`promote` needs a `registered_model_name` to register the version it promotes.")
    if problems:
        raise ConfigError(problems)


def run_pipeline(cfg: SmoloraConfig, *, promote: bool = False, dataset: Any = None, eval_dataset: Any = None,
                 mode: str = "merged", promote_options: dict[str, Any] | None = None,
                 log_model_options: dict[str, Any] | None = None,
                 on_step: StepCallback | None = None) -> PipelineResult:
    """Train, merge, evaluate, log, register (when ``cfg.registered_model_name`` is set) and promote.

    Args:
        cfg: the run config.
        promote: promote the new version with the registry's metric gate.
        dataset: an in-memory training dataset that replaces ``cfg.dataset``.
        eval_dataset: evaluate on all rows of this dataset instead of the held-out split.
        mode: log the ``merged`` model or only the ``adapter``.
        promote_options: keyword arguments of :func:`smolora_mlflow.registry.promote` (``to``, ``metric``,
            ``min_delta``, ``higher_is_better``, ``force``, ``reason``).
        log_model_options: keyword arguments of :func:`log_trained_model` (e.g. ``pip_requirements``).
        on_step: called with a short message as each step starts.

    Returns:
        A :class:`PipelineResult`.
    """
    check_pipeline_config(cfg, promote=promote)
    say = on_step or (lambda msg: logger.info("%s", msg))
    with step_run(cfg, cfg.run_name or "pipeline", "pipeline") as parent_id:
        result = PipelineResult(parent_id, None, None, None, cfg.registered_model_name)
        _pipeline_steps(cfg, result, promote=promote, dataset=dataset, eval_dataset=eval_dataset, mode=mode,
                        promote_options=promote_options or {}, log_model_options=log_model_options or {}, say=say)
    return result


def _pipeline_steps(cfg, result: PipelineResult, *, promote, dataset, eval_dataset, mode, promote_options,
                    log_model_options, say: StepCallback) -> None:
    import mlflow

    from smolora_mlflow.evaluation import LoadedModel
    from smolora_mlflow.train import SmoLoRA

    mlflow.log_text(cfg.to_yaml(), C.ARTIFACT_CONFIG)
    say("train: fine-tuning the LoRA adapter")
    lora = SmoLoRA(dataset=dataset, config=cfg)
    trained = lora.train()
    result.train_run_id, result.adapter_dir = trained.run_id, trained.adapter_dir
    mlflow.set_tag(TAG_TRAIN_RUN_ID, trained.run_id)
    result.metrics.update({k: float(v) for k, v in trained.metrics.items() if k in ("train_loss", "train_runtime")})
    if mode == "merged":
        say("merge: merging the adapter into the base model")
        result.merged_dir = lora.save()
    say("evaluate: eval loss, perplexity and sample generations")
    evaluated = evaluate_run(None, cfg, dataset=eval_dataset, loaded=LoadedModel(
        lora.model, lora.tokenizer, str(result.merged_dir or result.adapter_dir)), run_name="evaluate")
    result.eval_run_id = evaluated.run_id
    result.metrics.update(evaluated.metrics)
    mlflow.set_tag(TAG_EVAL_RUN_ID, evaluated.run_id)
    mlflow.log_metrics(result.metrics)
    say(f"log: logging the {mode} model with the smolora flavor")
    info = log_trained_model(lora, mode=mode, **log_model_options)
    result.model_uri = info.model_uri
    mlflow.set_tag(TAG_MODEL_URI, info.model_uri)
    if not cfg.registered_model_name:
        return
    _register_and_promote(cfg, result, evaluated, promote=promote, promote_options=promote_options, say=say)


def _register_and_promote(cfg, result: PipelineResult, evaluated: EvalResult, *, promote, promote_options,
                          say: StepCallback) -> None:
    import mlflow

    from smolora_mlflow import registry

    say(f"register: new version of {cfg.registered_model_name}")
    # The version carries the metrics of this evaluation, so every version is gated on the same measure.
    tags = {registry.METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in evaluated.metrics.items()
            if k in ("eval_loss", "eval_perplexity")}
    tags.update({TAG_EVAL_RUN_ID: evaluated.run_id or "", "smolora.pipeline_run_id": result.parent_run_id or ""})
    mv = registry.register(result.model_uri, cfg.registered_model_name, tags=tags)
    result.registered_version = str(mv.version)
    mlflow.set_tags({TAG_REGISTERED_MODEL: cfg.registered_model_name, TAG_REGISTERED_VERSION: mv.version})
    if not promote:
        return
    options = {"to": "Production", **promote_options}
    say(f"promote: version {mv.version} to {options['to']} if it beats the current one")
    decision = registry.promote(cfg.registered_model_name, mv.version, **options)
    result.promotion = decision
    mlflow.set_tags({TAG_PROMOTION: "promoted" if decision.promoted else "rejected",
                     f"{TAG_PROMOTION}.reason": decision.reason[:5000]})
