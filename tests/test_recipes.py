"""Recipes (issue 21): upstream PEFT/TRL options, DPO/KTO/GRPO through TRL's trainers, LoRA variants.

Every training here runs on the tiny offline models against a private SQLite store, and asserts what the
run recorded.
"""

from __future__ import annotations

import json

import pytest
import torch

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow.config import ConfigError

RECIPE = {
    "max_length": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
    "sample_prompts": ["The soup was"],
    "sample_max_new_tokens": 4,
    "logging_steps": 2,
}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, smolora_cache):
    """One torch thread: these tiny models spend more time in thread hand-offs than in arithmetic, most of
    all on a shared, loaded machine (measured: GRPO steps 7x faster)."""
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sharp_llama_dir(tmp_path_factory, demo_model_dir):
    """A tiny Llama whose next-token distribution is far from uniform (untied head, larger init), so that a
    few dozen policy-gradient steps can move it. The demo model's output is nearly flat: its tied embeddings
    bound every logit to about +-1.3, and TRL's GRPO refuses a LoRA on ``lm_head`` that could lift them."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("sharp-llama")
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _history(run_id: str, key: str) -> list[float]:
    import mlflow

    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def _table(run_id: str, path: str):
    import mlflow
    import pandas as pd

    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))  # log_table's split layout
    return pd.DataFrame(table["data"], columns=table["columns"])


# ----------------------------------------------------------------------------------------------------
# options pass through, validated against the upstream dataclasses


def test_unknown_and_ill_typed_upstream_options_are_all_reported_with_the_closest_field():
    with pytest.raises(ConfigError) as e:
        SmoloraConfig(method="dpo", peft={"use_dorra": True, "use_rslora": "maybe"},
                      trainer_args={"betta": 0.1, "report_to": "wandb"}, lora_r=0)
    text = str(e.value)
    assert len(e.value.problems) == 5, text
    assert "`peft.use_dorra` is not a field of LoraConfig. Did you mean `use_dora`?" in text
    assert "`peft.use_rslora` must be true or false" in text and "'maybe'" in text
    assert "`trainer_args.betta` is not a field of DPOConfig. Did you mean `beta`?" in text
    assert "`trainer_args.report_to` cannot be set" in text and "`lora_r`" in text


def test_lora_fields_are_aliases_and_a_key_given_both_ways_is_an_error():
    cfg = SmoloraConfig(peft={"r": 4, "lora_alpha": 8, "use_dora": "true"})
    assert (cfg.lora_r, cfg.lora_alpha, cfg.peft) == (4, 8, {"use_dora": True})
    assert cfg.replace(max_steps=3).lora_r == 4  # a round trip keeps one spelling
    with pytest.raises(ConfigError, match=r"`peft.r` and `lora_r` set the same option"):
        SmoloraConfig(lora_r=16, peft={"r": 4})
    with pytest.raises(ConfigError, match=r"`trainer_args.learning_rate` and `learning_rate`"):
        SmoloraConfig(learning_rate=0.1, trainer_args={"learning_rate": 0.2})


def test_cli_and_mlproject_spellings_reach_the_upstream_configs():
    from smolora_mlflow.cli.parser import build_config, parse_args
    from smolora_mlflow.train.upstream import get_lora_config, get_trainer_config

    args = parse_args(["train", "--method", "dpo", "--peft", "use_dora=true,init_lora_weights=pissa",
                       "--trainer_args", "beta=0.25,loss_type=sigmoid|bco_pair", "--set",
                       "lora_target_modules=.*\\.(q|v)_proj"])
    cfg = build_config(args)
    assert cfg.peft == {"use_dora": True, "init_lora_weights": "pissa"}
    assert cfg.trainer_args == {"beta": 0.25, "loss_type": ["sigmoid", "bco_pair"]}
    lora = get_lora_config(cfg)
    assert (lora.use_dora, lora.init_lora_weights, lora.target_modules) == (True, "pissa", r".*\.(q|v)_proj")
    dpo = get_trainer_config(cfg, device="cpu", dtype=torch.float32, has_eval=False, output_dir="x")
    assert type(dpo).__name__ == "DPOConfig" and dpo.beta == 0.25 and dpo.report_to == []


def test_missing_columns_list_what_is_there_and_what_the_method_needs():
    from smolora_mlflow.data import DataError, prepare_method_data

    with pytest.raises(DataError) as e:
        prepare_method_data(SmoloraConfig(method="dpo"), [{"prompt": "a", "completion": "b"}])
    assert "`chosen`, `rejected`" in str(e.value) and "its columns are `prompt`, `completion`" in str(e.value)
    kto = prepare_method_data(SmoloraConfig(method="kto"))  # the demo pairs, as labelled completions
    assert kto.format == "unpaired_preference" and set(kto.train["label"]) == {True, False}


def test_plain_pairs_become_chat_turns_for_a_chat_format_run():
    from smolora_mlflow.data import as_chat_turns, prepare_method_data

    data = as_chat_turns(prepare_method_data(SmoloraConfig(method="dpo"), [{"prompt": "Q?", "chosen": " yes",
                                                                            "rejected": " no"}] * 2))
    assert data.train[0] == {"prompt": [{"role": "user", "content": "Q?"}],
                             "chosen": [{"role": "assistant", "content": "yes"}],
                             "rejected": [{"role": "assistant", "content": "no"}]}


def test_reward_functions_built_in_and_imported():
    from smolora_mlflow.train.rewards import resolve_rewards

    fns = resolve_rewards(SmoloraConfig(method="grpo", rewards=["length_target=4", "regex_match=^ {answer}",
                                                                "exact_answer", "json:dumps"]))
    assert [f.__name__ for f in fns] == ["length_target", "regex_match", "exact_answer", "dumps"]
    completions, answers = [" good", " bad."], ["good", "good"]
    assert fns[0](prompts=["p"] * 2, completions=[" bad", " good"]) == [1.0, 0.75]
    assert fns[1](prompts=["p"] * 2, completions=completions, answer=answers) == [1.0, 0.0]
    assert fns[2](prompts=["p"] * 2, completions=completions, answer=answers) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward 'lenght'"):
        resolve_rewards(SmoloraConfig(method="grpo", rewards=["lenght"]))


def test_method_metric_names_are_made_legal_for_mlflow():
    from smolora_mlflow.tracking.callback import metric_name

    assert metric_name("rewards/my.mod:fn<1>/mean") == "rewards/my.mod_fn_1_/mean"
    assert metric_name("rewards/chosen") == "rewards/chosen"


# ----------------------------------------------------------------------------------------------------
# methods


def test_dpo_learns_the_toy_preferences_and_records_everything(tracking_uri, tmp_path):
    import mlflow

    cfg = SmoloraConfig(**RECIPE, method="dpo", max_steps=10, per_device_train_batch_size=8, learning_rate=0.01,
                        eval_fraction=0.125, trainer_args={"beta": 0.1}, output_dir=str(tmp_path / "dpo"))
    result = SmoLoRA(config=cfg).train()
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    accuracies = _history(result.run_id, "rewards/accuracies")
    assert len(accuracies) == 5 and min(accuracies[-2:]) >= 0.8, accuracies  # chance is 0.5
    assert run.data.metrics["eval_rewards/accuracies"] >= 0.8
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "trainable_params", "adapter_size_bytes"):
        assert key in run.data.metrics, key
    assert "eval_perplexity" not in run.data.metrics  # a DPO loss is no token NLL
    assert run.data.params["method"] == "dpo" and run.data.params["trainer.beta"] == "0.1"
    assert run.data.params["dataset_format"] == "preference"
    trainer_cfg = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/config/trainer_config.json"))
    lora_cfg = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/config/lora_config.json"))
    assert trainer_cfg["beta"] == 0.1 and trainer_cfg["max_steps"] == 10 and lora_cfg["r"] == cfg.lora_r
    scores = _table(result.run_id, "preference_scores.json")
    assert list(scores["step"].unique()) == [10] and len(scores) == 8
    assert (scores["margin"] > 0).mean() >= 0.75
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "evaluation"}


@pytest.mark.slow
def test_grpo_raises_a_rule_based_reward(tracking_uri, tmp_path, sharp_llama_dir):
    import mlflow

    cfg = SmoloraConfig(**{**RECIPE, "logging_steps": 3}, base_model=str(sharp_llama_dir), method="grpo",
                        max_steps=30, per_device_train_batch_size=16, learning_rate=0.02,
                        rewards=["length_target=30"], trainer_args={"max_completion_length": 6},
                        output_dir=str(tmp_path / "grpo"))
    result = SmoLoRA(config=cfg).train()
    rewards = _history(result.run_id, "rewards/length_target/mean")
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards  # measured: 0.54 -> 0.83
    run = mlflow.MlflowClient().get_run(result.run_id)
    for key in ("rewards/length_target/std", "reward", "reward_std", "completions/mean_length", "clip_ratio/low_mean"):
        assert key in run.data.metrics, key
    table = _table(result.run_id, "completions.json")
    assert set(table.columns) >= {"step", "prompt", "completion", "length_target"}
    assert sorted(table["step"].unique()) == list(range(3, 31, 3))


def test_kto_trains_on_the_demo_pairs(tracking_uri, tmp_path):
    import mlflow

    cfg = SmoloraConfig(**RECIPE, method="kto", max_steps=2, per_device_train_batch_size=8, learning_rate=0.01,
                        output_dir=str(tmp_path / "kto"))
    result = SmoLoRA(config=cfg).train()
    metrics = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert {"kl", "rewards/chosen", "logps/chosen"} <= set(metrics)


# ----------------------------------------------------------------------------------------------------
# LoRA variants


def _logits(model, tokenizer, text="The soup was fresh and"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


@pytest.mark.parametrize("peft", [{"use_dora": True}, {"init_lora_weights": "pissa", "use_rslora": True}])
def test_variant_adapters_merge_into_the_original_base(peft, tmp_path, demo_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SmoloraConfig(**{**RECIPE, "lora_target_modules": ["q_proj", "v_proj"]}, peft=peft, max_steps=3,
                        per_device_train_batch_size=4, max_samples=16, learning_rate=0.01, tracking=False,
                        output_dir=str(tmp_path / "out"))
    lora = SmoLoRA(config=cfg)
    lora.train()
    adapter_cfg = json.loads((lora.adapter_dir / "adapter_config.json").read_text())
    if "use_dora" in peft:
        assert adapter_cfg["use_dora"] is True
    else:  # converted by PEFT into a plain LoRA of rank 2r on the original base
        assert adapter_cfg["init_lora_weights"] is True and adapter_cfg["r"] == 2 * cfg.lora_r
    merged_dir = lora.save()  # merge_adapter verifies merged logits against adapter-on-base
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir), lora.adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    assert torch.allclose(_logits(merged, tok), _logits(on_base.eval(), tok), atol=1e-4)
    assert not torch.allclose(_logits(merged, tok), _logits(base, tok), atol=1e-4)  # training did something


def test_dora_adapter_packages_registers_serves_and_is_refused_in_an_adapter_set(tracking_uri, tmp_path,
                                                                                demo_model_dir):
    import mlflow
    from mlflow.exceptions import MlflowException
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow import flavor
    from smolora_mlflow.flavor import adapter_set
    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    torch.manual_seed(0)
    adapter = tmp_path / "dora"
    with quiet_upstream_deprecations():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                          init_lora_weights=False))
        model.save_pretrained(adapter)
    with mlflow.start_run():
        info = flavor.log_model("model", mode="adapter", adapter_dir=adapter, base_model=str(demo_model_dir),
                                pip_requirements=["torch", "transformers", "peft"], registered_model_name="dora")
    conf = mlflow.models.Model.load(info.model_uri).flavors["smolora"]
    assert conf["lora"]["use_dora"] is True
    served = mlflow.pyfunc.load_model("models:/dora/1").predict({"prompt": ["The soup was"]},
                                                                params={"max_new_tokens": 4})
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    native = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir), adapter).eval()
    ids = tok("The soup was", return_tensors="pt")
    with torch.no_grad():
        out = native.generate(**ids, max_new_tokens=4, do_sample=False)
    assert served["generated_text"][0] == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(MlflowException, match=r"DoRA adapter .*mixed-adapter batches"):
        adapter_set.save_model(tmp_path / "set", {"dora": "models:/dora/1"})


# ----------------------------------------------------------------------------------------------------
# QLoRA


def _bitsandbytes_skip_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (optional extra `qlora`: pip install 'smolora-mlflow[qlora]')"
    return None


def test_quantization_on_an_unsupported_device_fails_before_any_work(tmp_path):
    from smolora_mlflow.train.upstream import check_quantization

    with pytest.raises(ValueError, match=r"runs on cuda or cpu with bitsandbytes; the device is 'mps'"):
        check_quantization("4bit", "mps")
    if _bitsandbytes_skip_reason():
        with pytest.raises(ValueError, match=r"needs bitsandbytes, which is not installed \(device 'cpu'\)"):
            SmoLoRA(config=SmoloraConfig(quantization="4bit", device="cpu", output_dir=str(tmp_path)))


@pytest.mark.skipif(_bitsandbytes_skip_reason() is not None, reason=str(_bitsandbytes_skip_reason()))
def test_qlora_4bit_trains_and_merges_into_the_unquantized_base(tracking_uri, tmp_path, sharp_llama_dir):
    """NF4 on CPU needs bitsandbytes' CPU backend and layer widths its packed kernel takes (multiples of 64)."""
    import mlflow

    cfg = SmoloraConfig(**RECIPE, base_model=str(sharp_llama_dir), quantization="4bit", device="cpu",
                        max_steps=2, per_device_train_batch_size=4, max_samples=8, learning_rate=0.01,
                        output_dir=str(tmp_path / "q"))
    lora = SmoLoRA(config=cfg)
    result = lora.train()
    assert type(lora.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    lora.save()  # merged into the float32 base and verified against the adapter on it
    assert lora.quantization_error is not None and lora.quantization_error > 0
    with mlflow.start_run(run_id=result.run_id):
        info = lora.log_model(mode="merged", pip_requirements=["torch", "transformers"])
    block = mlflow.models.Model.load(info.model_uri).flavors["smolora"]["lora"]["quantization"]
    assert block["bnb_4bit_quant_type"] == "nf4" and block["bnb_4bit_use_double_quant"] is True
    assert block["max_abs_logit_diff_vs_quantized"] == pytest.approx(lora.quantization_error)
    assert mlflow.MlflowClient().get_run(result.run_id).data.params["quantization"] == "4bit"
