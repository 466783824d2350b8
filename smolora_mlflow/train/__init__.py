"""LoRA fine-tuning with TRL and PEFT behind the SmoLoRA API.

:mod:`~smolora_mlflow.train.smolora` (``SmoLoRA``), :mod:`~smolora_mlflow.train.upstream` (the PEFT/TRL
config builders), checkpoints and resume, merging, and publishing the trained model to MLflow.
"""

from __future__ import annotations

from smolora_mlflow.train.smolora import ADAPTER_DIR, MERGED_DIR, SmoLoRA, TrainResult
from smolora_mlflow.train.upstream import get_lora_config, get_sft_config

__all__ = ["ADAPTER_DIR", "MERGED_DIR", "SmoLoRA", "TrainResult", "get_lora_config", "get_sft_config"]
