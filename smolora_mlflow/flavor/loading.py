"""Loading smolora models: ``_load_model`` (native objects), ``_load_pyfunc`` (MLflow's loader hook) and
``load_model`` (any model URI).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking.artifact_utils import _download_artifact_from_uri

from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor import adapter_set, files
from smolora_mlflow.flavor.batching import log_to_stderr_if_asked
from smolora_mlflow.flavor.wrapper import MODEL_CONFIG_KEYS, _SmoloraPyfuncWrapper
from smolora_mlflow.models import manifest
from smolora_mlflow.models.generation import resolve_device

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
    model_root: Path, conf: dict[str, Any], *, device: str = "auto", dtype: Any = None, merge: bool = True,
    base_model_path: str | None = None, hub_kernels: bool | None = None,
) -> tuple[Any, Any]:
    """Verify the files, then load (model, tokenizer) with transformers (and peft for adapters).

    Hub kernels stay off unless the flavor block says the model was trained with them (``hub_kernels``)
    or ``hub_kernels`` asks here; :func:`load_causal_lm` is the one place that passes it to transformers.
    """
    from transformers import AutoTokenizer

    from smolora_mlflow.models.pretrained import load_causal_lm

    data_dir = model_root / conf["data"]
    manifest.refuse_unlisted_files(data_dir, conf.get("file_sha256") or {})
    dev = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, dev)
    kernels = _hub_kernels(conf, hub_kernels)
    if conf["mode"] == adapter_set.MODE:
        from smolora_mlflow.flavor import adapter_pool

        return adapter_pool.load(model_root, conf, device=dev, torch_dtype=torch_dtype,
                                 base_model_path=base_model_path, refresh_seconds=0, hub_kernels=kernels)[:2]
    if conf["mode"] == "merged":
        # Hash the files while transformers reads them (hashlib and safetensors both leave the GIL), and
        # hand nothing back until the hashes match: a tampered file is parsed (safetensors and JSON run no
        # code) but never used. Verifying first would cost a second pass over the weights.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolora-verify") as pool:
            verified = pool.submit(files.verify_files, data_dir, conf.get("file_sha256") or {})
            try:
                model = load_causal_lm(data_dir, dtype=torch_dtype, hub_kernels=kernels)
                tokenizer = AutoTokenizer.from_pretrained(data_dir)
            finally:
                verified.result()
    else:
        from smolora_mlflow.models.adapters import apply_adapter

        files.verify_files(data_dir, conf.get("file_sha256") or {})
        base_dir = files.locate_base(conf, base_model_path)
        files.check_base_hash(base_dir, conf)
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
    root = _model_root(path)
    conf = files.read_flavor_conf(root)
    manifest.check_environment(conf)  # `smolora serve` looked up the digest of the URI it serves
    manifest.check_logged_model(root, conf)
    refresh = cfg.pop("refresh_seconds", None)
    kernels = _hub_kernels(conf, cfg.pop("hub_kernels", None))
    if conf["mode"] == adapter_set.MODE:  # several adapters on one base: see flavor/adapter_set.py
        from smolora_mlflow.flavor import adapter_pool

        manifest.refuse_unlisted_files(root / conf["data"], conf.get("file_sha256") or {})
        dev = resolve_device(cfg.pop("device", "auto"))
        model, tokenizer, pool = adapter_pool.load(
            root, conf, device=dev, torch_dtype=_torch_dtype(cfg.pop("dtype", None), dev),
            base_model_path=cfg.pop("base_model_path", None), refresh_seconds=refresh, hub_kernels=kernels)
        wrapper = _SmoloraPyfuncWrapper(model, tokenizer, conf, adapters=pool, **cfg)
        pool.start()
        return wrapper
    model, tokenizer = _load_model(root, conf, device=cfg.pop("device", "auto"), dtype=cfg.pop("dtype", None),
                                   base_model_path=cfg.pop("base_model_path", None), hub_kernels=kernels)
    return _SmoloraPyfuncWrapper(model, tokenizer, conf, **cfg)


def load_model(
    model_uri: str, dst_path: str | None = None, device: str = "auto", dtype: Any = None,
    merge: bool = True, base_model_path: str | None = None, hub_kernels: bool | None = None,
) -> tuple[Any, Any]:
    """Load a smolora model as native ``(model, tokenizer)`` objects.

    Args:
        model_uri: ``runs:/<id>/model``, ``models:/<name>@<alias>``, a local folder, ...
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
    expected = manifest.resolve(model_uri)  # models:/ and runs:/ pinned, with the digest on record
    local = _download_artifact_from_uri(artifact_uri=expected.uri, output_path=dst_path)
    conf = files.read_flavor_conf(local)
    manifest.check(conf, expected)
    return _load_model(Path(local), conf, device=device, dtype=dtype, merge=merge,
                       base_model_path=base_model_path, hub_kernels=hub_kernels)
