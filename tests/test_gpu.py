"""CUDA paths: offline bf16 training with Hub kernels off, a bf16 artifact, compiled static-cache decoding,
QLoRA. Skipped without a GPU.

This project's CI machines have no GPU; run `pytest -m gpu tests/test_gpu.py` on a CUDA machine (offline is
fine: conftest sets HF_HUB_OFFLINE=1). Every comparison is like with like: the same weights in the same dtype.
About a minute on an H200, most of it compiling the decode step of the tiny model for a few batch shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY_TRAINING
from test_gpu_path import PROMPTS, safetensors_dtypes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PIP = ["torch", "transformers", "safetensors"]
CUDA_TRAINING = {**TINY_TRAINING, "max_steps": 6, "device": "cuda", "dtype": "bfloat16"}


def test_offline_bf16_training_to_pyfunc_with_hub_kernels_off(tmp_path, tracking_uri, smolora_cache,
                                                              kernelize_calls):
    """Was: `ValueError: Version 2 of 'kernels-community/rotary' is not available in the local cache and
    Hugging Face Hub is in offline mode`, raised by `model.train()` kernelizing on CUDA."""
    import mlflow

    from smolora_mlflow import SmoLoRA, SmoloraConfig

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cfg = SmoloraConfig(**CUDA_TRAINING, merged_dtype="bfloat16", output_dir=str(tmp_path / "out"))
    lora = SmoLoRA(config=cfg)
    result = lora.train()
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.tags["smolora.device"] == "cuda"
    assert run.data.metrics["peak_cuda_memory_mb"] > 0
    assert run.data.params["hub_kernels"] == "False"
    assert run.data.tags["smolora.attn_implementation"]
    merged = lora.save()
    assert safetensors_dtypes(merged) == {"BF16"}  # the bf16 artifact: half the bytes of float32
    assert lora.model.dtype == torch.bfloat16 and lora.model.use_kernels is False
    info = lora.log_model(pip_requirements=PIP)
    assert mlflow.models.get_model_info(info.model_uri).flavors["smolora"]["dtype"] == "bfloat16"
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    served, _ = pyfunc.get_raw_model()
    assert served.dtype == torch.bfloat16 and served.device.type == "cuda" and served.use_kernels is False
    # Like with like: the same bf16 files, both decoding through the compiled static cache.
    out = pyfunc.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 8})
    assert out["generated_text"][0] == lora.inference("The food was", max_new_tokens=8)
    assert kernelize_calls == []


def test_static_cache_compiled_decode_equals_dynamic_on_cuda(demo_model_dir, kernelize_calls):
    from transformers import AutoTokenizer

    from smolora_mlflow.models import decoding, generation
    from smolora_mlflow.models.pretrained import load_causal_lm

    # float32: compiled and eager kernels agree to the last bits there; bf16 ties could flip a greedy pick.
    model = load_causal_lm(demo_model_dir, dtype=torch.float32, device="cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    decode = generation.decode_settings(model, batch_sizes=(1, 4))
    assert decode == decoding.DecodeSettings("static", compile=True, batch_sizes=(1, 4))  # the CUDA default
    assert generation.warm_up(model, tokenizer, decode) > 0
    dynamic = generation.generate(model, tokenizer, PROMPTS, max_new_tokens=16, decode=generation.DYNAMIC)
    assert generation.generate(model, tokenizer, PROMPTS, max_new_tokens=16, decode=decode) == dynamic
    assert generation.generate(model, tokenizer, PROMPTS[:3], max_new_tokens=16, decode=decode) == dynamic[:3]
    assert "".join(generation.stream(model, tokenizer, PROMPTS[0], max_new_tokens=16, decode=decode)) == dynamic[0]
    assert kernelize_calls == []


def test_qlora_4bit_training_and_serving(tmp_path, tracking_uri, smolora_cache, kernelize_calls):
    pytest.importorskip("bitsandbytes")
    import mlflow

    from smolora_mlflow import SmoLoRA, SmoloraConfig
    from smolora_mlflow.config import field_names

    if "quantization" not in field_names():
        pytest.skip("QLoRA (config `quantization: 4bit`, the recipes issue) is not in this build yet")
    lora = SmoLoRA(config=SmoloraConfig(**CUDA_TRAINING, quantization="4bit", output_dir=str(tmp_path / "out")))
    result = lora.train()
    assert mlflow.MlflowClient().get_run(result.run_id).data.params["quantization"] == "4bit"
    lora.save()
    info = lora.log_model(pip_requirements=PIP)
    out = mlflow.pyfunc.load_model(info.model_uri).predict({"prompt": PROMPTS[:2]}, params={"max_new_tokens": 8})
    assert len(out) == 2 and all(isinstance(t, str) for t in out["generated_text"])
    assert kernelize_calls == []
