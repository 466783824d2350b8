"""Loading smolora models: ``_load_model`` (native objects), ``_load_pyfunc`` (MLflow's loader hook) and
``load_model`` (any model URI). Each takes its folder from the integrity gate,
:func:`smolora_mlflow.models.integrity.open_verified`, called once per load.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mlflow.models.model import MLMODEL_FILE_NAME

from smolora_mlflow.constants import ADAPTER_SET_MODE
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor.server_env import log_to_stderr_if_asked
from smolora_mlflow.flavor.wrapper import MODEL_CONFIG_KEYS, _SmoloraPyfuncWrapper
from smolora_mlflow.models.generation import resolve_device
from smolora_mlflow.models.integrity import VerifiedModel, open_verified

_logger = logging.getLogger(__name__)


def _torch_dtype(dtype: Any, device) -> Any:
    """The dtype to load in: None is the saved one (``auto`` reads the checkpoint's config.json)."""
    import torch

    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise invalid_input(
            f"`dtype` must be auto, float32, float16, bfloat16 or a torch.dtype, got {dtype!r}."
        )
    return names[dtype]


def _load_model(
    vm: VerifiedModel, *, device: str = "auto", dtype: Any = None, merge: bool = True,
    base_model_path: str | None = None, hub_kernels: bool | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) of a folder the gate opened, with transformers (and peft for adapters).

    Hub kernels stay off unless the flavor block says the model was trained with them (``hub_kernels``)
    or ``hub_kernels`` asks here; :func:`load_causal_lm` is the one place that passes it to transformers.
    """
    from transformers import AutoTokenizer

    from smolora_mlflow.models.pretrained import load_causal_lm

    conf = vm.conf
    dev = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, dev)
    kernels = _hub_kernels(conf, hub_kernels)
    if conf["mode"] == ADAPTER_SET_MODE:
        from smolora_mlflow.flavor import adapter_pool

        return adapter_pool.load(vm, device=dev, torch_dtype=torch_dtype, base_model_path=base_model_path,
                                 refresh_seconds=0, hub_kernels=kernels)[:2]
    if conf["mode"] == "merged":
        # The gate deferred the file hashes: they are computed while transformers reads the files, and
        # nothing is handed back until they match (see VerifiedModel.read_data).
        model, tokenizer = vm.read_data(lambda d: (load_causal_lm(d, dtype=torch_dtype, hub_kernels=kernels),
                                                   AutoTokenizer.from_pretrained(d)))
    else:
        from smolora_mlflow.models.adapters import apply_adapter

        data_dir = vm.data_dir  # the adapter's hashes, checked before the base is read
        base_dir = vm.base_dir(base_model_path)
        base = load_causal_lm(base_dir, dtype=torch_dtype, hub_kernels=kernels)
        model = apply_adapter(base, data_dir, merge=merge)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return model.to(dev).eval(), tokenizer


def _hub_kernels(conf: dict[str, Any], asked: Any) -> bool:
    """``hub_kernels`` as asked (model_config, an argument), else as the flavor block recorded it, else off."""
    value = conf.get("hub_kernels", False) if asked is None else asked
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # model_config from a CLI/env
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise invalid_input(f"`hub_kernels` must be true or false, got {value!r}.")
    return value


def _model_root(path: str) -> Path:
    p = Path(path)
    return p if (p / MLMODEL_FILE_NAME).is_file() else p.parent


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _SmoloraPyfuncWrapper:
    """Called by ``mlflow.pyfunc.load_model``. ``model_config`` keys: device, dtype (default: the saved
    dtype), base_model_path, batch_size, coalesce_window_ms, max_batch_size, max_prompts_per_request,
    max_prompt_chars, server_threads (requests ``mlflow models serve`` lets into predict at once; 0 keeps
    MLflow's pool), refresh_seconds (adapter sets: how often aliases are re-resolved; 0 never), hub_kernels
    (default: as the flavor block records), cache_implementation (auto|dynamic|static) and compile
    (auto|true|false), see :func:`smolora_mlflow.models.generation.decode_settings`."""
    log_to_stderr_if_asked()
    # MLflow passes every key the MLmodel declares (None when unset) updated with the caller's
    cfg = {k: v for k, v in (model_config or {}).items() if v is not None}
    unknown = set(cfg) - set(MODEL_CONFIG_KEYS)
    if unknown:
        raise invalid_input(f"Unknown model_config keys {sorted(unknown)}.")
    vm = open_verified(_model_root(path), defer_file_hashes=True)
    refresh = cfg.pop("refresh_seconds", None)
    kernels = _hub_kernels(vm.conf, cfg.pop("hub_kernels", None))
    if vm.conf["mode"] == ADAPTER_SET_MODE:  # several adapters on one base: see flavor/adapter_set.py
        from smolora_mlflow.flavor import adapter_pool

        dev = resolve_device(cfg.pop("device", "auto"))
        model, tokenizer, pool = adapter_pool.load(
            vm, device=dev, torch_dtype=_torch_dtype(cfg.pop("dtype", None), dev),
            base_model_path=cfg.pop("base_model_path", None), refresh_seconds=refresh, hub_kernels=kernels)
        wrapper = _SmoloraPyfuncWrapper(model, tokenizer, vm.conf, adapters=pool, **cfg)
        pool.start()
        return wrapper
    model, tokenizer = _load_model(vm, device=cfg.pop("device", "auto"), dtype=cfg.pop("dtype", None),
                                   base_model_path=cfg.pop("base_model_path", None), hub_kernels=kernels)
    return _SmoloraPyfuncWrapper(model, tokenizer, vm.conf, **cfg)


def load_model(
    model_uri: str | os.PathLike | VerifiedModel, dst_path: str | None = None, device: str = "auto",
    dtype: Any = None, merge: bool = True, base_model_path: str | None = None, hub_kernels: bool | None = None,
) -> tuple[Any, Any]:
    """Load a smolora model as native ``(model, tokenizer)`` objects.

    Args:
        model_uri: ``runs:/<id>/model``, ``models:/<name>@<alias>``, a local folder, ..., or a
            :class:`~smolora_mlflow.models.integrity.VerifiedModel` the gate already opened (not checked
            again).
        dst_path: where to download the artifacts.
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``...
        dtype: ``None`` (the dtype it was saved in), a name or a torch.dtype.
        merge: adapter mode: merge the adapter into the base (``merge_and_unload``); False keeps a
            ``PeftModel``.
        base_model_path: adapter mode: where the base model lives on this machine, if not where it was.
        hub_kernels: let transformers download and run Hub kernels; None: as the flavor block records (off
            unless the model was saved with ``hub_kernels``).

    Example:
        >>> model, tokenizer = load_model("models:/reviews@production", device="cpu")
    """
    vm = model_uri if isinstance(model_uri, VerifiedModel) else open_verified(
        model_uri, dst_path=dst_path, defer_file_hashes=True)
    return _load_model(vm, device=device, dtype=dtype, merge=merge, base_model_path=base_model_path,
                       hub_kernels=hub_kernels)
