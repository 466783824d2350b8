"""Shared fixtures: offline tiny models, a private MLflow store per test, no leaked active runs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest

# The smallest training that still exercises every part: for end-to-end tests whose subject is elsewhere.
TINY_TRAINING = {
    "max_steps": 4,
    "max_length": 32,
    "max_samples": 32,
    "per_device_train_batch_size": 4,
    "lora_dropout": 0.0,
    "learning_rate": 0.005,
    "sample_prompts": ["The food was"],
    "sample_max_new_tokens": 4,
}


@pytest.fixture(scope="session")
def smolora_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole session, so the demo model is built once."""
    path = tmp_path_factory.mktemp("smolora-cache")
    os.environ["SMOLORA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_model_dir(smolora_cache) -> Path:
    """The built-in offline demo base model, loaded through its real from_pretrained path."""
    from smolora_mlflow.models.demo import demo_model_path

    return demo_model_path(smolora_cache)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, demo_model_dir) -> Path:
    """A second tiny Llama (different width and seed) that reuses the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A private SQLite tracking store and artifact root for this test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.tracking.fluent._active_experiment_id = None  # no experiment chosen by an earlier test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(autouse=True)
def _no_leaked_active_run():
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            mlflow.end_run("FAILED")
            pytest.fail(f"test left MLflow run {run.info.run_id} active")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def kernelize_calls(monkeypatch):
    """Every call transformers makes to ``kernels.kernelize`` (the real one still runs, finding no CPU
    kernels); the tests assert the list stays empty unless Hub kernels were asked for."""
    import kernels
    import transformers.integrations.hub_kernels as hub_kernels

    calls: list[dict] = []
    real = hub_kernels._kernels_kernelize  # bound by transformers at import: `from kernels import kernelize`

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_kernels, "_kernels_kernelize", spy)
    monkeypatch.setattr(kernels, "kernelize", spy)
    return calls
