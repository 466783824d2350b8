"""The content of a run record: flat params, lineage tags, dataset inputs, the model card, the loss curve.

Pure functions of the config, the data and the metrics; `tracking` decides when and where they go.
"""

from __future__ import annotations

import importlib.metadata
import io
import platform
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig, redact

PARAM_DISPLAY_LIMIT = 500
_SKIP_PARAMS = {"run_tags", "tracking_uri"}  # tags are logged as tags; the URI is where the run already is


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is None:
        return "None"
    return str(value)


def flat_params(cfg: SmoloraConfig, data) -> tuple[dict[str, str], dict[str, str]]:
    """Readable params from the resolved config, plus the whole text of any value that had to be shortened.

    Returns:
        (params, long_values): params map name -> text of at most PARAM_DISPLAY_LIMIT characters; a longer
        value is shortened visibly and its whole text is in ``long_values`` for an artifact.
    """
    values = redact(cfg.to_dict())
    params: dict[str, str] = {}
    long_values: dict[str, str] = {}
    for key, value in values.items():
        if key in _SKIP_PARAMS:
            continue
        text = _param_text(value)
        if len(text) > PARAM_DISPLAY_LIMIT:
            long_values[key] = text
            text = text[: PARAM_DISPLAY_LIMIT - 60] + f"... [{len(text)} chars, full value in params/{key}.txt]"
        params[key] = text
    params["effective_batch_size"] = str(cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)
    params["dataset_format"] = data.format
    params["num_train_rows"] = str(data.num_train)
    params["num_eval_rows"] = str(data.num_eval)
    return params, long_values


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "peft", "trl", "mlflow", "datasets", "smolora-mlflow"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def lineage_tags(cfg: SmoloraConfig, data, base_info: dict, device: str) -> dict[str, str]:
    from smolora_mlflow.tracking import git_commit

    tags = {
        C.TAG_BASE_MODEL: cfg.base_model,
        C.TAG_DATASET: data.source,
        C.TAG_DATASET_FINGERPRINT: data.fingerprint,
        C.TAG_DEVICE: device,
        "smolora.python": platform.python_version(),
    }
    if base_info.get("sha256"):
        tags[C.TAG_BASE_MODEL_SHA256] = base_info["sha256"]
    if base_info.get("revision") or cfg.base_model_revision:
        tags[C.TAG_BASE_MODEL_REVISION] = str(base_info.get("revision") or cfg.base_model_revision)
    for name, version in package_versions().items():
        tags[C.TAG_VERSION_PREFIX + name] = version
    commit = git_commit()
    if commit:
        tags[C.TAG_GIT_COMMIT] = commit
    return tags


def dataset_inputs(data) -> list[tuple[Any, str]]:
    from smolora_mlflow.data import mlflow_dataset

    out = [(mlflow_dataset(data.train, source=data.source, name=f"{data.name}-train"), "training")]
    if data.eval is not None:
        out.append((mlflow_dataset(data.eval, source=data.source, name=f"{data.name}-eval"), "evaluation"))
    return out


def model_card(cfg: SmoloraConfig, data, base_info: dict, metrics: dict[str, float], run_id: str,
               adapter_bytes: int) -> str:
    """A README for the run: what was trained on what, with which settings, how well, and how to load it."""
    shown = {k: v for k, v in metrics.items() if k in (C.METRIC_TRAIN_LOSS, C.METRIC_EVAL_LOSS,
                                                      C.METRIC_EVAL_PERPLEXITY, "train_runtime")}
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in shown.items()) or "| (none) | |"
    sha = base_info.get("sha256") or "n/a"
    return f"""# LoRA adapter for `{cfg.base_model}`

Trained with smolora-mlflow (MLflow run `{run_id}`).

## Base model
- id: `{cfg.base_model}`  revision: `{base_info.get('revision') or cfg.base_model_revision or 'n/a'}`
- weights sha256: `{sha}`

## Data
- source: `{data.source}` ({data.format} format)
- rows: {data.num_train} train, {data.num_eval} eval; fingerprint `{data.fingerprint[:16]}`

## LoRA settings
| r | alpha | dropout | target modules | bias |
|---|---|---|---|---|
| {cfg.lora_r} | {cfg.lora_alpha:g} | {cfg.lora_dropout:g} | {', '.join(cfg.lora_target_modules)} | {cfg.lora_bias} |

Learning rate {cfg.learning_rate:g}, batch {cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps},
max length {cfg.max_length}, seed {cfg.seed}. Adapter size: {adapter_bytes:,} bytes.

## Final metrics
| metric | value |
|---|---|
{metric_lines}

## How to load
```python
import mlflow
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter = mlflow.artifacts.download_artifacts("runs:/{run_id}/{C.ARTIFACT_ADAPTER}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("<base model>"), adapter)
```
or, once a model was logged with the smolora flavor: `mlflow.pyfunc.load_model("runs:/{run_id}/model")`.
"""


def loss_curve_png(history: dict[str, list[tuple[int, float]]], title: str):
    """A PIL image of loss (and eval loss) against step, or None when there is nothing to draw."""
    if not history.get(C.METRIC_LOSS):
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    for key, style in ((C.METRIC_LOSS, "-"), (C.METRIC_EVAL_LOSS, "o--")):
        points = sorted(history.get(key, []))
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
