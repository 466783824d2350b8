"""The content of a run record: flat params, lineage tags, dataset inputs, the run note, the model card, the loss curve.

Pure functions of the config, the data and the metrics; `tracking` decides when and where they go.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.redaction import redact

PARAM_DISPLAY_LIMIT = 500
# run_tags are logged as tags; the tracking URI is where the run already is, and may hold a password.
_SKIP_PARAMS = {"run_tags", "tracking_uri"}
# Upstream options are logged one param per key (`peft.use_dora`, `trainer.beta`), so runs filter on them.
_OPTION_PARAMS = {"peft": "peft.", "trainer_args": "trainer."}


def _param_text(value: Any) -> str:
    """Readable and lossless: ``q_proj,v_proj`` (what the CLI accepts), JSON when an item holds a comma."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        return json.dumps(items) if any("," in v for v in items) else ",".join(items)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
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
        if key in _OPTION_PARAMS:  # the whole mapping too, below: every field is a param
            params.update((_OPTION_PARAMS[key] + k, _param_text(v)) for k, v in sorted(value.items()))
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


def same_param(a: str, b: str) -> bool:
    """Whether two param texts mean the same value (``2e-4`` and ``0.0002``, ``true`` and ``True``)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def upstream_config_json(config: Any) -> str:
    """A PEFT or TRL config as JSON with every field (``to_dict()``; values JSON cannot hold become text)."""
    values = config.to_dict()
    return json.dumps(redact(values), indent=2, sort_keys=True, default=str)


def config_yaml(cfg: SmoloraConfig) -> str:
    """The resolved config as YAML (loads back with ``SmoloraConfig.from_yaml``), without URI credentials."""
    if cfg.tracking_uri and "@" in cfg.tracking_uri:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(cfg.tracking_uri)
        if parts.username or parts.password:
            host = parts.netloc.rsplit("@", 1)[1]
            cfg = cfg.replace(tracking_uri=urlunsplit(parts._replace(netloc=f"***@{host}")))
    return cfg.to_yaml()


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Versions of the libraries that shape a run (looked up once per process: they cannot change)."""
    out = {}
    for dist in ("torch", "transformers", "peft", "trl", "mlflow", "datasets", "smolora-mlflow"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """HEAD of the git work tree holding ``path``, or None outside one (or without git)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def lineage_tags(cfg: SmoloraConfig, data, base_info: dict, device: str, *, with_git: bool = True) -> dict[str, str]:
    """Where the run came from: base model id and weights hash, dataset fingerprint, versions, device, commit."""
    tags = {
        C.TAG_BASE_MODEL: cfg.base_model,
        C.TAG_DATASET: data.source,
        C.TAG_DATASET_FINGERPRINT: data.fingerprint,
        C.TAG_DEVICE: device,
        C.TAG_PYTHON: platform.python_version(),
    }
    if base_info.get("sha256"):
        tags[C.TAG_BASE_MODEL_SHA256] = base_info["sha256"]
    if base_info.get("revision") or cfg.base_model_revision:
        tags[C.TAG_BASE_MODEL_REVISION] = str(base_info.get("revision") or cfg.base_model_revision)
    for name, version in package_versions().items():
        tags[C.TAG_VERSION_PREFIX + name] = version
    commit = git_commit() if with_git else None
    if commit:
        tags[C.TAG_GIT_COMMIT] = commit
    return tags


def prompt_tags(prompt_format: str, tokenizer, reason: str = "") -> dict[str, str]:
    """``smolora.prompt_format`` (and why, when known) and, for chat, the sha256 of the chat template the
    prompts went through."""
    import hashlib

    tags = {C.TAG_PROMPT_FORMAT: prompt_format}
    if reason:
        tags[C.TAG_PROMPT_FORMAT_REASON] = reason[:5000]
    if (digest := tokenizer_sha256(tokenizer)) is not None:
        tags[C.TAG_TOKENIZER_SHA256] = digest
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if prompt_format == "chat" and isinstance(template, str):
        tags[C.TAG_CHAT_TEMPLATE_SHA256] = hashlib.sha256(template.encode("utf-8")).hexdigest()
    return tags


def tokenizer_sha256(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's serialized vocabulary, merges and normalizer; None for others."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def dataset_inputs(data) -> list[tuple[Any, str]]:
    from smolora_mlflow.data import mlflow_dataset

    out = [(mlflow_dataset(data.train, source=data.source, name=f"{data.name}-train"), "training")]
    if data.eval is not None:
        out.append((mlflow_dataset(data.eval, source=data.source, name=f"{data.name}-eval"), "evaluation"))
    return out


def run_description(cfg: SmoloraConfig, data) -> str:
    """The run's note: what was trained on what, with which settings, in one sentence."""
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epoch(s)"
    recipe = "LoRA fine-tune" if cfg.method == "sft" else f"LoRA {cfg.method.upper()} training"
    targets = cfg.lora_target_modules
    return (
        f"{recipe} of `{cfg.base_model}` on `{data.name}` ({data.num_train} train / {data.num_eval} "
        f"eval rows, {data.format} format): r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, "
        f"targets={targets if isinstance(targets, str) else ','.join(targets)}, lr={cfg.learning_rate:g}, {steps}, "
        f"batch {cfg.per_device_train_batch_size}x{cfg.gradient_accumulation_steps}, seed {cfg.seed}."
    )


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


_SIZE = (640, 360)
_BOX = (70, 36, 622, 316)  # plot area: left, top, right, bottom
_COLORS = {C.METRIC_LOSS: (31, 119, 180), C.METRIC_EVAL_LOSS: (255, 127, 14)}


def loss_curve_png(history: dict[str, list[tuple[int, float]]], title: str):
    """A PIL image of loss (and eval loss) against step, or None when there is nothing to draw.

    Drawn with PIL alone: matplotlib's import and text layout cost about a second on a small CPU box,
    more than the rest of a run's record, for a chart this simple.
    """
    series = {k: sorted(history.get(k, [])) for k in (C.METRIC_LOSS, C.METRIC_EVAL_LOSS)}
    if not series[C.METRIC_LOSS]:
        return None
    from PIL import Image, ImageDraw

    img = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    points = [p for s in series.values() for p in s]
    xs, ys = _span([s for s, _ in points]), _span([v for _, v in points])
    left, top, right, bottom = _BOX

    def to_px(step: float, value: float) -> tuple[float, float]:
        return (left + (step - xs[0]) / (xs[1] - xs[0]) * (right - left),
                bottom - (value - ys[0]) / (ys[1] - ys[0]) * (bottom - top))

    for tick in _ticks(*ys):
        y = to_px(xs[0], tick)[1]
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), f"{tick:.4g}", fill="black", font=font, anchor="rm")
    for tick in _ticks(*xs, integer=True):
        x = to_px(tick, ys[0])[0]
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
        draw.text((x, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
    draw.rectangle(_BOX, outline="black")
    for key, pts in series.items():
        px = [to_px(s, v) for s, v in pts]
        if len(px) > 1:
            draw.line(px, fill=_COLORS[key], width=2)
        if key == C.METRIC_EVAL_LOSS or len(px) == 1:
            for x, y in px:
                draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=_COLORS[key])
    for i, key in enumerate(k for k, pts in series.items() if pts):
        y = top + 12 + 16 * i
        draw.line([(right - 90, y), (right - 70, y)], fill=_COLORS[key], width=3)
        draw.text((right - 64, y), key, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, 10), title[:80], fill="black", font=_font(14), anchor="mt")
    draw.text(((left + right) / 2, _SIZE[1] - 6), "step", fill="black", font=font, anchor="mb")
    draw.text((8, top - 12), "loss", fill="black", font=font, anchor="lm")
    return img


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, *, integer: bool = False, target: int = 6) -> list[float]:
    """About ``target`` round numbers (1, 2 or 5 times a power of ten) inside [lo, hi]."""
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]
