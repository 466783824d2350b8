"""Merge a LoRA adapter into its base model, verify the result, save it as safetensors.

Example:
    >>> from smolora_mlflow.train.merge import merge_adapter
    >>> report = merge_adapter("outputs/smolora/adapter", "outputs/smolora/final_merged")
    >>> report.max_abs_logit_diff < 1e-3
    True
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from smolora_mlflow.models import pretrained
from smolora_mlflow.models.adapters import (
    apply_adapter,
    check_adapter_matches_base,
    merge_adapter_weights,
    recorded_base,
)

logger = logging.getLogger(__name__)

PROBES = ["The food was", "Our waiter was very", "Hello, my name is", "1 2 3 4"]


@dataclass
class MergeReport:
    out_dir: Path
    base_model: str
    max_abs_logit_diff: float
    probes: int
    dtype: str = "float32"  # what the merged weights were saved in


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
    save_dtype: str = "auto",
    hub_kernels: bool = False,
    verify: bool = True,
    atol: float = 1e-3,
    probes: list[str] | None = None,
) -> MergeReport:
    """Load the base fresh, apply the adapter, merge with PEFT's safe merge, verify, save.

    Args:
        adapter_dir: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: where the merged model and tokenizer are written.
        base_model: base to merge into; defaults to the one the adapter records.
        dtype: dtype to merge in (float32 keeps the merge exact).
        save_dtype: dtype the merged weights are saved in: ``auto`` (the base checkpoint's, float32 when it
            records none), ``float32``, ``bfloat16`` or ``float16``. The check runs before the cast, in ``dtype``.
        hub_kernels: let transformers use Hub kernels on the loaded base (see ``load_causal_lm``).
        verify: compare merged logits with adapter-on-base logits on ``probes`` and check for NaNs.
        atol: largest allowed absolute logit difference.

    Raises:
        AdapterMismatchError: the adapter belongs to another base model.
        ValueError: the merged model produced NaNs or drifted from the adapter model.
    """
    import torch

    name = base_model or recorded_base(adapter_dir)
    path = pretrained.resolve_model_path(name)
    tokenizer = pretrained.load_tokenizer(path, revision=revision, trust_remote_code=trust_remote_code)
    target = _save_dtype(save_dtype, path, revision, trust_remote_code)
    base = pretrained.load_causal_lm(path, revision=revision, trust_remote_code=trust_remote_code,
                                     dtype=getattr(torch, dtype), hub_kernels=hub_kernels)
    check_adapter_matches_base(adapter_dir, path, base)
    peft_model = apply_adapter(base, adapter_dir, merge=False)
    probes = probes or PROBES
    before, mask = _logits(peft_model, tokenizer, probes) if verify else (None, None)
    merged = merge_adapter_weights(peft_model)
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
    merged = merged.to(getattr(torch, target))  # also what config.json's `dtype` then says
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("Merged %s into %s -> %s in %s (max |dlogit| %.2e)", adapter_dir, name, out, target, diff)
    return MergeReport(out, name, diff, len(probes), target)


_SAVE_DTYPES = ("float32", "bfloat16", "float16")


def _save_dtype(save_dtype: str, base_path: str, revision: str | None, trust_remote_code: bool) -> str:
    """``save_dtype`` with ``auto`` resolved to the base checkpoint's dtype (float32 when it records none)."""
    if save_dtype == "auto":
        recorded = pretrained.checkpoint_dtype(base_path, revision=revision, trust_remote_code=trust_remote_code)
        return recorded if recorded in _SAVE_DTYPES else "float32"
    if save_dtype not in _SAVE_DTYPES:
        raise ValueError(f"`merged_dtype` must be auto, {', '.join(_SAVE_DTYPES)}, got {save_dtype!r}.")
    return save_dtype
