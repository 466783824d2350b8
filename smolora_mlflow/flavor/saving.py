"""Saving and logging smolora models: ``save_model`` and ``log_model`` with their default environments.

See :mod:`smolora_mlflow.flavor` for the two modes and the files a model holds.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _mlflow_conda_env,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size
from mlflow.utils.model_utils import (
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)

from smolora_mlflow.constants import ARTIFACT_MODEL_CARD, FLAVOR_NAME
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor import files
from smolora_mlflow.flavor.wrapper import MODEL_CONFIG_KEYS
from smolora_mlflow.models import manifest, pretrained
from smolora_mlflow.models.folder_checks import FLAVOR_MODULE, hash_tree

_logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def get_default_pip_requirements(mode: str = "merged") -> list[str]:
    """Pinned minimal requirements of a smolora model; ``adapter`` mode adds peft (never trl)."""
    packages = ["torch", "transformers", "safetensors", "tokenizers"]
    if mode == "adapter":
        packages.append("peft")
    return [files.pin(p) for p in packages]  # not MLflow's pinning: it warns about torch's +cpu label


def get_default_conda_env(mode: str = "merged") -> dict[str, Any]:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements(mode))


def _decide_format(prompt_format: str, tokenizer_dir: Path) -> tuple[str, str]:
    """(format, why) the flavor block records; ``auto`` is decided from the saved tokenizer and generation config."""
    if prompt_format not in ("auto", "chat", "plain"):
        raise invalid_input(f"`prompt_format` must be 'auto', 'chat' or 'plain', got {prompt_format!r}.")
    if prompt_format != "auto":
        return prompt_format, f"prompt_format {prompt_format} given when the model was saved"
    from transformers import AutoTokenizer

    from smolora_mlflow.models.generation import decide_prompt_format

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return decide_prompt_format("auto", tokenizer, str(tokenizer_dir))


def save_model(
    path: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    mode: str = "merged",
    adapter_dir: str | os.PathLike | None = None,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    base_model_sha256: str | None = None,
    lora_config: dict[str, Any] | None = None,
    training_run_id: str | None = None,
    prompt_format: str = "auto",
    model_card: str | None = None,
    generation_defaults: dict[str, Any] | None = None,
    max_new_tokens_limit: int = 1024,
    max_prompt_tokens: int | None = None,
    hub_kernels: bool = False,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save a fine-tuned causal LM as an MLflow model with the ``smolora`` and ``python_function`` flavors.

    Args:
        path: an empty or missing local folder.
        model_dir: merged mode: a ``save_pretrained`` folder (safetensors weights and tokenizer).
        model, tokenizer: instead of ``model_dir``: a merged model and its tokenizer (merged mode), or a
            PEFT model (adapter mode).
        mode: ``merged`` (full weights) or ``adapter`` (only the LoRA adapter plus a base reference).
        adapter_dir: adapter mode: a PEFT ``save_pretrained`` folder.
        base_model: hub id, local folder or ``smolora:demo``; adapter mode reads the adapter config
            when omitted. Recorded for provenance in merged mode.
        base_model_revision, base_model_sha256: hub revision and weights hash of the base (the hash is
            computed when the base is local).
        lora_config: LoRA settings to record (adapter mode reads them from the adapter).
        training_run_id: the MLflow run that trained the adapter.
        prompt_format: ``chat`` when training rendered prompts with the chat template: served plain
            prompts are then rendered the same way; ``plain`` serves them as they come (and a chat request
            as its lone user message's text); ``auto`` (default) decides from the tokenizer and the
            generation config (:func:`~smolora_mlflow.models.generation.decide_prompt_format`), and the
            flavor block records why (``prompt_format_reason``).
        model_card: README text; a card is generated when omitted.
        generation_defaults: defaults for generation params (over the model's generation_config).
        max_new_tokens_limit: largest ``max_new_tokens`` a request may ask for.
        max_prompt_tokens: longest prompt (in tokens) a request may send; the context always applies.
        hub_kernels: recorded in the flavor block; the loader then lets transformers fetch and run compiled
            kernels from the Hugging Face Hub (``use_kernels=True``). Off: no code is downloaded.
        signature, input_example: default to ``prompt -> generated_text`` with a params schema.
        pip_requirements, extra_pip_requirements, conda_env: as in MLflow; requirements are inferred
            from the saved model when none are given.
        code_paths: extra code to ship; the smolora_mlflow package always ships.
        mlflow_model: set by ``Model.log``.
        metadata: custom metadata for the MLmodel file.

    Example:
        >>> save_model("out/model", "outputs/merged", pip_requirements=["torch", "transformers"])
    """
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    files.check_save_args(mode, model_dir, model, tokenizer, adapter_dir, max_new_tokens_limit, max_prompt_tokens)
    path = Path(path).absolute()
    _validate_and_prepare_target_save_path(str(path))
    try:
        code_subpath = _validate_and_copy_code_paths([str(_PACKAGE_DIR), *(code_paths or [])], str(path))
        data_dir = files.write_model_data(path, mode, model_dir, model, tokenizer, adapter_dir)
        conf = files.provenance(mode, data_dir, base_model, base_model_revision, base_model_sha256, lora_config,
                           training_run_id)
        config_dir = data_dir if mode == "merged" else files.local_base_dir(conf["base_model"])
        defaults = files.generation_defaults(config_dir, generation_defaults, max_new_tokens_limit)
        prompt_format, why = _decide_format(prompt_format, data_dir if mode == "merged" else config_dir)
        if not isinstance(hub_kernels, bool):
            raise invalid_input(f"`hub_kernels` must be true or false, got {hub_kernels!r}.")
        # The dtype the weights are saved in (merged) or the base's (adapter): what the loader loads by default.
        saved_dtype = pretrained.checkpoint_dtype(config_dir) if config_dir is not None else None
        conf.update(prompt_format=prompt_format, prompt_format_reason=why, generation_defaults=defaults,
                    dtype=saved_dtype, hub_kernels=hub_kernels, code_sha256=hash_tree(path / code_subpath),
                    max_new_tokens_limit=max_new_tokens_limit,
                    max_prompt_tokens=max_prompt_tokens, context_length=files.context_length(config_dir))
        mlflow_model = mlflow_model or Model()
        _save_example(mlflow_model, files.default_input_example(defaults) if input_example is None
                      else input_example, str(path))
        mlflow_model.signature = files.default_signature(defaults) if signature is None else signature or None
        if metadata is not None:
            mlflow_model.metadata = metadata
        card = model_card or files.model_card(conf, Path(conf["base_model"] or path.name).name + " (smolora)")
        (path / ARTIFACT_MODEL_CARD).write_text(card, encoding="utf-8")
        pyfunc.add_to_model(mlflow_model, loader_module=FLAVOR_MODULE, data=conf["data"], code=code_subpath,
                            conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME, streamable=True,
                            model_config=dict.fromkeys(MODEL_CONFIG_KEYS))
        mlflow_model.add_flavor(FLAVOR_NAME, code=code_subpath, **conf)
        if size := get_total_file_size(str(path)):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(str(path / MLMODEL_FILE_NAME))
        files.write_requirements(path, get_default_pip_requirements(mode), pip_requirements,
                                 extra_pip_requirements, conda_env)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # the folder was empty: leave nothing half-written
        raise


def log_model(
    name: str = "model",
    model_dir: str | os.PathLike | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    mode: str = "merged",
    adapter_dir: str | os.PathLike | None = None,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    base_model_sha256: str | None = None,
    lora_config: dict[str, Any] | None = None,
    training_run_id: str | None = None,
    prompt_format: str = "auto",
    model_card: str | None = None,
    generation_defaults: dict[str, Any] | None = None,
    max_new_tokens_limit: int = 1024,
    max_prompt_tokens: int | None = None,
    hub_kernels: bool = False,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    **kwargs: Any,
) -> ModelInfo:
    """Log a smolora model to the active run (or ``run_id=``) and optionally register it.

    Takes the arguments of :func:`save_model` (except ``path``); ``kwargs`` go to ``Model.log``
    (``params``, ``tags``, ``model_type``, ``step``, ``model_id``, ``run_id``, ``prompts``).

    Example:
        >>> with mlflow.start_run():
        ...     info = log_model("model", "outputs/merged", registered_model_name="reviews")
        >>> mlflow.pyfunc.load_model(info.model_uri)
    """
    if kwargs.get("run_id") and "model_id" not in kwargs:
        kwargs["model_id"] = _logged_model_in_runs_experiment(name, kwargs["run_id"], kwargs)
    info = Model.log(
        artifact_path=None, name=name, flavor=sys.modules[FLAVOR_MODULE], flavor_name=FLAVOR_NAME,
        registered_model_name=registered_model_name, await_registration_for=await_registration_for,
        metadata=metadata, model_dir=model_dir, model=model, tokenizer=tokenizer, mode=mode,
        adapter_dir=adapter_dir, base_model=base_model, base_model_revision=base_model_revision,
        base_model_sha256=base_model_sha256, lora_config=lora_config, training_run_id=training_run_id,
        prompt_format=prompt_format, model_card=model_card, generation_defaults=generation_defaults,
        max_new_tokens_limit=max_new_tokens_limit, max_prompt_tokens=max_prompt_tokens, hub_kernels=hub_kernels,
        signature=signature,
        input_example=input_example, pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements, conda_env=conda_env, code_paths=code_paths, **kwargs,
    )
    manifest.record(info, registered_model_name)  # a digest of the hashes, out of the artifact writer's reach
    return info


def _logged_model_in_runs_experiment(name: str, run_id: str, kwargs: dict[str, Any]) -> str | None:
    """Create the LoggedModel in the experiment of ``run_id``, not in the process's current one.

    ``Model.log(run_id=...)`` outside that run creates the model in the active experiment (often Default),
    where ``runs:/<run_id>/<name>`` cannot find it and an auth server refuses a non-admin user.
    """
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return None
    run = mlflow.MlflowClient().get_run(run_id)
    params = {**run.data.params, **{k: str(v) for k, v in (kwargs.pop("params", None) or {}).items()}}
    tags = {k: str(v) for k, v in (kwargs.pop("tags", None) or {}).items()}
    model = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
                                           params=params, tags=tags or None, model_type=kwargs.pop("model_type", None))
    return model.model_id
