"""One dataclass that holds every knob of a smolora run.

Stdlib only (PyYAML is imported lazily), so the CLI, the flavor and the registry can read a config
without importing torch. Precedence is ``defaults < YAML recipe < overrides``; every invalid value is
reported at once, naming the field, the value and what is allowed. The checks ``__post_init__`` runs are in
:mod:`~smolora_mlflow.config_checks`; reading text values into typed ones (and :class:`ConfigError`) is in
:mod:`~smolora_mlflow.config_parsing`.

Example:
    >>> cfg = SmoloraConfig(lora_r=4, max_steps=10)
    >>> cfg.lora_r
    4
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolora_mlflow.config_checks import alias_problems, range_problems, type_problems, unknown_key_message
from smolora_mlflow.config_parsing import ConfigError, as_list, coerce_value, target_modules
from smolora_mlflow.redaction import redact

DEMO_MODEL = "smolora:demo"
DEMO_DATASET = "smolora:reviews"


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
    lora_target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_help("Module names to adapt, `all-linear`, or one regular expression over full module names "
                       "(PEFT's `target_modules`; a text with regex characters such as `.*(q|v)_proj`)."),
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata=_help("Which biases are trained.")
    )
    # --- recipe: objective, upstream options, quantization ---
    method: Literal["sft", "dpo", "kto", "grpo"] = field(
        default="sft",
        metadata=_help("Training objective, through TRL's SFTTrainer, DPOTrainer, KTOTrainer or GRPOTrainer."),
    )
    peft: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("Any other PEFT `LoraConfig` field, e.g. use_dora=true,init_lora_weights=pissa "
                       "(`lora_*` fields are aliases: `lora_r` is `peft.r`)."),
    )
    trainer_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("Any other field of the method's TRL config (SFTConfig, DPOConfig, KTOConfig, GRPOConfig), "
                       "e.g. beta=0.1 or neftune_noise_alpha=5."),
    )
    rewards: list[str] = field(
        default_factory=list,
        metadata=_help("GRPO reward functions: built-ins regex_match, exact_answer, length_target, or a "
                       "`module:function` (empty: length_target)."),
    )
    quantization: Literal["none", "4bit", "8bit"] = field(
        default="none",
        metadata=_help("QLoRA: load the base in 4-bit NF4 (double quantization, bf16 compute) or 8-bit with "
                       "bitsandbytes (`pip install smolora-mlflow[qlora]`)."),
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
        self.lora_target_modules = target_modules(self.lora_target_modules)
        self.sample_prompts = as_list(self.sample_prompts)
        self.rewards = as_list(self.rewards)
        problems = alias_problems(self)
        problems += type_problems(self, _HINTS) + range_problems(self, _HINTS)
        if (self.peft or self.trainer_args) and not any(
                p.startswith(("`peft`", "`trainer_args`", "`method`")) for p in problems):
            # PEFT/TRL are imported only here, and only when a run sets one of these options.
            from smolora_mlflow.upstream_options import upstream_problems

            problems += upstream_problems(self)
        if problems:
            raise ConfigError(problems)

    # --- construction ---
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SmoloraConfig:
        """Build a config, rejecting unknown keys with a suggestion."""
        unknown = [k for k in values if k not in _FIELDS]
        if unknown:
            raise ConfigError([unknown_key_message(k, _FIELDS) for k in unknown])
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
# fields, and reading values from outside (YAML recipes, CLI flags, `mlflow run -P key=value`)

_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(SmoloraConfig)}
_HINTS: dict[str, Any] = typing.get_type_hints(SmoloraConfig)


def field_names() -> list[str]:
    return list(_FIELDS)


def field_help(name: str) -> str:
    return _FIELDS[name].metadata.get("help", "")


def field_type(name: str) -> Any:
    return _HINTS[name]


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


def coerce(name: str, raw: Any) -> Any:
    """Turn a command-line string into the type of field ``name``; raise ConfigError if it can't."""
    if name not in _FIELDS:
        raise ConfigError([unknown_key_message(name, _FIELDS)])
    return coerce_value(name, _HINTS[name], raw)


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
