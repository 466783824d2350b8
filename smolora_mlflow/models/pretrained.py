"""Locating, hashing and loading base models (hub ids, local folders, the built-in demo).

No peft or trl here: the flavor's loader may import this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smolora_mlflow.config import DEMO_MODEL
from smolora_mlflow.models.verified import weights_sha256

logger = logging.getLogger(__name__)




def progress_enabled() -> bool:
    """Progress bars are on unless ``SMOLORA_PROGRESS=0`` (tests, notebooks, CI logs)."""
    return os.environ.get("SMOLORA_PROGRESS", "1") != "0"


_FILE_BARS = ("Loading weights", "Writing model shards")  # transformers' bars over a model's tensors


def _no_file_bars(factory, args, kwargs):
    if kwargs.get("desc") in _FILE_BARS:
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def silence_progress_bars_if_asked() -> None:
    """Hide transformers' per-load "Loading weights" / "Writing model shards" bars (a run loads and saves
    models many times: checkpoints, merge, evaluation; each takes seconds at most and a bar apiece buries the
    training and evaluation bars); with ``SMOLORA_PROGRESS=0`` every dataset-map and weight bar too."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_tqdm_hook(_no_file_bars)
    if progress_enabled():
        return
    import datasets

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_upstream_deprecations() -> Iterator[None]:
    """Hide deprecation warnings that one upstream library raises about another's API.

    peft 0.21 reads ``model.is_gradient_checkpointing``, deprecated in transformers 5: the warning is
    about their code, not the user's, so it is not shown. Anything else still warns.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def local_base_dir(base_model: str | None) -> Path | None:
    if not base_model:
        return None
    if base_model == DEMO_MODEL:
        from smolora_mlflow.models.demo import demo_model_path

        return demo_model_path()
    p = Path(base_model).expanduser()
    return p.resolve() if p.is_dir() else None


def locate_base(conf: dict[str, Any], base_model_path: str | None) -> Path:
    """The local folder of an adapter's base model: an override, the recorded path, or the hub cache."""
    base = conf.get("base_model")
    local = Path(base_model_path).expanduser() if base_model_path else local_base_dir(base)
    if local is not None and local.is_dir():
        return local
    if base and not Path(base).is_absolute() and not base_model_path:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(base, revision=conf.get("base_model_revision")))
        except Exception as e:
            raise _unavailable(
                f"Cannot fetch base model `{base}` (revision {conf.get('base_model_revision')}) for this "
                f"adapter: {e}. Make it available in the Hugging Face cache, or pass "
                "`base_model_path=` (pyfunc: model_config={'base_model_path': ...}).") from e
    raise _unavailable(
        f"Base model folder `{base_model_path or base}` of this adapter does not exist. Copy the base "
        "model there, or pass `base_model_path=` (pyfunc: model_config={'base_model_path': ...}).")


def _unavailable(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_STATE

    return MlflowException(message, error_code=INVALID_STATE)


def resolve_model_path(name: str) -> str:
    """The demo name becomes its cached folder; a local folder becomes absolute; a hub id stays as is."""
    if name == DEMO_MODEL:
        from smolora_mlflow.models.demo import demo_model_path

        return str(demo_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"`base_model`: `{p}` exists but has no config.json; point it to a folder saved with "
                "`save_pretrained`, a hub id, or `smolora:demo`."
            )
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ValueError(f"`base_model`: local folder `{name}` does not exist.")
    return name


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path_or_id: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path_or_id, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding with EOS is the usual, harmless choice
        # because padded positions are masked out of attention and loss.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: Any = None,
    device: Any = None,
    hub_kernels: bool = False,
    **from_pretrained_kwargs: Any,
):
    """Load a causal LM with safetensors only and Hub kernels off; a clear error when it is not a causal LM.

    Every model this project loads (training, merge, evaluation, the flavor's loader, adapter sets) comes
    through here, so what is allowed to run is decided in one place.

    Args:
        path_or_id: a ``save_pretrained`` folder or a hub id.
        revision, trust_remote_code: as in ``from_pretrained``.
        dtype: a torch dtype, ``"auto"`` (the checkpoint's) or None (float32).
        device: moved there after loading.
        hub_kernels: let transformers replace layers with compiled kernels downloaded from the Hugging Face
            Hub (``use_kernels=True``). transformers 5 does so by default (unless ``USE_HUB_KERNELS`` says
            no), and ``model.train()`` on CUDA then resolves kernels from the Hub: offline that fails, online
            it runs code nobody asked for. Off unless asked, like ``trust_remote_code``.
        **from_pretrained_kwargs: anything else ``from_pretrained`` takes (e.g. ``quantization_config``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path_or_id = str(path_or_id)

    try:
        config = AutoConfig.from_pretrained(path_or_id, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(
            f"`base_model`={path_or_id!r} could not be found locally or on the hub ({e.__class__.__name__}). "
            "Pass a local folder, or make the hub reachable."
        ) from e
    _require_causal_lm_head(path_or_id, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path_or_id,
            config=config,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            use_safetensors=True,
            # Explicit, never None: None means "on" in transformers 5 (see the docstring).
            use_kernels=bool(hub_kernels),
            **from_pretrained_kwargs,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"`base_model`={path_or_id!r} is a {config.model_type!r} model, not a causal language model; "
                "pass a model with a language-modelling head (e.g. a Llama, Qwen or SmolLM checkpoint)."
            ) from e
        raise
    if device is not None:
        model.to(device)
    return model


def checkpoint_dtype(path_or_id: str | os.PathLike, *, revision: str | None = None,
                     trust_remote_code: bool = False) -> str | None:
    """The dtype a checkpoint's ``config.json`` records (``dtype``, or the older ``torch_dtype``), e.g.
    ``"bfloat16"``; None when it records none.

    Example:
        >>> checkpoint_dtype("HuggingFaceTB/SmolLM2-360M")  # doctest: +SKIP
        'bfloat16'
    """
    import json

    config_file = Path(path_or_id) / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        value = raw.get("dtype") or raw.get("torch_dtype")
    else:
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(str(path_or_id), revision=revision,
                                                   trust_remote_code=trust_remote_code), "dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")


_LM_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _require_causal_lm_head(path_or_id: str, config) -> None:
    """Refuse checkpoints saved without a language-modelling head (e.g. a bare ``BertModel``).

    transformers would load them anyway and initialise a random head, which trains and serves garbage.
    """
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(_LM_HEAD_SUFFIXES) for a in archs):
        raise ValueError(
            f"`base_model`={path_or_id!r} holds a {', '.join(archs)} checkpoint, not a causal language model; "
            "pass a model with a language-modelling head (e.g. a Llama, Qwen or SmolLM checkpoint)."
        )


def base_model_info(name: str, resolved: str, model: Any | None = None) -> dict[str, str | None]:
    """Lineage of a base model: its id, local folder, revision and weights hash where known."""
    info: dict[str, str | None] = {"base_model": name, "path": None, "revision": None, "sha256": None}
    if Path(resolved).is_dir():
        info["path"] = resolved
        info["sha256"] = weights_sha256(resolved)
    elif model is not None:
        info["revision"] = getattr(model.config, "_commit_hash", None)
    return info
