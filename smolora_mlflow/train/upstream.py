"""Builders for the upstream objects training needs: the only places that know PEFT and TRL field names.

Each builder maps smolora's short fields to the upstream config, then applies the run's ``peft`` or
``trainer_args`` (already validated and typed against the same dataclass by the config), so any upstream
option is reachable and the user's value wins over a derived default.
"""

from __future__ import annotations

from typing import Any

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.models import pretrained


def get_lora_config(cfg: SmoloraConfig, **overrides: Any):
    """PEFT ``LoraConfig`` for a causal LM from ``cfg`` (its ``lora_*`` fields, then ``cfg.peft``)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    if isinstance(targets, list):
        targets = "all-linear" if targets == ["all-linear"] else list(targets)
    kwargs = {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,  # a str is PEFT's regex over full module names
        "bias": cfg.lora_bias,
        "task_type": "CAUSAL_LM",
    }
    kwargs.update(cfg.peft)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _common_args(cfg: SmoloraConfig, *, device: str, dtype: Any, has_eval: bool, output_dir: str) -> dict:
    """TrainingArguments fields every TRL config shares; MLflow logging is ours, so reporters stay off."""
    import torch

    eval_every = cfg.eval_steps if cfg.eval_steps > 0 else None
    return dict(
        output_dir=output_dir,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.activation_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy=("steps" if eval_every else "no") if has_eval else "no",
        eval_steps=eval_every,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in each forward pass
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        disable_tqdm=not pretrained.progress_enabled(),
    )


def get_sft_config(cfg: SmoloraConfig, *, device: str, dtype: Any, has_eval: bool, output_dir: str):
    """TRL ``SFTConfig`` from ``cfg`` (then ``cfg.trainer_args``)."""
    from trl import SFTConfig

    kwargs = _common_args(cfg, device=device, dtype=dtype, has_eval=has_eval, output_dir=output_dir)
    kwargs.update(max_length=cfg.max_length, packing=cfg.packing, dataset_text_field="text",
                  include_num_input_tokens_seen="non_padding")
    return SFTConfig(**{**kwargs, **cfg.trainer_args})


def grpo_num_generations(cfg: SmoloraConfig) -> int:
    """Completions per prompt: the largest of 8..2 that divides the generation batch (TRL requires it)."""
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return next((n for n in range(min(8, batch), 1, -1) if batch % n == 0), 2)


def get_trainer_config(cfg: SmoloraConfig, *, device: str, dtype: Any, has_eval: bool, output_dir: str):
    """The TRL config of ``cfg.method`` (SFTConfig, DPOConfig, KTOConfig or GRPOConfig)."""
    import trl

    if cfg.method == "sft":
        return get_sft_config(cfg, device=device, dtype=dtype, has_eval=has_eval, output_dir=output_dir)
    kwargs = _common_args(cfg, device=device, dtype=dtype, has_eval=has_eval, output_dir=output_dir)
    if cfg.method in ("dpo", "kto"):
        kwargs.update(max_length=cfg.max_length, include_num_input_tokens_seen="non_padding")
        cls = trl.DPOConfig if cfg.method == "dpo" else trl.KTOConfig
    else:
        # A small completion budget by default: GRPO generates num_generations completions per prompt each
        # step. log_completions stays off: the completions table goes to MLflow through our reward recorder.
        kwargs.update(num_generations=grpo_num_generations(cfg),
                      max_completion_length=min(64, max(8, cfg.max_length // 4)),
                      log_completions=False)
        cls = trl.GRPOConfig
    return cls(**{**kwargs, **cfg.trainer_args})


# ----------------------------------------------------------------------------------------------------
# QLoRA

# bitsandbytes runs k-bit layers on CUDA, and on CPU since its multi-backend releases (0.46+; checked with
# 0.50.2: NF4 forward and backward on CPU, for layer widths its packed CPU kernel accepts).
QUANTIZED_DEVICES = ("cuda", "cpu")


def check_quantization(quantization: str, device_type: str) -> None:
    """Raise before any work when ``quantization`` cannot run: bitsandbytes missing, or an unsupported device."""
    if quantization == "none":
        return
    if device_type not in QUANTIZED_DEVICES:
        raise ValueError(f"`quantization: {quantization}` runs on {' or '.join(QUANTIZED_DEVICES)} with bitsandbytes; "
                         f"the device is {device_type!r}. Set `device: cpu` (or cuda), or `quantization: none`.")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"`quantization: {quantization}` needs bitsandbytes, which is not installed (device "
                         f"{device_type!r}); `pip install 'smolora-mlflow[qlora]'`, or set `quantization: none`.")


def get_bnb_config(quantization: str):
    """transformers' ``BitsAndBytesConfig``: NF4 with double quantization and bf16 compute (the QLoRA paper's
    recipe), or LLM.int8(); None for ``none``."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def quantization_settings(quantization: str) -> dict[str, Any]:
    """What a record keeps of the quantization: the method and the bitsandbytes settings that matter."""
    if quantization == "none":
        return {}
    if quantization == "8bit":
        return {"quantization": "8bit", "load_in_8bit": True, "library": "bitsandbytes"}
    return {"quantization": "4bit", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16", "library": "bitsandbytes"}


def prepare_quantized(model, cfg: SmoloraConfig):
    """PEFT's ``prepare_model_for_kbit_training``: norms and head in float32, input grads for checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.activation_checkpointing)
