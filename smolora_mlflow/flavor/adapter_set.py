"""The ``adapter_set`` mode of the smolora flavor: several LoRA adapters served on one resident base.

An adapter set is an MLflow model that holds no weights, only references to registered smolora models
saved in ``adapter`` mode (``models:/name@alias``, ``models:/name/3``, ``runs:/...``), all trained on
the same base model (its weights' sha256 is checked for each, at save and at every load). Loading it puts
the base in memory once and each adapter on it with PEFT's ``load_adapter``, so an adapter costs its own
size, not another base. A request names its adapter (param ``adapter``, or ``model`` in the OpenAI API);
requests for different adapters share one ``generate`` call through PEFT's mixed-adapter batches
(``adapter_names``), with no merge.

References that can move (an alias, a stage, ``latest``) are resolved again every ``refresh_seconds``
(default 30; ``model_config={"refresh_seconds": ...}``, 0 turns it off): when one now names another
version, that version is downloaded, checked (manifest digest, file hashes, base hash) and loaded beside
the old one, and the name is switched between two ``generate`` calls; the old adapter is then unloaded.
A version that fails its checks is refused with a warning and the old one keeps serving.

Example:
    >>> from smolora_mlflow.flavor import adapter_set                                    # doctest: +SKIP
    >>> adapter_set.log_adapter_set("set", {"support": "models:/support@production",     # doctest: +SKIP
    ...                                     "sales": "models:/sales@production"}, registered_model_name="bots")
    >>> mlflow.pyfunc.load_model("models:/bots/1").predict({"prompt": ["Hi"]}, params={"adapter": "sales"})
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_STATE
from mlflow.types.schema import ParamSchema, ParamSpec
from mlflow.utils.environment import _CONDA_ENV_FILE_NAME, _PYTHON_ENV_FILE_NAME, _validate_env_arguments
from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path

from smolora_mlflow.constants import ADAPTER_PARAM, ADAPTER_SET_MODE, ADAPTER_SET_REFS_FILE, FLAVOR_NAME
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor import files
from smolora_mlflow.flavor.wrapper import MODEL_CONFIG_KEYS
from smolora_mlflow.models import manifest
from smolora_mlflow.models.folder_checks import FLAVOR_MODULE, hash_tree
from smolora_mlflow.models.integrity import VerifiedModel, open_verified

logger = logging.getLogger(__name__)

MODE = ADAPTER_SET_MODE
DATA = "adapter_set"
REFS_FILE = ADAPTER_SET_REFS_FILE
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]



def _check_refs(adapters: Any) -> dict[str, str]:
    if not isinstance(adapters, Mapping) or not adapters:
        raise invalid_input(f"`adapters` must be a non-empty dict of name -> model URI, got {adapters!r}.")
    for name, uri in adapters.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid_input(f"Adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                       "letter or digit.")
        if not isinstance(uri, str) or not uri:
            raise invalid_input(f"The model URI of adapter `{name}` must be a non-empty string, got {uri!r}.")
    return {str(k): str(v) for k, v in adapters.items()}


def _fetch(name: str, uri: str, base_sha256: str | None, dst: str | None = None, client=None) -> VerifiedModel:
    """Open one referenced adapter model through the integrity gate, then check it belongs in this set:
    adapter mode, and trained on the set's base weights.

    ``client`` names the stores to read (the pool's refresh thread passes the ones the set was loaded from);
    default: the current tracking and registry URIs.
    """
    vm = open_verified(uri, client=client, dst_path=dst)
    if vm.conf.get("mode") != "adapter":
        raise invalid_input(f"Adapter `{name}` ({uri}) is a smolora model in `{vm.conf.get('mode')}` mode; an "
                            "adapter set takes only models logged with mode='adapter'.")
    if base_sha256 and vm.conf.get("base_model_sha256") != base_sha256:
        raise MlflowException(
            f"Adapter `{name}` ({vm.uri}) was trained on base weights with sha256 "
            f"{vm.conf.get('base_model_sha256')}, but this adapter set's base has sha256 {base_sha256}; every "
            "adapter of a set must be trained on the same base model. Remove it or retrain it on that base.",
            error_code=INVALID_STATE)
    return vm


def _signature(defaults: Mapping[str, Any]) -> ModelSignature:
    sig = files.default_signature(defaults)
    sig.params = ParamSchema([*sig.params.params, ParamSpec(ADAPTER_PARAM, "string", "")])
    return sig


def save_model(path: str | os.PathLike, adapters: Mapping[str, str], *, refresh_seconds: float = 30.0,
               generation_defaults: dict[str, Any] | None = None, max_new_tokens_limit: int = 1024,
               max_prompt_tokens: int | None = None, pip_requirements: list[str] | str | None = None,
               extra_pip_requirements: list[str] | str | None = None, conda_env: Any = None,
               code_paths: list[str] | None = None, mlflow_model: Model | None = None,
               metadata: dict[str, Any] | None = None) -> None:
    """Save an adapter set: ``adapters`` maps each name requests use to a smolora adapter-mode model URI.

    Every adapter is fetched and checked now (the integrity gate, then adapter mode) and must record the
    same base weights hash and the same ``prompt_format`` as the first (the set records that format, and
    renders chat requests with it); the base must be available locally for its generation defaults.
    """
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    refs = _check_refs(adapters)
    path = Path(path).absolute()
    _validate_and_prepare_target_save_path(str(path))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            first_name = next(iter(refs))
            first = _fetch(first_name, refs[first_name], None, os.path.join(tmp, first_name))
            base_sha = first.conf.get("base_model_sha256")
            formats = {first_name: first.conf.get("prompt_format") or "plain"}
            for name, uri in list(refs.items())[1:]:
                formats[name] = _fetch(name, uri, base_sha, os.path.join(tmp, name)).conf.get(
                    "prompt_format") or "plain"
        if len(set(formats.values())) > 1:
            raise invalid_input(f"The adapters of a set must share one prompt format (how their training rendered "
                       f"prompts), since the set renders every request alike; got {formats}. Put adapters "
                       "with different formats in different sets.")
        code_subpath = _validate_and_copy_code_paths([str(_PACKAGE_DIR), *(code_paths or [])], str(path))
        code_sha256 = hash_tree(path / code_subpath)
        data_dir = path / DATA
        data_dir.mkdir()
        (data_dir / REFS_FILE).write_text(json.dumps(refs, indent=2), encoding="utf-8")
        base_dir = files.local_base_dir(first.conf.get("base_model"))
        defaults = files.generation_defaults(base_dir, generation_defaults, max_new_tokens_limit)
        conf = {key: first.conf.get(key) for key in ("base_model", "base_model_revision", "base_model_sha256",
                                                     "torch_version", "transformers_version", "peft_version")}
        conf.update(mode=MODE, data=DATA, adapters=refs, prompt_format=formats[first_name],
                    refresh_seconds=float(refresh_seconds),
                    generation_defaults=defaults, max_new_tokens_limit=max_new_tokens_limit,
                    max_prompt_tokens=max_prompt_tokens, context_length=files.context_length(base_dir),
                    file_sha256=hash_tree(data_dir), code_sha256=code_sha256,
                    format_version=manifest.FORMAT_VERSION)
        mlflow_model = mlflow_model or Model()
        example, example_params = files.default_input_example(defaults)
        _save_example(mlflow_model, (example, {**example_params, ADAPTER_PARAM: first_name}), str(path))
        mlflow_model.signature = _signature(defaults)
        if metadata is not None:
            mlflow_model.metadata = metadata
        pyfunc.add_to_model(mlflow_model, loader_module=FLAVOR_MODULE, data=DATA, code=code_subpath,
                            conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME, streamable=True,
                            model_config=dict.fromkeys(MODEL_CONFIG_KEYS))
        mlflow_model.add_flavor(FLAVOR_NAME, code=code_subpath, **conf)
        mlflow_model.save(str(path / MLMODEL_FILE_NAME))
        defaults = [files.pin(p) for p in ("torch", "transformers", "safetensors", "tokenizers", "peft")]
        files.write_requirements(path, defaults, pip_requirements,
                                 extra_pip_requirements, conda_env)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def log_model(name: str, adapters: Mapping[str, str], *, registered_model_name: str | None = None,
              **kwargs: Any) -> ModelInfo:
    """Log an adapter set to the active run (or ``run_id=``); ``kwargs`` as :func:`save_model` and ``Model.log``."""
    info = Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__], flavor_name=FLAVOR_NAME,
                     registered_model_name=registered_model_name, adapters=adapters, **kwargs)
    manifest.record(info, registered_model_name)
    return info


save_adapter_set, log_adapter_set = save_model, log_model
