"""The ``smolora`` MLflow flavor: LoRA fine-tuned causal LMs as MLflow models.

Shaped like MLflow's own flavor modules: constants -> ``get_default_pip_requirements`` ->
``get_default_conda_env`` -> ``save_model`` -> ``log_model`` -> ``_load_model`` -> the private pyfunc
wrapper -> ``_load_pyfunc`` -> ``load_model``. MLflow is imported here; torch and transformers only
inside functions; peft only inside the adapter-mode loader, so a merged model's inferred requirements
never name peft or trl.

A model is saved in one of two modes:

- ``merged``: full safetensors weights, tokenizer and generation config under ``model/``.
- ``adapter``: only the PEFT adapter under ``adapter/`` plus a reference to the base model (hub id,
  local path, or ``smolora:demo``), its revision and the sha256 of its weights, checked at load.

The package source travels in the model's ``code/`` folder, so a scoring server needs only public
packages. The pyfunc wrapper streams (``predict_stream``) and coalesces concurrent requests.

Example:
    >>> import mlflow, smolora_mlflow.flavor as flavor
    >>> flavor.save_model("out/model", "outputs/merged")
    >>> mlflow.pyfunc.load_model("out/model").predict({"prompt": ["The food was"]})
"""

from __future__ import annotations

from smolora_mlflow.constants import FLAVOR_NAME

# MLflow calls the loader hook by name on this module (MLmodel: loader_module: smolora_mlflow.flavor).
from smolora_mlflow.flavor.loading import _load_model, _load_pyfunc, load_model  # noqa: F401
from smolora_mlflow.flavor.saving import get_default_conda_env, get_default_pip_requirements, log_model, save_model
from smolora_mlflow.models.verified import weights_sha256

__all__ = ["FLAVOR_NAME", "get_default_conda_env", "get_default_pip_requirements", "load_model",
           "log_model", "save_model", "weights_sha256"]
