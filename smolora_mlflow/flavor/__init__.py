"""The ``smolora`` MLflow flavor: LoRA fine-tuned causal LMs as MLflow models.

Shaped like MLflow's own flavor modules: constants -> ``get_default_pip_requirements`` ->
``get_default_conda_env`` -> ``save_model`` -> ``log_model`` -> ``_load_model`` -> the private pyfunc
wrapper -> ``_load_pyfunc`` -> ``load_model``. MLflow is imported here; torch and transformers only
inside functions; peft only inside the adapter-mode loader, so a merged model's inferred requirements
never name peft or trl.

A model is saved in one of two modes:

- ``merged``: full safetensors weights, tokenizer and generation config under ``model/``.
- ``adapter``: only the PEFT adapter under ``adapter/`` plus a reference to the base model (hub id,
  local path, or ``smolora:demo``), its revision and the sha256 of its weights, checked at load.

The package source travels in the model's ``code/`` folder, so a scoring server needs only public
packages. The pyfunc wrapper streams (``predict_stream``) and coalesces concurrent requests.

Example:
    >>> import mlflow, smolora_mlflow.flavor as flavor
    >>> flavor.save_model("out/model", "outputs/merged")
    >>> mlflow.pyfunc.load_model("out/model").predict({"prompt": ["The food was"]})
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
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
from mlflow.utils.requirements_utils import _get_pinned_requirement

from smolora_mlflow.constants import ARTIFACT_MODEL_CARD, FLAVOR_NAME
from smolora_mlflow.flavor import adapter_set, files
from smolora_mlflow.flavor.batching import log_to_stderr_if_asked
from smolora_mlflow.flavor.wrapper import MODEL_CONFIG_KEYS, _SmoloraPyfuncWrapper
from smolora_mlflow.models import manifest
from smolora_mlflow.models.generation import resolve_device
from smolora_mlflow.models.verified import weights_sha256

__all__ = ["FLAVOR_NAME", "get_default_conda_env", "get_default_pip_requirements", "load_model",
           "log_model", "save_model", "weights_sha256"]

_logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def get_default_pip_requirements(mode: str = "merged") -> list[str]:
    """Pinned minimal requirements of a smolora model; ``adapter`` mode adds peft (never trl)."""
    packages = ["torch", "transformers", "safetensors", "tokenizers"]
    if mode == "adapter":
        packages.append("peft")
    return [_get_pinned_requirement(p) for p in packages]


def get_default_conda_env(mode: str = "merged") -> dict[str, Any]:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements(mode))


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
    prompt_format: str = "plain",
    model_card: str | None = None,
    generation_defaults: dict[str, Any] | None = None,
    max_new_tokens_limit: int = 1024,
    max_prompt_tokens: int | None = None,
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
            prompts are then rendered the same way; ``plain`` (default) serves them as they come.
        model_card: README text; a card is generated when omitted.
        generation_defaults: defaults for generation params (over the model's generation_config).
        max_new_tokens_limit: largest ``max_new_tokens`` a request may ask for.
        max_prompt_tokens: longest prompt (in tokens) a request may send; the context always applies.
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
        if prompt_format not in ("chat", "plain"):
            raise MlflowException.invalid_parameter_value(
                f"`prompt_format` must be 'chat' or 'plain', got {prompt_format!r}.")
        conf.update(prompt_format=prompt_format, generation_defaults=defaults,
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
        pyfunc.add_to_model(mlflow_model, loader_module=__name__, data=conf["data"], code=code_subpath,
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
    prompt_format: str = "plain",
    model_card: str | None = None,
    generation_defaults: dict[str, Any] | None = None,
    max_new_tokens_limit: int = 1024,
    max_prompt_tokens: int | None = None,
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
        artifact_path=None, name=name, flavor=sys.modules[__name__], flavor_name=FLAVOR_NAME,
        registered_model_name=registered_model_name, await_registration_for=await_registration_for,
        metadata=metadata, model_dir=model_dir, model=model, tokenizer=tokenizer, mode=mode,
        adapter_dir=adapter_dir, base_model=base_model, base_model_revision=base_model_revision,
        base_model_sha256=base_model_sha256, lora_config=lora_config, training_run_id=training_run_id,
        prompt_format=prompt_format, model_card=model_card, generation_defaults=generation_defaults,
        max_new_tokens_limit=max_new_tokens_limit, max_prompt_tokens=max_prompt_tokens, signature=signature,
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


def _torch_dtype(dtype: Any, device) -> Any:
    import torch

    if dtype is None:
        return torch.float32 if device.type in ("cpu", "mps") else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise MlflowException.invalid_parameter_value(
            f"`dtype` must be auto, float32, float16, bfloat16 or a torch.dtype, got {dtype!r}."
        )
    return names[dtype]


def _load_model(
    model_root: Path, conf: dict[str, Any], *, device: str = "auto", dtype: Any = None, merge: bool = True,
    base_model_path: str | None = None,
) -> tuple[Any, Any]:
    """Verify the files, then load (model, tokenizer) with transformers (and peft for adapters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir = model_root / conf["data"]
    manifest.refuse_unlisted_files(data_dir, conf.get("file_sha256") or {})
    dev = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, dev)
    if conf["mode"] == adapter_set.MODE:
        from smolora_mlflow.flavor import adapter_pool

        return adapter_pool.load(model_root, conf, device=dev, torch_dtype=torch_dtype,
                                 base_model_path=base_model_path, refresh_seconds=0)[:2]
    if conf["mode"] == "merged":
        # Hash the files while transformers reads them (hashlib and safetensors both leave the GIL), and
        # hand nothing back until the hashes match: a tampered file is parsed (safetensors and JSON run no
        # code) but never used. Verifying first would cost a second pass over the weights.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolora-verify") as pool:
            verified = pool.submit(files.verify_files, data_dir, conf.get("file_sha256") or {})
            try:
                model = AutoModelForCausalLM.from_pretrained(data_dir, dtype=torch_dtype, use_safetensors=True)
                tokenizer = AutoTokenizer.from_pretrained(data_dir)
            finally:
                verified.result()
    else:
        from smolora_mlflow.models.adapters import apply_adapter

        files.verify_files(data_dir, conf.get("file_sha256") or {})
        base_dir = files.locate_base(conf, base_model_path)
        files.check_base_hash(base_dir, conf)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, use_safetensors=True)
        model = apply_adapter(base, data_dir, merge=merge)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return model.to(dev).eval(), tokenizer


def _model_root(path: str) -> Path:
    p = Path(path)
    return p if (p / MLMODEL_FILE_NAME).is_file() else p.parent


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _SmoloraPyfuncWrapper:
    """Called by ``mlflow.pyfunc.load_model``. ``model_config`` keys: device, dtype, base_model_path,
    batch_size, coalesce_window_ms, max_batch_size, max_prompts_per_request, max_prompt_chars,
    server_threads (requests ``mlflow models serve`` lets into predict at once; 0 keeps MLflow's pool),
    refresh_seconds (adapter sets: how often aliases are re-resolved; 0 never)."""
    log_to_stderr_if_asked()
    # MLflow passes every key the MLmodel declares (None when unset) updated with the caller's
    cfg = {k: v for k, v in (model_config or {}).items() if v is not None}
    unknown = set(cfg) - set(MODEL_CONFIG_KEYS)
    if unknown:
        raise MlflowException.invalid_parameter_value(f"Unknown model_config keys {sorted(unknown)}.")
    root = _model_root(path)
    conf = files.read_flavor_conf(root)
    manifest.check_environment(conf)  # `smolora serve` looked up the digest of the URI it serves
    manifest.check_logged_model(root, conf)
    refresh = cfg.pop("refresh_seconds", None)
    if conf["mode"] == adapter_set.MODE:  # several adapters on one base: see flavor/adapter_set.py
        from smolora_mlflow.flavor import adapter_pool

        manifest.refuse_unlisted_files(root / conf["data"], conf.get("file_sha256") or {})
        dev = resolve_device(cfg.pop("device", "auto"))
        model, tokenizer, pool = adapter_pool.load(
            root, conf, device=dev, torch_dtype=_torch_dtype(cfg.pop("dtype", None), dev),
            base_model_path=cfg.pop("base_model_path", None), refresh_seconds=refresh)
        wrapper = _SmoloraPyfuncWrapper(model, tokenizer, conf, adapters=pool, **cfg)
        pool.start()
        return wrapper
    model, tokenizer = _load_model(root, conf, device=cfg.pop("device", "auto"), dtype=cfg.pop("dtype", None),
                                   base_model_path=cfg.pop("base_model_path", None))
    return _SmoloraPyfuncWrapper(model, tokenizer, conf, **cfg)


def load_model(
    model_uri: str, dst_path: str | None = None, device: str = "auto", dtype: Any = None,
    merge: bool = True, base_model_path: str | None = None,
) -> tuple[Any, Any]:
    """Load a smolora model as native ``(model, tokenizer)`` objects.

    Args:
        model_uri: ``runs:/<id>/model``, ``models:/<name>@<alias>``, a local folder, ...
        dst_path: where to download the artifacts.
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``...
        dtype: ``None`` (float32 on CPU/MPS, the checkpoint's dtype on CUDA), a name or a torch.dtype.
        merge: adapter mode: merge the adapter into the base (``merge_and_unload``); False keeps a
            ``PeftModel``.
        base_model_path: adapter mode: where the base model lives on this machine, if not where it was.

    Example:
        >>> model, tokenizer = load_model("models:/reviews@production", device="cpu")
    """
    expected = manifest.resolve(model_uri)  # models:/ and runs:/ pinned, with the digest on record
    local = _download_artifact_from_uri(artifact_uri=expected.uri, output_path=dst_path)
    conf = files.read_flavor_conf(local)
    manifest.check(conf, expected)
    return _load_model(Path(local), conf, device=device, dtype=dtype, merge=merge,
                       base_model_path=base_model_path)
