"""SmoLoRA training: invariants of LoRA training, inference paths, resume, and the upstream builders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow.train import get_lora_config, get_sft_config
from smolora_mlflow.train.checkpoints import MARKER_FILE, list_checkpoints, resolve_resume

TINY = {
    "max_length": 32,
    "per_device_train_batch_size": 4,
    "max_samples": 64,
    "logging_steps": 1,
    "lora_dropout": 0.0,
    "tracking": False,
    "learning_rate": 0.005,
    "lora_target_modules": ["all-linear"],
}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")


def _tiny(tmp_path, **over) -> SmoloraConfig:
    return SmoloraConfig(**{**TINY, "output_dir": str(tmp_path / "out"), **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smolora_cache):
    """One short run on the demo model and the demo dataset, shared by the inference tests."""
    out = tmp_path_factory.mktemp("trained")
    lora = SmoLoRA("smolora:demo", "smolora:reviews", config=SmoloraConfig(**{**TINY, "max_steps": 30,
                                                                               "output_dir": str(out)}))
    result = lora.train()
    return lora, result


def test_training_changes_only_lora_weights(trained, demo_model_dir):
    from transformers import AutoModelForCausalLM

    lora, result = trained
    fresh = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    base = dict(lora.model.get_base_model().named_parameters())
    lora_b = {n: p for n, p in base.items() if "lora_B" in n}
    assert lora_b, "no LoRA layers were injected"
    # LoRA B starts at zero: training moved every one of them.
    assert all(p.abs().sum() > 0 for p in lora_b.values())
    for name, p in fresh.named_parameters():
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        key = key if key in base else key.replace(".bias", ".base_layer.bias")
        assert torch.equal(base[key].detach().cpu(), p.detach()), f"base weight {name} changed"
    assert result.global_step == 30


def test_loss_goes_down_on_the_demo_dataset(trained):
    lora, _ = trained
    history = json.loads((lora.output_dir / "adapter" / "smolora_base.json").read_text())
    assert history["base_model"] == "smolora:demo" and len(history["sha256"]) == 64
    # trainer_state is not kept without checkpoints; the model is evaluated directly instead.
    tok = lora.tokenizer
    texts = ["The pizza was delicious. Our waiter was friendly. I would come back."] * 4
    batch = tok(texts, return_tensors="pt")
    with torch.no_grad():
        tuned = lora.model(**batch, labels=batch["input_ids"]).loss.item()
        with lora.model.disable_adapter():
            base = lora.model(**batch, labels=batch["input_ids"]).loss.item()
    assert tuned < base - 0.3, (tuned, base)


def test_adapter_is_safetensors_with_config(trained):
    _, result = trained
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)


def test_save_load_round_trip_and_inference_paths(trained, tmp_path):
    lora, _ = trained
    merged_dir = lora.save(tmp_path / "final_merged")
    assert (merged_dir / "model.safetensors").is_file()
    prompts = ["The food was", "Our waiter", "I would come back because the"]
    in_memory = lora.batch_inference(prompts, max_new_tokens=12)
    again = SmoLoRA(config=lora.config)
    again.load_model(merged_dir)
    assert [again.inference(p, max_new_tokens=12) for p in prompts] == in_memory
    assert again.batch_inference(prompts, max_new_tokens=12, batch_size=2) == in_memory
    streamed = ["".join(again.streaming_inference(p, max_new_tokens=12)) for p in prompts]
    assert streamed == in_memory


def test_load_adapter_model_matches_merged(trained):
    lora, result = trained
    other = SmoLoRA(config=lora.config)
    other.load_adapter_model("smolora:demo", result.adapter_dir)
    unmerged = other.batch_inference(["The food was", "Our waiter"], max_new_tokens=10)
    other.load_adapter_model("smolora:demo", result.adapter_dir, merge=True)
    assert other.batch_inference(["The food was", "Our waiter"], max_new_tokens=10) == unmerged


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class _Interrupted(SmoLoRA):
    """A SmoLoRA whose training stops at `stop_at`, as a killed process would after its last checkpoint."""

    stop_at = 4

    def _build_trainer(self, *args, **kwargs):
        trainer = super()._build_trainer(*args, **kwargs)
        trainer.add_callback(_StopAt(self.stop_at))
        return trainer


def _adapter_state(lora: SmoLoRA) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora.model.named_parameters() if "lora_" in n}


def test_resume_reaches_the_same_weights(tmp_path):
    full = SmoLoRA(config=_tiny(tmp_path / "a", max_steps=8, save_steps=4))
    want = full.train()
    cut = _Interrupted(config=_tiny(tmp_path / "b", max_steps=8, save_steps=4))
    assert cut.train().global_step == 4
    assert [p.name for p in list_checkpoints(cut.output_dir)] == ["checkpoint-4"]
    resumed = SmoLoRA(config=_tiny(tmp_path / "b", max_steps=8, save_steps=4, resume_from_checkpoint="latest"))
    got = resumed.train()
    assert got.global_step == 8
    # train_loss covers all 8 steps, not only the 4 resumed ones (transformers' own value for this call)
    assert got.metrics["train_loss"] == pytest.approx(want.metrics["train_loss"], rel=1e-5)
    a, b = _adapter_state(full), _adapter_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="found no complete checkpoint"):
        resolve_resume("latest", out)
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_resume(str(out / "checkpoint-2"), out)
    (out / "checkpoint-2" / MARKER_FILE).write_text("{}")
    assert resolve_resume("latest", out) == out / "checkpoint-2"
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        resolve_resume("nowhere", out)


def test_builders_translate_the_config():
    cfg = SmoloraConfig(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj"], learning_rate=1e-3, max_steps=3,
                        activation_checkpointing=False)
    lora_cfg = get_lora_config(cfg)
    assert (lora_cfg.r, lora_cfg.lora_alpha, set(lora_cfg.target_modules)) == (4, 8, {"q_proj"})
    sft = get_sft_config(cfg, device="cpu", dtype=torch.float32, has_eval=False, output_dir="x")
    assert sft.report_to == [] or sft.report_to in ("none", ["none"])
    assert sft.bf16 is False and sft.activation_checkpointing is False and sft.max_steps == 3
    assert get_lora_config(SmoloraConfig(lora_target_modules="all-linear")).target_modules == "all-linear"


def test_trust_remote_code_is_off_by_default(tmp_path):
    lora = SmoLoRA(config=_tiny(tmp_path))
    assert lora.config.trust_remote_code is False


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("./no/such/folder", "does not exist"),
        ("smolora_mlflow", "has no config.json"),
    ],
)
def test_bad_base_model_paths(tmp_path, base, message, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])
    lora = SmoLoRA(base_model=base, config=_tiny(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=message):
        lora.train()


def test_not_a_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=100)).save_pretrained(bert)
    from smolora_mlflow.models.pretrained import load_causal_lm

    with pytest.raises(ValueError, match="not a causal language model"):
        load_causal_lm(str(bert))
