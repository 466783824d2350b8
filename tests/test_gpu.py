"""CUDA paths: bf16 training and serving with memory figures in the run. Skipped without a GPU.

This project's CI machines have no GPU; run `pytest -m gpu` on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_training_and_pyfunc_serving_on_cuda(tmp_path, tracking_uri, smolora_cache, monkeypatch):
    import mlflow

    from smolora_mlflow import SmoLoRA, SmoloraConfig

    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    cfg = SmoloraConfig(max_steps=6, max_length=32, per_device_train_batch_size=4, max_samples=64,
                        device="cuda", dtype="bfloat16", output_dir=str(tmp_path / "out"))
    lora = SmoLoRA(config=cfg)
    result = lora.train()
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.tags["smolora.device"] == "cuda"
    assert run.data.metrics["peak_cuda_memory_mb"] > 0
    lora.save()
    info = lora.log_model(pip_requirements=["torch", "transformers", "safetensors"])
    model = mlflow.pyfunc.load_model(info.model_uri)
    out = model.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 8})
    assert out["generated_text"][0] == lora.inference("The food was", max_new_tokens=8)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (optional extra `qlora`)")
def test_qlora_4bit_on_cuda_merges_into_the_unquantized_base(tmp_path, tracking_uri, smolora_cache, monkeypatch):
    import mlflow

    from smolora_mlflow import SmoLoRA, SmoloraConfig

    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    cfg = SmoloraConfig(max_steps=4, max_length=32, per_device_train_batch_size=4, max_samples=32, device="cuda",
                        quantization="4bit", output_dir=str(tmp_path / "out"))
    lora = SmoLoRA(config=cfg)
    result = lora.train()
    layer = lora.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.weight.device.type == "cuda"
    lora.save()
    assert lora.quantization_error is not None
    with mlflow.start_run(run_id=result.run_id):
        info = lora.log_model(pip_requirements=["torch", "transformers", "safetensors"])
    block = mlflow.models.Model.load(info.model_uri).flavors["smolora"]["lora"]["quantization"]
    assert block["quantization"] == "4bit" and block["max_abs_logit_diff_vs_quantized"] >= 0
