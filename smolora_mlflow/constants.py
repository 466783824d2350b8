"""Names shared by tracking, the flavor and the registry (stdlib only).

One place for every tag, param and metric key that more than one module reads or writes, so a run,
a logged model and a registered version speak the same vocabulary.
"""

FLAVOR_NAME = "smolora"
ADAPTER_PARAM = "adapter"  # the param (and /stream field) naming an adapter set's adapter
ADAPTER_SET_MODE = "adapter_set"  # the flavor mode of a set of adapters on one base
ADAPTER_SET_REFS_FILE = "adapters.json"  # its hashed data file: adapter name -> model URI

# Run tags (lineage).
TAG_BASE_MODEL = "smolora.base_model"
TAG_BASE_MODEL_REVISION = "smolora.base_model_revision"
TAG_BASE_MODEL_SHA256 = "smolora.base_model_sha256"
TAG_DATASET = "smolora.dataset"
TAG_DATASET_FINGERPRINT = "smolora.dataset_fingerprint"
TAG_DEVICE = "smolora.device"
TAG_ATTN_IMPLEMENTATION = "smolora.attn_implementation"  # sdpa, eager, flash_attention_2... as training ran
TAG_PADDING_FREE = "smolora.padding_free"  # TRL flattened each batch into one row (packing with bfd)
TAG_PYTHON = "smolora.python"
TAG_VERSION_PREFIX = "smolora.version."  # + torch / transformers / peft / trl / mlflow / smolora_mlflow
TAG_CHECKPOINT_DIR = "smolora.checkpoint_dir"
TAG_ADAPTER_SIZE = "smolora.adapter_size_bytes"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_NOTE = "mlflow.note.content"
TAG_ERROR = "smolora.error"  # why a run failed
ARTIFACT_ERROR = "error.txt"  # the traceback of a failed run

# Pipeline and evaluation run tags.
TAG_STEP = "smolora.step"  # pipeline, evaluate
TAG_TRAIN_RUN_ID = "smolora.train_run_id"  # on a pipeline's parent run
TAG_EVAL_RUN_ID = "smolora.eval_run_id"
TAG_PIPELINE_RUN_ID = "smolora.pipeline_run_id"
TAG_MODEL_URI = "smolora.model_uri"
TAG_REGISTERED_MODEL = "smolora.registered_model"
TAG_REGISTERED_VERSION = "smolora.registered_version"
TAG_PROMOTION = "smolora.promotion"
TAG_EVALUATED_MODEL = "smolora.evaluated_model"
TAG_EVAL_SPLIT = "smolora.eval_split"

# Registered model version tags.
TAG_RUN_ID = "smolora.run_id"
TAG_MODEL_ID = "smolora.model_id"  # MLflow's SQL store does not keep ModelVersion.model_id
PARAM_TAG_PREFIX = "smolora.param."
METRIC_TAG_PREFIX = "smolora.metric."
TRANSITION_TAG_PREFIX = "smolora.transition."
PROMOTION_TAG_PREFIX = "smolora.promotion."

# Metrics.
METRIC_LOSS = "loss"
METRIC_TRAIN_LOSS = "train_loss"  # final average training loss
METRIC_EVAL_LOSS = "eval_loss"
METRIC_EVAL_PERPLEXITY = "eval_perplexity"
METRIC_TRAINABLE_PARAMS = "trainable_params"
METRIC_TOTAL_PARAMS = "total_params"
METRIC_TRAINABLE_PERCENT = "trainable_percent"
METRIC_ADAPTER_SIZE = "adapter_size_bytes"

# Run artifacts.
ARTIFACT_ADAPTER = "adapter"
ARTIFACT_CONFIG = "config/smolora_config.yaml"
ARTIFACT_MODEL_CARD = "README.md"
ARTIFACT_LOSS_CURVE = "plots/loss_curve.png"
ARTIFACT_GENERATIONS = "generations.json"  # mlflow.log_table file, with a `step` column
ARTIFACT_LORA_CONFIG = "config/lora_config.json"  # the resolved PEFT LoraConfig of a run
ARTIFACT_TRAINER_CONFIG = "config/trainer_config.json"  # the resolved TRL config (SFTConfig, DPOConfig, ...)
ARTIFACT_COMPLETIONS = "completions.json"  # GRPO: sampled completions and each reward, with a `step` column
ARTIFACT_PREFERENCE_SCORES = "preference_scores.json"  # DPO: eval pairs' chosen/rejected rewards per `step`

# File written next to each checkpoint so a resume finds its MLflow run.
RUN_ID_FILE = "mlflow_run_id.txt"

# Prompts: which format a run trained with, and the chat template it used.
TAG_PROMPT_FORMAT = "smolora.prompt_format"  # chat | plain
TAG_PROMPT_FORMAT_REASON = "smolora.prompt_format_reason"  # why `auto` chose it (tokenizer, generation config, name)
TAG_CHAT_TEMPLATE_SHA256 = "smolora.chat_template_sha256"
TAG_TOKENIZER_SHA256 = "smolora.tokenizer_sha256"  # of the tokenizer's vocabulary and rules (semver MAJOR)
ARTIFACT_CHAT_TEMPLATE = "prompt/chat_template.jinja"

# Task evaluation: scores of generated answers (each also logged as BASE_PREFIX + name for the base model).
METRIC_EXACT_MATCH = "exact_match"
METRIC_CONTAINS_ANSWER = "contains_answer"
METRIC_REGEX_MATCH = "regex_match"
METRIC_ANSWER_LENGTH = "answer_length"  # mean characters of a generated answer
TASK_METRICS = (METRIC_EXACT_MATCH, METRIC_CONTAINS_ANSWER, METRIC_REGEX_MATCH, METRIC_ANSWER_LENGTH)
BASE_PREFIX = "base_"
ARTIFACT_TASK_EVAL = "task_eval.json"  # mlflow.log_table: prompt, expected, base and fine-tuned answers, scores
# Metrics that are better when higher (promotion infers the direction from this; others are lower-is-better).
HIGHER_IS_BETTER = frozenset({METRIC_EXACT_MATCH, METRIC_CONTAINS_ANSWER, METRIC_REGEX_MATCH,
                              "mean_token_accuracy"})

# Checkpoints logged as MLflow LoggedModels.
TAG_CHECKPOINT_STEP = "smolora.checkpoint.step"
TAG_CHECKPOINT_ROLE = "smolora.checkpoint.role"  # comma-separated: latest, best
TAG_CHECKPOINT_RANK = "smolora.checkpoint.rank"  # 1 = best on the ranking metric
CHECKPOINT_MODEL_PREFIX = "checkpoint-"

# Sweeps.
TAG_SWEEP_RUN_ID = "smolora.sweep_run_id"  # on each trial run
TAG_SWEEP_TRIAL = "smolora.sweep_trial"
TAG_SWEEP_BEST_RUN_ID = "smolora.sweep_best_run_id"  # on the sweep's parent run
METRIC_SWEEP_BEST = "best_value"

# Serving.
ENV_SERVED_MODEL_NAME = "SMOLORA_SERVED_MODEL_NAME"  # set by `smolora serve`: the name /v1/models lists
