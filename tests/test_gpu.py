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
