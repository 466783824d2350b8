"""Load the model a reference names, and find the training run and config behind it.

A reference (see :mod:`smolora_mlflow.refs`) is a run id (its logged model, else its ``adapter``
artifact), a ``runs:/`` or ``models:/`` URI, an MLflow model folder, a merged Hugging Face folder, a PEFT
adapter folder, or ``smolora:demo``.

Example:
    >>> loaded = load_for_inference("models:/reviews@production")  # doctest: +SKIP
    >>> training_config_of("models:/reviews@production").lora_r    # doctest: +SKIP
    8
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import DEMO_MODEL, SmoloraConfig, field_names
from smolora_mlflow.refs import MODEL_REF_HELP, ModelRef, parse_model_ref

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for generation, with where it came from."""

    model: Any
    tokenizer: Any
    source: str
    prompt_format: str = "plain"  # how its training rendered prompts: `chat` (the chat template) or `plain`


def logged_model_uri_of_run(run_id: str) -> str | None:
    """``models:/<model_id>`` of the model a run logged (the one named ``model`` if several), else None.

    A pipeline's parent run points to its training run through the ``smolora.train_run_id`` tag.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    found = list(client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'"))
    if found:
        named = [m for m in found if m.name == "model"] or found
        return f"models:/{max(named, key=lambda m: m.creation_timestamp).model_id}"
    child = run.data.tags.get(C.TAG_TRAIN_RUN_ID)
    return logged_model_uri_of_run(child) if child and child != run_id else None


def training_run_of(ref: str | os.PathLike) -> str | None:
    """The MLflow run that trained the model ``ref`` names, where that is recorded."""
    import mlflow

    parsed = parse_model_ref(ref)
    if parsed.kind == "run":
        return mlflow.MlflowClient().get_run(parsed.run_id).data.tags.get(C.TAG_TRAIN_RUN_ID, parsed.run_id)
    if parsed.kind == "logged_model":
        return mlflow.MlflowClient().get_logged_model(parsed.model_id).source_run_id
    if parsed.kind == "registered":
        from smolora_mlflow import registry

        return registry.resolve(parsed.name, parsed.key).run_id
    mlmodel = Path(parsed.text) / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavors = yaml.safe_load(mlmodel.read_text(encoding="utf-8")).get("flavors", {})
        return (flavors.get(C.FLAVOR_NAME) or {}).get("training_run_id")
    return None


def training_config_of(ref: str | os.PathLike) -> SmoloraConfig | None:
    """The resolved config that the training run of ``ref`` logged, or None if none is recorded."""
    import mlflow
    import yaml

    run_id = training_run_of(ref)
    if not run_id:
        return None
    client = mlflow.MlflowClient()
    folder = C.ARTIFACT_CONFIG.rsplit("/", 1)[0]
    if not any(f.path == C.ARTIFACT_CONFIG for f in client.list_artifacts(run_id, folder)):
        return None
    values = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{C.ARTIFACT_CONFIG}")) or {}
    # Secrets were redacted when logged; the tracking URI is where we already are; a field this version
    # does not know (a run logged by another smolora version) cannot matter to an evaluation here.
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        logger.warning("Ignoring fields %s of the config logged by run %s.", unknown, run_id)
    drop = [k for k, v in values.items() if v == "***"] + ["tracking_uri", *unknown]
    return SmoloraConfig.from_dict({k: v for k, v in values.items() if k not in drop})


def load_for_inference(ref: str | os.PathLike, *, device: str = "auto", hub_kernels: bool = False) -> LoadedModel:
    """Load the model ``ref`` names as ``(model, tokenizer)`` in eval mode.

    ``hub_kernels`` lets transformers use kernels from the Hub (see ``load_causal_lm``); an MLflow model
    also uses them when its flavor block says it was saved with them.

    Raises:
        FileNotFoundError: a path that holds no model, or a run that logged none.
    """
    parsed = parse_model_ref(ref)
    if parsed.kind == "run" and parsed.artifact_path is None:
        uri = logged_model_uri_of_run(parsed.run_id)
        if uri is not None:
            return _load_mlflow_model(uri, device, hub_kernels)
        return _load_run_adapter(parsed, device, hub_kernels)
    if parsed.kind == "logged_model":
        return _load_mlflow_model(f"models:/{parsed.model_id}", device, hub_kernels)
    if parsed.is_mlflow:
        return _load_mlflow_model(parsed.text, device, hub_kernels)
    if parsed.text == DEMO_MODEL:
        from smolora_mlflow.models.pretrained import resolve_model_path

        return _load_hf(resolve_model_path(parsed.text), device, source=parsed.text, hub_kernels=hub_kernels)
    path = Path(parsed.text).expanduser()
    if (path / "MLmodel").is_file():
        return _load_mlflow_model(str(path.resolve()), device, hub_kernels)
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, None, device, hub_kernels=hub_kernels)
    if (path / "config.json").is_file():
        return _load_hf(str(path.resolve()), device, source=str(path), hub_kernels=hub_kernels)
    raise FileNotFoundError(f"no model at {parsed.text!r}; pass {MODEL_REF_HELP}.")


def _load_mlflow_model(uri: str, device: str, hub_kernels: bool = False) -> LoadedModel:
    from smolora_mlflow import flavor
    from smolora_mlflow.models.integrity import open_verified

    vm = open_verified(uri, defer_file_hashes=True)  # the one integrity check of this load
    # Asked for here, or recorded in the flavor block when it was saved (None defers to the block).
    model, tokenizer = flavor.load_model(vm, device=device, hub_kernels=True if hub_kernels else None)
    return LoadedModel(model.eval(), tokenizer, uri, vm.conf.get("prompt_format") or "plain")


def _load_hf(path: str, device: str, *, source: str, hub_kernels: bool = False) -> LoadedModel:
    from smolora_mlflow.models import pretrained
    from smolora_mlflow.models.generation import resolve_device

    dev = resolve_device(device)
    tokenizer = pretrained.load_tokenizer(path)
    model = pretrained.load_causal_lm(path, dtype=pretrained.resolve_dtype("auto", dev.type), device=dev,
                                      hub_kernels=hub_kernels)
    return LoadedModel(model.eval(), tokenizer, source)


def _load_adapter(adapter_dir: Path, base_model: str | None, device: str, source: str | None = None,
                  prompt_format: str | None = None, hub_kernels: bool = False) -> LoadedModel:
    """The adapter merged into its base; the prompt format as recorded, else as training's `auto` chose it."""
    from smolora_mlflow.models import adapters, pretrained
    from smolora_mlflow.models.generation import resolve_device, resolve_prompt_format

    path = pretrained.resolve_model_path(base_model or adapters.recorded_base(adapter_dir))
    dev = resolve_device(device)
    tokenizer = pretrained.load_tokenizer(path)
    model = pretrained.load_causal_lm(path, dtype=pretrained.resolve_dtype("auto", dev.type),
                                      hub_kernels=hub_kernels)
    adapters.check_adapter_matches_base(adapter_dir, path, model)
    model = adapters.apply_adapter(model, adapter_dir, merge=True)
    fmt = prompt_format or resolve_prompt_format("auto", tokenizer, base_model or adapters.recorded_base(adapter_dir))
    return LoadedModel(model.to(dev).eval(), tokenizer, source or str(adapter_dir), fmt)


def _load_run_adapter(ref: ModelRef, device: str, hub_kernels: bool = False) -> LoadedModel:
    import mlflow

    client = mlflow.MlflowClient()
    names = {f.path for f in client.list_artifacts(ref.run_id, C.ARTIFACT_ADAPTER)}
    if f"{C.ARTIFACT_ADAPTER}/adapter_config.json" not in names:
        raise FileNotFoundError(f"run {ref.run_id} logged no model and no adapter; pass {MODEL_REF_HELP}.")
    local = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=C.ARTIFACT_ADAPTER)
    tags = client.get_run(ref.run_id).data.tags
    return _load_adapter(Path(local), tags.get(C.TAG_BASE_MODEL), device,
                         source=f"runs:/{ref.run_id}/{C.ARTIFACT_ADAPTER}", prompt_format=tags.get(C.TAG_PROMPT_FORMAT),
                         hub_kernels=hub_kernels)


def model_id_of(ref: str | os.PathLike) -> str | None:
    """The MLflow LoggedModel id behind ``ref`` (a ``models:/<id>``, a registered version, a run's logged
    model), so an evaluation's metrics can be linked to the model itself; None for plain folders."""
    import mlflow

    parsed = parse_model_ref(ref)
    if parsed.kind == "logged_model":
        return parsed.model_id
    if parsed.kind == "registered":
        from smolora_mlflow import registry

        mv = registry.resolve(parsed.name, parsed.key)
        return getattr(mv, "model_id", None) or mv.tags.get(C.TAG_MODEL_ID) or _id_of_source(mv.source)
    if parsed.kind == "run":
        if parsed.artifact_path is None:
            uri = logged_model_uri_of_run(parsed.run_id)
            return uri.removeprefix("models:/") if uri else None
        client = mlflow.MlflowClient()
        run = client.get_run(parsed.run_id)
        found = client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = '{parsed.run_id}' AND "
                                                          f"name = '{parsed.artifact_path}'")
        return found[0].model_id if found else None
    return None


def _id_of_source(source: str | None) -> str | None:
    if source and source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/")[0]
    return None
