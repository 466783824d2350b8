"""Builders for the upstream objects training needs: the only places that know PEFT and TRL field names."""

from __future__ import annotations

from typing import Any

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.models import pretrained


def get_lora_config(cfg: SmoloraConfig, **overrides: Any):
    """PEFT ``LoraConfig`` for a causal LM from ``cfg``."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    kwargs = {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": "all-linear" if targets == ["all-linear"] else list(targets),
        "bias": cfg.lora_bias,
        "task_type": "CAUSAL_LM",
    }
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def get_sft_config(cfg: SmoloraConfig, *, device: str, dtype: Any, has_eval: bool, output_dir: str):
    """TRL ``SFTConfig`` from ``cfg``; MLflow logging is ours, so the stock reporters stay off."""
    import torch
    from trl import SFTConfig

    eval_every = cfg.eval_steps if cfg.eval_steps > 0 else None
    return SFTConfig(
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
        max_length=cfg.max_length,
        packing=cfg.packing,
        activation_checkpointing=cfg.activation_checkpointing,
        include_num_input_tokens_seen="non_padding",
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
        dataset_text_field="text",
        disable_tqdm=not pretrained.progress_enabled(),
    )
