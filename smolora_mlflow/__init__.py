"""smolora_mlflow: fine-tune, track, version and serve LoRA adapters of causal LMs on MLflow.

Importing the package is cheap; the heavy names load on first use.

Example:
    >>> from smolora_mlflow import SmoLoRA, SmoloraConfig
    >>> lora = SmoLoRA("smolora:demo", "smolora:reviews", config=SmoloraConfig(max_steps=20))
"""

from __future__ import annotations

import importlib
from typing import Any

from smolora_mlflow.config import DEMO_DATASET, DEMO_MODEL, SmoloraConfig

__version__ = "0.1.0"

_LAZY = {
    "SmoLoRA": "smolora_mlflow.train.smolora",
}

__all__ = ["DEMO_DATASET", "DEMO_MODEL", "SmoLoRA", "SmoloraConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smolora_mlflow' has no attribute {name!r}")
