"""One dataclass that holds every knob of a smolora run.

Stdlib only (PyYAML is imported lazily), so the CLI, the flavor and the registry can read a config
without importing torch. Precedence is ``defaults < YAML recipe < overrides``; every invalid value is
reported at once, naming the field, the value and what is allowed.

Example:
    >>> cfg = SmoloraConfig(lora_r=4, max_steps=10)
    >>> cfg.lora_r
    4
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolora_mlflow.redaction import redact

DEMO_MODEL = "smolora:demo"
DEMO_DATASET = "smolora:reviews"


class ConfigError(ValueError):
    """Raised with every problem of a config at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid smolora config ({len(problems)} problem(s)):\n{lines}")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class SmoloraConfig:
    """Every setting of a LoRA fine-tuning run, with help text in each field's metadata."""

    # --- model ---
    base_model: str = field(
        default=DEMO_MODEL,
        metadata=_help(f"Hub id, local directory, or `{DEMO_MODEL}` for the built-in offline demo model."),
    )
    base_model_revision: str | None = field(default=None, metadata=_help("Hub revision of the base model."))
    trust_remote_code: bool = field(
        default=False, metadata=_help("Run model code shipped with a hub model. Off unless you trust it.")
    )
    # --- data ---
    dataset: str = field(
        default=DEMO_DATASET,
        metadata=_help(
            f"Hub id, a .jsonl/.json/.csv/.parquet/.txt file, a folder of .txt files, or `{DEMO_DATASET}`."
        ),
    )
    dataset_split: str = field(default="train", metadata=_help("Split to read from a hub dataset."))
    dataset_format: Literal["auto", "text", "prompt_completion", "chat"] = field(
        default="auto", metadata=_help("Example format; `auto` detects it from the columns.")
    )
    text_field: str = field(default="text", metadata=_help("Column holding plain text examples."))
    prompt_field: str = field(default="prompt", metadata=_help("Prompt column (prompt/completion format)."))
    completion_field: str = field(
        default="completion", metadata=_help("Completion column (prompt/completion format).")
    )
    messages_field: str = field(default="messages", metadata=_help("Chat messages column (chat format)."))
    chunk_words: int = field(
        default=0, metadata=_help("Split .txt lines into chunks of this many words (0: keep lines whole).")
    )
    dedupe: bool = field(default=False, metadata=_help("Drop duplicate examples."))
    max_samples: int | None = field(default=None, metadata=_help("Use at most this many training rows."))
    eval_fraction: float = field(
        default=0.0, metadata=_help("Fraction of rows held out for evaluation, in [0, 0.5).")
    )
    # --- LoRA ---
    lora_r: int = field(default=8, metadata=_help("LoRA rank, 1..1024."))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling alpha, > 0."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA path, in [0, 1)."))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_help("Module names to adapt, or `all-linear`."),
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata=_help("Which biases are trained.")
    )
    # --- optimisation ---
    learning_rate: float = field(default=2e-4, metadata=_help("Peak learning rate, in (0, 1]."))
    lr_scheduler_type: str = field(default="linear", metadata=_help("transformers scheduler name."))
    warmup_ratio: float = field(default=0.0, metadata=_help("Fraction of steps used for warm-up, [0, 1)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay, >= 0."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm, > 0."))
    num_train_epochs: float = field(default=1.0, metadata=_help("Epochs, used when max_steps <= 0."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps; overrides epochs when > 0."))
    per_device_train_batch_size: int = field(default=4, metadata=_help("Batch size per device, >= 1."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per step, >= 1."))
    max_length: int = field(default=256, metadata=_help("Maximum tokens per example, 8..131072."))
    packing: bool = field(default=False, metadata=_help("Pack several short examples per sequence."))
    activation_checkpointing: bool = field(
        default=False, metadata=_help("Trade compute for memory by recomputing activations.")
    )
    seed: int = field(default=42, metadata=_help("Random seed for data order, LoRA init and sampling."))
    # --- logging, eval, checkpoints ---
    logging_steps: int = field(default=1, metadata=_help("Log metrics every N optimizer steps."))
    eval_steps: int = field(default=0, metadata=_help("Evaluate every N steps (0: only at the end)."))
    save_steps: int = field(default=0, metadata=_help("Checkpoint every N steps (0: no periodic checkpoints)."))
    save_total_limit: int = field(default=2, metadata=_help("Checkpoints kept on disk, >= 1."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("Checkpoint dir, `latest`, or an MLflow run id to resume.")
    )
    output_dir: str = field(default="outputs/smolora", metadata=_help("Where checkpoints and merges go."))
    # --- hardware ---
    device: Literal["auto", "cpu", "cuda", "mps"] = field(
        default="auto", metadata=_help("`auto` picks cuda > mps > cpu.")
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Training dtype; `auto` is bf16 on capable CUDA, else float32.")
    )
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help("dtype the merged model is saved in (the merge itself runs in float32 and is checked "
                       "there); `auto` is the base checkpoint's dtype (its config.json `dtype`), float32 if none."),
    )
    hub_kernels: bool = field(
        default=False,
        metadata=_help("Let transformers replace layers with compiled kernels it DOWNLOADS FROM THE HUGGING FACE "
                       "HUB and runs (`use_kernels`), in training, merging, evaluation and serving. Off unless you "
                       "trust that code, like trust_remote_code; offline it fails."),
    )
    # --- MLflow ---
    tracking: bool = field(default=True, metadata=_help("Log the run to MLflow."))
    tracking_uri: str | None = field(
        default=None, metadata=_help("MLflow tracking URI (default: MLFLOW_TRACKING_URI or MLflow's).")
    )
    experiment_name: str = field(default="smolora", metadata=_help("MLflow experiment name."))
    run_name: str | None = field(default=None, metadata=_help("MLflow run name (default: generated)."))
    run_tags: dict[str, str] = field(default_factory=dict, metadata=_help("Extra tags for the run."))
    registered_model_name: str | None = field(
        default=None, metadata=_help("Register the logged model under this name.")
    )
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The food was", "Our waiter", "I would come back because"],
        metadata=_help("Prompts whose generations are logged at each evaluation."),
    )
    sample_max_new_tokens: int = field(default=20, metadata=_help("Tokens generated per sample prompt."))
    system_metrics: bool = field(
        default=False, metadata=_help("Log CPU, memory (and GPU) usage with MLflow's system metrics monitor.")
    )
    system_metrics_interval: float = field(
        default=10.0, metadata=_help("Seconds between system-metric samples, > 0.")
    )
    checkpoint_models: bool = field(
        default=True,
        metadata=_help("Log each kept checkpoint (latest, best, top save_total_limit) as an MLflow LoggedModel."),
    )
    # --- prompts and task evaluation ---
    prompt_format: Literal["auto", "chat", "plain"] = field(
        default="auto",
        metadata=_help("How prompts reach the model in training, evaluation and serving: `chat` wraps "
                       "prompt/completion rows and plain prompts in the tokenizer's chat template, `plain` uses "
                       "them as text, `auto` is chat for instruction-tuned bases (a chat template and "
                       "instruct/chat/-it in the name)."),
    )
    task_eval: bool = field(
        default=False,
        metadata=_help("Also score generated answers of the eval rows (exact_match, contains_answer, "
                       "regex_match, answer_length), for the base and the fine-tuned model."),
    )
    task_max_rows: int = field(default=100, metadata=_help("Rows the task evaluation scores at most, >= 1."))
    task_max_new_tokens: int = field(default=32, metadata=_help("Tokens generated per task-evaluation answer."))
    task_answer_regex: str | None = field(
        default=None,
        metadata=_help("Regex a correct answer matches (regex_match); `{answer}` stands for the expected "
                       "answer, escaped. Unset: regex_match is not computed."),
    )
    # --- sweep ---
    sweep_trials: int = field(default=4, metadata=_help("Trials of `smolora sweep`, >= 1."))
    sweep_space: dict[str, str] = field(
        default_factory=dict,
        metadata=_help("Search space of `smolora sweep`, field=choice:A|B|C, int:LOW..HIGH, float:LOW..HIGH or "
                       "log:LOW..HIGH (log-uniform), e.g. lora_r=choice:4|8|16,learning_rate=log:1e-4..1e-2."),
    )
    sweep_metric: str = field(default="eval_loss", metadata=_help("Metric a sweep optimises and promotes on."))
    sweep_sampler: Literal["tpe", "random"] = field(default="tpe", metadata=_help("Optuna sampler of a sweep."))
    sweep_backend: Literal["optuna", "ray"] = field(
        default="optuna",
        metadata=_help("Where sweep trials run: `optuna` (one after another in this process) or `ray` (Ray Tune "
                       "trials in parallel worker processes, Optuna searching through Ray Tune's OptunaSearch; "
                       "pip install 'smolora-mlflow[ray]')."),
    )
    sweep_workers: int = field(default=1, metadata=_help("Trials run at once with sweep_backend=ray, >= 1."))
    sweep_trial_cpus: float = field(default=1.0, metadata=_help("CPUs Ray reserves per trial, > 0."))
    sweep_trial_gpus: float = field(default=0.0, metadata=_help("GPUs Ray reserves per trial (fractions share one), "
                                                                 ">= 0."))

    def __post_init__(self) -> None:
        self.lora_target_modules = _as_list(self.lora_target_modules)
        self.sample_prompts = _as_list(self.sample_prompts)
        problems = _type_problems(self) + _range_problems(self)
        if problems:
            raise ConfigError(problems)

    # --- construction ---
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SmoloraConfig:
        """Build a config, rejecting unknown keys with a suggestion."""
        unknown = [k for k in values if k not in _FIELDS]
        if unknown:
            raise ConfigError([_unknown_key_message(k) for k in unknown])
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> SmoloraConfig:
        """Load a YAML recipe and apply ``overrides`` (defaults < YAML < overrides)."""
        values = load_yaml(path)
        values.update(overrides or {})
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> SmoloraConfig:
        """A validated copy with ``changes`` applied."""
        return SmoloraConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False)

    @property
    def uses_demo_model(self) -> bool:
        return self.base_model == DEMO_MODEL


# ----------------------------------------------------------------------------------------------------
# helpers

_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(SmoloraConfig)}
_HINTS: dict[str, Any] = typing.get_type_hints(SmoloraConfig)


def field_names() -> list[str]:
    return list(_FIELDS)


def field_help(name: str) -> str:
    return _FIELDS[name].metadata.get("help", "")


def field_type(name: str) -> Any:
    return _HINTS[name]


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, _FIELDS, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else " See `smolora train --help` for the fields."
    return f"`{key}` is not a config field.{hint}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file `{p}` does not exist; pass a path to a YAML recipe."])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"config file `{p}` is not valid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"config file `{p}` must hold a mapping of field: value, got {type(data).__name__}."])
    return data


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, tuple):
        return list(value)
    return value


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _matches(value: Any, tp: Any) -> bool:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        return optional
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe_type(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif origin is list:
        text = "a list of " + typing.get_args(tp)[0].__name__
    elif origin is dict:
        text = "a mapping of str to str"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
    return text + (" (or null)" if optional else "")


def _type_problems(cfg: SmoloraConfig) -> list[str]:
    problems = []
    for name, tp in _HINTS.items():
        value = getattr(cfg, name)
        if not _matches(value, tp):
            problems.append(f"`{name}` must be {describe_type(tp)}, got {value!r}.")
    return problems


# (field, predicate, allowed range text)
_RANGES: list[tuple[str, Any, str]] = [
    ("lora_r", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("lora_alpha", lambda v: v > 0, "a number > 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("learning_rate", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("max_grad_norm", lambda v: v > 0, "a number > 0"),
    ("num_train_epochs", lambda v: v > 0, "a number > 0"),
    ("per_device_train_batch_size", lambda v: 1 <= v <= 4096, "an integer in 1..4096"),
    ("gradient_accumulation_steps", lambda v: 1 <= v <= 4096, "an integer in 1..4096"),
    ("max_length", lambda v: 8 <= v <= 131072, "an integer in 8..131072"),
    ("eval_fraction", lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    ("logging_steps", lambda v: v >= 1, "an integer >= 1"),
    ("eval_steps", lambda v: v >= 0, "an integer >= 0"),
    ("save_steps", lambda v: v >= 0, "an integer >= 0"),
    ("save_total_limit", lambda v: v >= 1, "an integer >= 1"),
    ("chunk_words", lambda v: v >= 0, "an integer >= 0"),
    ("max_samples", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("sample_max_new_tokens", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("system_metrics_interval", lambda v: v > 0, "a number > 0"),
    ("task_max_rows", lambda v: v >= 1, "an integer >= 1"),
    ("task_max_new_tokens", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("sweep_trials", lambda v: 1 <= v <= 10000, "an integer in 1..10000"),
    ("sweep_workers", lambda v: 1 <= v <= 1024, "an integer in 1..1024"),
    ("sweep_trial_cpus", lambda v: v > 0, "a number > 0"),
    ("sweep_trial_gpus", lambda v: v >= 0, "a number >= 0"),
]


def _range_problems(cfg: SmoloraConfig) -> list[str]:
    problems = []
    bad_types = {p.split("`")[1] for p in _type_problems(cfg)}
    for name, ok, allowed in _RANGES:
        if name in bad_types:
            continue
        value = getattr(cfg, name)
        if not ok(value):
            problems.append(f"`{name}` must be {allowed}, got {value!r}.")
    for name in ("base_model", "dataset", "output_dir", "experiment_name"):
        if name not in bad_types and not getattr(cfg, name).strip():
            problems.append(f"`{name}` must not be empty.")
    if "task_answer_regex" not in bad_types and cfg.task_answer_regex is not None:
        try:
            re.compile(cfg.task_answer_regex.replace("{answer}", "x"))
        except re.error as e:
            problems.append(f"`task_answer_regex` must be a valid regular expression, got "
                            f"{cfg.task_answer_regex!r} ({e}).")
    if "lora_target_modules" not in bad_types and not cfg.lora_target_modules:
        problems.append("`lora_target_modules` must name at least one module, or be `all-linear`.")
    return problems


# ----------------------------------------------------------------------------------------------------
# string overrides (CLI flags, `mlflow run -P key=value`)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(name: str, raw: Any) -> bool:
    """``true/false/yes/no/on/off/1/0`` (as ``mlflow run -P`` passes them) to a bool, else ConfigError."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError([f"`{name}` must be true or false, got {raw!r}."])


def coerce(name: str, raw: Any) -> Any:
    """Turn a command-line string into the type of field ``name``; raise ConfigError if it can't."""
    if name not in _FIELDS:
        raise ConfigError([_unknown_key_message(name)])
    if not isinstance(raw, str):
        return raw
    tp, optional = _unwrap_optional(_HINTS[name])
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            return parse_bool(name, text)
        if tp is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if tp is float:
            return float(text)
        if origin is list:
            return _as_list(text)
        if origin is dict:
            parsed = json.loads(text) if text.startswith("{") else dict(
                kv.split("=", 1) for kv in text.split(",") if kv
            )
            return {str(k): str(v) for k, v in parsed.items()}
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError([f"`{name}` must be {describe_type(_HINTS[name])}, got {raw!r}."]) from e
    return text


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into typed values, reporting every bad one at once."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for pair in pairs:
        if "=" not in pair:
            problems.append(f"override {pair!r} must look like key=value.")
            continue
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            values[key] = coerce(key, raw)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return values
