"""Publish a trained model: log it with the ``smolora`` flavor into its training run, with lineage, and
register it. ``smolora train``, ``smolora run`` and :meth:`SmoLoRA.log_model` all go through here.

Example:
    >>> info = log_trained_model(lora, registered_model_name="reviews")  # doctest: +SKIP
    >>> info.registered_model_version                                   # doctest: +SKIP
    1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.models.adapters import read_adapter_base


def lineage(lora) -> dict[str, Any]:
    """The base model, its hash, the LoRA settings and the prompt format of a trained SmoLoRA."""
    info = dict(lora.base_info or {})
    if not info.get("sha256") and (Path(lora.adapter_dir) / "adapter_config.json").is_file():
        info = {**read_adapter_base(lora.adapter_dir), **{k: v for k, v in info.items() if v}}
    cfg = lora.config
    return {
        "base_model": cfg.base_model,
        "base_model_revision": cfg.base_model_revision or info.get("revision"),
        "base_model_sha256": info.get("sha256"),
        # train() resolved `auto`; a SmoLoRA that never trained here serves prompts as they come.
        "prompt_format": cfg.prompt_format if cfg.prompt_format in ("chat", "plain") else "plain",
        "hub_kernels": cfg.hub_kernels,  # the loader uses Hub kernels only for a model trained with them
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
                      *, registered_tags: dict[str, Any] | None = None, **kwargs: Any):
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
        registered_tags: extra tags of that version (e.g. the metrics of an evaluation).
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
    values: dict[str, Any] = {**lineage(lora), "training_run_id": run_id, "run_id": run_id}
    if run_id and "model_card" not in kwargs:
        values["model_card"] = _run_model_card(run_id)
    values.update(kwargs)
    if mode == "merged":
        info = flavor.log_model(name, model_dir=str(_ensure_merged(lora)), mode="merged", **values)
    else:
        info = flavor.log_model(name, mode="adapter", adapter_dir=str(adapter), **values)
    if registered_model_name:
        from smolora_mlflow import registry

        mv = registry.register(info.model_uri, registered_model_name, tags=registered_tags)
        info.registered_model_version = int(mv.version)
    return info
