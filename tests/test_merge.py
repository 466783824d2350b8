"""Merging: exact logits, NaN and drift checks, and refusal of an adapter trained on another base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolora_mlflow.models.adapters import BASE_INFO_FILE, AdapterMismatchError
from smolora_mlflow.models.verified import weights_sha256
from smolora_mlflow.train.merge import merge_adapter


def _random_adapter(base_dir, out, *, seed=0, targets=("q_proj", "v_proj"), record_base=True):
    """A LoRA adapter with non-zero B (init_lora_weights=False), so merging really changes the weights."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.save_pretrained(out)
    if record_base:
        info = {"base_model": str(base_dir), "sha256": weights_sha256(base_dir), "architecture": "LlamaForCausalLM"}
        (out / BASE_INFO_FILE).write_text(json.dumps(info))
    return out


def test_merged_logits_equal_adapter_logits(demo_model_dir, tmp_path):
    adapter = _random_adapter(demo_model_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", base_model=str(demo_model_dir))
    assert report.max_abs_logit_diff < 1e-4
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    batch = tok(["The soup was cold.", "Five stars."], return_tensors="pt", padding=True)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    with torch.no_grad():
        want, got, before = (m(**batch).logits for m in (peft_model, merged, plain))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-3, "the adapter did not change the model"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "merged").glob("*.bin"))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_adapter_for_another_base_is_refused(demo_model_dir, tiny_llama_dir, tmp_path):
    adapter = _random_adapter(demo_model_dir, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="was trained on base weights with sha256") as info:
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama_dir))
    assert "merge it into the base model it was trained on" in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_shape_mismatch_without_lineage_is_refused(demo_model_dir, tiny_llama_dir, tmp_path):
    adapter = _random_adapter(demo_model_dir, tmp_path / "adapter", record_base=False)
    with pytest.raises(AdapterMismatchError, match="does not fit base"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(tiny_llama_dir))


def test_nan_adapter_is_refused(demo_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _random_adapter(demo_model_dir, tmp_path / "adapter")
    weights_file = adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    weights = {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in weights.items()}
    save_file(weights, weights_file)
    with pytest.raises(ValueError, match="NaN"):
        merge_adapter(adapter, tmp_path / "merged", base_model=str(demo_model_dir))


def test_missing_adapter_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "merged")
