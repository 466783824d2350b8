"""A PEFT adapter and its base model: what the adapter records about its base, the check that a base is the
one it was trained on, and the one way an adapter is put on (and merged into) a loaded base.

peft is imported inside the functions, so the flavor's loader can import this module.

Example:
    >>> base = load_causal_lm(path)                                     # doctest: +SKIP
    >>> check_adapter_matches_base("outputs/adapter", path, base)       # doctest: +SKIP
    >>> model = apply_adapter(base, "outputs/adapter", merge=True)      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from smolora_mlflow.models.pretrained import quiet_upstream_deprecations
from smolora_mlflow.models.verified import weights_sha256

BASE_INFO_FILE = "smolora_base.json"


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base model than the one it is being put on."""


def read_adapter_base(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """What the adapter says about its base: PEFT's ``base_model_name_or_path`` and our lineage file."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"`{adapter_dir}` has no adapter_config.json; pass a PEFT adapter folder.")
    info = {"peft_base": json.loads(cfg_file.read_text())["base_model_name_or_path"]}
    ours = adapter_dir / BASE_INFO_FILE
    if ours.is_file():
        info.update(json.loads(ours.read_text()))
    return info


def recorded_base(adapter_dir: str | os.PathLike) -> str:
    """The base model id or folder the adapter was trained on."""
    recorded = read_adapter_base(adapter_dir)
    return recorded.get("base_model") or recorded["peft_base"]


def check_adapter_matches_base(adapter_dir: str | os.PathLike, base_path: str, base_model) -> None:
    """Refuse an adapter whose recorded base differs from ``base_model`` (weights hash or architecture)."""
    recorded = read_adapter_base(adapter_dir)
    arch = type(base_model).__name__
    if recorded.get("architecture") and recorded["architecture"] != arch:
        raise AdapterMismatchError(
            f"adapter `{adapter_dir}` was trained on a {recorded['architecture']} "
            f"(`{recorded.get('base_model')}`), but the base given is a {arch} (`{base_path}`); "
            "merge it into the base model it was trained on."
        )
    if recorded.get("sha256") and Path(base_path).is_dir():
        actual = weights_sha256(base_path)
        if actual != recorded["sha256"]:
            raise AdapterMismatchError(
                f"adapter `{adapter_dir}` was trained on base weights with sha256 {recorded['sha256'][:16]}... "
                f"(`{recorded.get('base_model')}`), but `{base_path}` has sha256 {actual[:16]}...; "
                "merge it into the base model it was trained on."
            )


def apply_adapter(base_model, adapter_dir: str | os.PathLike, *, merge: bool):
    """The adapter at ``adapter_dir`` on ``base_model``, for inference: a ``PeftModel``, or merged into the base.

    Merging uses PEFT's safe merge (a NaN in the merged weights is an error, not a broken model).

    Raises:
        AdapterMismatchError: the adapter's shapes do not fit the base.
    """
    from peft import PeftModel

    try:
        with quiet_upstream_deprecations():  # peft reads an attribute transformers 5 deprecated
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except RuntimeError as e:  # shape mismatches surface here
        raise AdapterMismatchError(f"adapter `{adapter_dir}` does not fit base "
                                   f"`{base_model.name_or_path}`: {str(e).splitlines()[0]}") from e
    model.eval()
    return merge_adapter_weights(model) if merge else model


def merge_adapter_weights(peft_model):
    """The base with the adapter's weights folded in (PEFT's safe merge), adapter layers removed."""
    return peft_model.merge_and_unload(safe_merge=True)
