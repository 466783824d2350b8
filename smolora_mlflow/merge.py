"""Merge a LoRA adapter into its base model, verify the result, save it as safetensors.

Example:
    >>> from smolora_mlflow.merge import merge_adapter
    >>> report = merge_adapter("outputs/smolora/adapter", "outputs/smolora/final_merged")
    >>> report.max_abs_logit_diff < 1e-3
    True
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolora_mlflow import modelio

logger = logging.getLogger(__name__)

PROBES = ["The food was", "Our waiter was very", "Hello, my name is", "1 2 3 4"]
BASE_INFO_FILE = "smolora_base.json"


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base model than the one it is being merged into."""


@dataclass
class MergeReport:
    out_dir: Path
    base_model: str
    max_abs_logit_diff: float
    probes: int


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
        actual = modelio.weights_sha256(base_path)
        if actual != recorded["sha256"]:
            raise AdapterMismatchError(
                f"adapter `{adapter_dir}` was trained on base weights with sha256 {recorded['sha256'][:16]}... "
                f"(`{recorded.get('base_model')}`), but `{base_path}` has sha256 {actual[:16]}...; "
                "merge it into the base model it was trained on."
            )


def _logits(model, tokenizer, probes: list[str]):
    import torch

    batch = tokenizer(probes, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        return model(**batch).logits.float(), batch["attention_mask"].bool()


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    verify: bool = True,
    atol: float = 1e-3,
    probes: list[str] | None = None,
) -> MergeReport:
    """Load the base fresh, apply the adapter, merge with PEFT's safe merge, verify, save.

    Args:
        adapter_dir: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: where the merged model and tokenizer are written.
        base_model: base to merge into; defaults to the one the adapter records.
        dtype: dtype to merge in (float32 keeps the merge exact; the saved weights use it too).
        verify: compare merged logits with adapter-on-base logits on ``probes`` and check for NaNs.
        atol: largest allowed absolute logit difference.

    Raises:
        AdapterMismatchError: the adapter belongs to another base model.
        ValueError: the merged model produced NaNs or drifted from the adapter model.
    """
    import torch
    from peft import PeftModel

    recorded = read_adapter_base(adapter_dir)
    name = base_model or recorded.get("base_model") or recorded["peft_base"]
    path = modelio.resolve_model_path(name)
    tokenizer = modelio.load_tokenizer(path, revision=revision, trust_remote_code=trust_remote_code)
    base = modelio.load_causal_lm(path, revision=revision, trust_remote_code=trust_remote_code,
                                  dtype=getattr(torch, dtype))
    check_adapter_matches_base(adapter_dir, path, base)
    try:
        with modelio.quiet_upstream_deprecations():
            peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as e:  # shape mismatches surface here
        raise AdapterMismatchError(
            f"adapter `{adapter_dir}` does not fit base `{name}`: {str(e).splitlines()[0]}"
        ) from e
    peft_model.eval()
    probes = probes or PROBES
    before, mask = _logits(peft_model, tokenizer, probes) if verify else (None, None)
    merged = peft_model.merge_and_unload(safe_merge=True)
    diff = 0.0
    if verify:
        after, _ = _logits(merged, tokenizer, probes)
        if torch.isnan(after).any():
            raise ValueError(f"merging `{adapter_dir}` into `{name}` produced NaN logits; the adapter is broken.")
        diff = float((after - before)[mask].abs().max())
        if diff > atol:
            raise ValueError(f"merged model drifts from the adapter model by {diff:.3g} > atol={atol}; "
                             "merge in float32 (`dtype='float32'`) or raise `atol`.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("Merged %s into %s -> %s (max |dlogit| %.2e)", adapter_dir, name, out, diff)
    return MergeReport(out, name, diff, len(probes))
