"""What the smolora flavor writes on disk: weights, hashes, provenance, signature, card.

Only safetensors weights are accepted (no pickle ever reaches a server), a link leaving the source folder
is refused, every file of the model's data folder and of its shipped code is hashed at save time (and
checked at load time by the integrity gate, :mod:`smolora_mlflow.models.integrity`), and the generation
defaults the signature advertises come from the model's own ``generation_config`` where it sets them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.models import ModelSignature, infer_pip_requirements
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to

from smolora_mlflow.config import DEMO_MODEL
from smolora_mlflow.constants import FLAVOR_NAME
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor.inputs import OUTPUT_COLUMN, PARAM_TYPES, PROMPT_COLUMN, validate_params
from smolora_mlflow.models.folder_checks import hash_tree, read_mlmodel, refuse_escaping_links, require_smolora
from smolora_mlflow.models.generation import GENERATION_DEFAULTS
from smolora_mlflow.models.manifest import FORMAT_VERSION
from smolora_mlflow.models.pretrained import local_base_dir
from smolora_mlflow.models.verified import weights_sha256

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Trainer state a checkpoint folder may hold; never needed to serve, so left behind quietly.
TRAINER_STATE_FILES = {
    "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "trainer_state.json"
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXAMPLE_PROMPT = "Once upon a time"
MODES = ("merged", "adapter")
DATA_SUBPATH = {"merged": "model", "adapter": "adapter"}
_SELF_DISTRIBUTIONS = {"smolora-mlflow", "smolora_mlflow"}


def read_flavor_conf(model_root: str | Path) -> dict[str, Any]:
    """The ``smolora`` block of a model folder's MLmodel, unchecked (loads check it through the gate)."""
    root = Path(model_root)
    mlmodel = read_mlmodel(root)
    require_smolora(root, mlmodel, None)
    return mlmodel["flavors"][FLAVOR_NAME]


def _refuse_pickle(files: list[Path]) -> None:
    bad = [f.name for f in files if f.suffix in PICKLE_SUFFIXES and f.name not in TRAINER_STATE_FILES]
    if bad:
        raise invalid_input(
            f"Pickle-based files {bad} cannot be saved in a smolora model: loading them runs arbitrary "
            "code. Save the weights as safetensors (`model.save_pretrained(dir)`) and pass that folder."
        )


def check_merged_dir(model_dir: str | Path) -> list[Path]:
    """The files of a ``save_pretrained`` folder, after refusing pickles and checking it is complete."""
    src = Path(model_dir)
    if not src.is_dir():
        raise invalid_input(f"`model_dir` `{src}` is not a directory.")
    _refuse_links(src, "model_dir")
    files = [f for f in sorted(src.iterdir()) if f.is_file() and not f.name.startswith(".")]
    _refuse_pickle(files)
    if not any(f.suffix == ".safetensors" for f in files):
        raise invalid_input(
            f"`model_dir` `{src}` holds no *.safetensors weights; save the model with `save_pretrained`."
        )
    if not (src / "config.json").is_file():
        raise invalid_input(f"`model_dir` `{src}` has no config.json.")
    return files


def copy_merged_model(model_dir: str | Path, dst: Path) -> None:
    """Copy a ``save_pretrained`` folder (safetensors weights, config, tokenizer) into ``dst``."""
    files = check_merged_dir(model_dir)
    dst.mkdir(parents=True)
    for f in files:
        if f.name in TRAINER_STATE_FILES or f.name == "README.md":
            continue
        shutil.copy2(f, dst / f.name)


def _refuse_links(src: Path, argument: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        refuse_escaping_links(src, f"`{argument}`")
    except MlflowException as e:
        raise invalid_input(e.message) from None


def check_adapter_dir(adapter_dir: str | Path) -> None:
    src = Path(adapter_dir)
    _refuse_links(src, "adapter_dir")
    if (src / "adapter_model.bin").is_file() and not (src / "adapter_model.safetensors").is_file():
        _refuse_pickle([src / "adapter_model.bin"])
    missing = [name for name in ADAPTER_FILES if not (src / name).is_file()]
    if missing:
        raise invalid_input(
            f"`adapter_dir` `{src}` lacks {missing}; pass a folder written by PEFT's `save_pretrained`."
        )


def keep_only_adapter(adapter_dir: Path) -> None:
    """Check a freshly written adapter folder and drop everything but the adapter files."""
    check_adapter_dir(adapter_dir)
    for f in adapter_dir.iterdir():
        if f.name not in ADAPTER_FILES:
            shutil.rmtree(f) if f.is_dir() else f.unlink()


def copy_adapter(adapter_dir: str | Path, dst: Path) -> None:
    """Copy only the PEFT adapter (config + safetensors weights) into ``dst``."""
    src = Path(adapter_dir)
    check_adapter_dir(src)
    dst.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def lora_settings(adapter_config: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")
    out = {k: adapter_config[k] for k in keys if adapter_config.get(k) is not None}
    if isinstance(out.get("target_modules"), (set, tuple)):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def context_length(model_dir: Path | None) -> int | None:
    config = read_json(model_dir / "config.json") if model_dir else {}
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if value else None


def generation_defaults(
    model_dir: Path | None, overrides: Mapping[str, Any] | None, max_new_tokens_limit: int
) -> dict[str, Any]:
    """GENERATION_DEFAULTS, then what the model's generation_config.json sets, then ``overrides``."""
    from_model = {}
    gen_cfg = read_json(model_dir / "generation_config.json") if model_dir else {}
    for key in PARAM_TYPES:
        if gen_cfg.get(key) is not None and key not in ("seed", "return_full_text"):
            from_model[key] = gen_cfg[key]
    if from_model.get("max_new_tokens", 0) > max_new_tokens_limit:
        from_model["max_new_tokens"] = max_new_tokens_limit
    merged = {**GENERATION_DEFAULTS, **from_model}
    return validate_params(overrides or {}, merged, max_new_tokens_limit)


_SPEC_TYPES = {int: "long", float: "double", bool: "boolean"}


def default_signature(defaults: Mapping[str, Any]) -> ModelSignature:
    """``prompt`` (string) -> ``generated_text`` (string), with every generation param and its default."""
    params = ParamSchema([ParamSpec(k, _SPEC_TYPES[tp], defaults[k]) for k, tp in PARAM_TYPES.items()])
    return ModelSignature(
        inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
        outputs=Schema([ColSpec("string", OUTPUT_COLUMN)]),
        params=params,
    )


def default_input_example(defaults: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    params = {"max_new_tokens": min(8, defaults["max_new_tokens"])}
    return pd.DataFrame({PROMPT_COLUMN: [EXAMPLE_PROMPT]}), params


# ----------------------------------------------------------------------------------------------------
# save-side steps of flavor.save_model


def check_save_args(mode, model_dir, model, tokenizer, adapter_dir, limit, max_prompt_tokens) -> None:
    problems = []
    if mode not in MODES:
        problems.append(f"`mode` must be one of {MODES}, got {mode!r}.")
    elif mode == "merged" and (model_dir is None) == (model is None):
        problems.append("merged mode needs exactly one of `model_dir` or `model` (with `tokenizer`).")
    elif mode == "merged" and model is not None and tokenizer is None:
        problems.append("`tokenizer` is required with `model`.")
    elif mode == "adapter" and (adapter_dir is None) == (model is None):
        problems.append("adapter mode needs exactly one of `adapter_dir` or a PEFT `model`.")
    if not (isinstance(limit, int) and limit >= 1):
        problems.append(f"`max_new_tokens_limit` must be an integer >= 1, got {limit!r}.")
    if max_prompt_tokens is not None and not (isinstance(max_prompt_tokens, int) and max_prompt_tokens >= 1):
        problems.append(f"`max_prompt_tokens` must be an integer >= 1 or None, got {max_prompt_tokens!r}.")
    if problems:
        raise invalid_input(" ".join(problems))


def write_model_data(path: Path, mode: str, model_dir, model, tokenizer, adapter_dir) -> Path:
    data_dir = path / DATA_SUBPATH[mode]
    if mode == "adapter" and model is not None:
        model.save_pretrained(str(data_dir))  # a PeftModel writes only its adapter (and a README)
        keep_only_adapter(data_dir)
    elif mode == "adapter":
        copy_adapter(adapter_dir, data_dir)
    elif model is not None:
        model.save_pretrained(str(data_dir))
        tokenizer.save_pretrained(str(data_dir))
        check_merged_dir(data_dir)
    else:
        copy_merged_model(model_dir, data_dir)
    return data_dir


def provenance(mode: str, data_dir: Path, base_model, revision, base_sha, lora_config, run_id) -> dict:
    adapter_cfg = read_json(data_dir / "adapter_config.json") if mode == "adapter" else {}
    base_model = base_model or adapter_cfg.get("base_model_name_or_path")
    if mode == "adapter" and not base_model:
        raise invalid_input(
            "adapter mode needs `base_model` (a hub id or local folder); the adapter config names none."
        )
    local = local_base_dir(base_model)
    if local is not None and base_model != DEMO_MODEL:
        base_model = str(local)  # an absolute path, so a loader elsewhere on this machine finds it
    if base_sha is None and local is not None:
        base_sha = weights_sha256(local)
    if mode == "adapter" and base_sha is None:
        logger.warning("Base model %s is not available locally; its weights hash is not recorded "
                        "and cannot be verified at load time. Pass `base_model_sha256`.", base_model)
    versions = {f"{lib}_version": package_version(lib) for lib in ("torch", "transformers", "mlflow")}
    if mode == "adapter":
        versions["peft_version"] = package_version("peft")
    from smolora_mlflow import __version__

    return {
        "mode": mode, "data": data_dir.name, "base_model": base_model, "base_model_revision": revision,
        "base_model_sha256": base_sha, "lora": dict(lora_config or lora_settings(adapter_cfg)) or None,
        "training_run_id": str(run_id) if run_id else None, "smolora_mlflow_version": __version__,
        **versions, "file_sha256": hash_tree(data_dir), "format_version": FORMAT_VERSION,
    }


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


_QUIET_SUBPROCESS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "SMOLORA_PROGRESS": "0", "TQDM_DISABLE": "1"}
_LOCAL_LABEL_MESSAGE = "contains a local version label"


def pin(requirement: str) -> str:
    """``package==version`` of the installed distribution, without a local label (``torch==2.13.0`` for
    ``2.13.0+cpu``): PyPI has no local versions, so this is what an environment built from it installs."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    req = Requirement(requirement)
    version = Version(importlib.metadata.version(req.name)).public
    return f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}=={version}"


class _LocalLabelFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _LOCAL_LABEL_MESSAGE not in record.getMessage()


@contextlib.contextmanager
def _pinning_local_labels_ourselves() -> Iterator[None]:
    """Hide MLflow's warning that a package (torch ``+cpu``) was pinned without its local version label.

    Requirement inference pins what it finds with MLflow's ``_get_pinned_requirement``, which drops a local
    label (as :func:`pin` does for the defaults, on purpose: PyPI has none) and warns about it every time, twice
    per logged checkpoint; the requirement written is the one we want, so the warning asks nothing of the user.
    Only that message is filtered, only while we infer.
    """
    target = logging.getLogger("mlflow.utils.requirements_utils")
    flt = _LocalLabelFilter()
    target.addFilter(flt)
    try:
        yield
    finally:
        target.removeFilter(flt)


def write_requirements(path: Path, default_reqs, pip_requirements, extra_pip_requirements, conda_env) -> None:
    """requirements.txt, conda.yaml, python_env.yaml. With neither ``pip_requirements`` nor ``conda_env``,
    requirements are inferred by loading the saved model (rule 2), plus ``default_reqs``."""
    if conda_env is None:
        defaults = None
        if pip_requirements is None:
            defaults = list(default_reqs or [])
            with _pinning_local_labels_ourselves():
                # The subprocess that loads the model to see what it imports: no weight-loading bars from it.
                inferred = infer_pip_requirements(str(path), FLAVOR_NAME, fallback=defaults,
                                                  extra_env_vars=_QUIET_SUBPROCESS)
            # The package itself travels as code; pinning it would send pip looking for it.
            inferred = [r for r in inferred if r.split("=")[0].strip().lower() not in _SELF_DISTRIBUTIONS]
            defaults = sorted(set(inferred).union(defaults))
        conda_env, pip_requirements, constraints = _process_pip_requirements(
            defaults, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, constraints = _process_conda_env(conda_env)
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


def model_card(conf: Mapping[str, Any], name: str) -> str:
    """A short README for the model folder: what it is, where it came from, how to call it."""
    lora = conf.get("lora") or {}
    lines = [
        f"# {name}",
        "",
        f"A causal language model fine-tuned with LoRA by smolora-mlflow, saved in **{conf['mode']}** mode.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{conf.get('base_model')}` |",
        f"| base revision | `{conf.get('base_model_revision')}` |",
        f"| base weights sha256 | `{conf.get('base_model_sha256')}` |",
        f"| LoRA | r={lora.get('r')}, alpha={lora.get('lora_alpha')}, targets={lora.get('target_modules')} |",
        f"| training run | `{conf.get('training_run_id')}` |",
        f"| torch / transformers | {conf.get('torch_version')} / {conf.get('transformers_version')} |",
        "",
        "## Generation defaults",
        "",
        "```json",
        json.dumps(conf["generation_defaults"], indent=2),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import mlflow",
        "model = mlflow.pyfunc.load_model(model_uri)",
        f"model.predict({{'{PROMPT_COLUMN}': ['{EXAMPLE_PROMPT}']}}, params={{'max_new_tokens': 16}})",
        "```",
        "",
        "Serve it with `mlflow models serve -m <model_uri>` and POST "
        f'`{{"dataframe_records": [{{"{PROMPT_COLUMN}": "..."}}], "params": {{"max_new_tokens": 16}}}}` '
        "to `/invocations`.",
        "",
    ]
    return "\n".join(lines)
