"""The ``smolora`` argument parser: one sub-parser per command, every SmoloraConfig field an option.

The same parser serves ``mlflow run`` (MLproject entry points call ``python -m smolora_mlflow <command>``):
every SmoloraConfig field is an option ``--<field> VALUE`` (``--lora-r`` works too), so MLflow's
``-P lora_r=16``, which it appends as ``--lora_r 16``, is understood. Values are typed with
:func:`smolora_mlflow.config.coerce`; an unknown or ill-typed option fails with exit code 2 before any
work starts. Only the standard library and the config modules (:mod:`smolora_mlflow.config`, its
siblings ``config_checks`` and ``config_parsing``) are imported here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from smolora_mlflow.config import (
    SmoloraConfig,
    coerce,
    field_help,
    field_names,
    field_type,
    load_yaml,
    parse_overrides,
)
from smolora_mlflow.config_parsing import ConfigError, describe_type

PROG = "smolora"
CONFIG_COMMANDS = ("run", "train", "evaluate", "sweep")
_CFG_PREFIX = "cfg__"


class UsageError(Exception):
    """A command line that cannot be acted on (exit code 2)."""


# ----------------------------------------------------------------------------------------------------
# option helpers



def _flag(parser, name: str, help_text: str) -> None:
    """A boolean option that works bare (``--force``) and with a value (``--force true``, as MLflow passes it)."""
    parser.add_argument(f"--{name}", nargs="?", const="true", default="false", metavar="BOOL", help=help_text)


def _esc(text: str) -> str:
    return text.replace("%", "%%")


def _metavar(tp: Any) -> str:
    import typing

    choices = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(map(str, choices)) + "}"
    if len(choices) == 1 and typing.get_origin(choices[0]) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(choices[0]))) + "}"
    text = describe_type(tp)
    for prefix, meta in (("true or false", "BOOL"), ("an integer", "INT"), ("a number", "FLOAT"),
                         ("a list", "A,B,..."), ("a mapping", "K=V,..."), ("a string", "TEXT")):
        if text.startswith(prefix):
            return meta
    return "VALUE"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and one ``--<field>`` per SmoloraConfig field (help from the field metadata)."""
    defaults = SmoloraConfig().to_dict()
    group = parser.add_argument_group(
        "config", "Every SmoloraConfig field. Precedence: defaults < --config recipe < --set < --<field>.")
    group.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of config fields, e.g. configs/demo.yaml.")
    group.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="Override one field (repeatable), e.g. --set lora_r=16.")
    for name in field_names():
        tp = field_type(name)
        is_bool = describe_type(tp).startswith("true or false")
        text = f"{field_help(name)} [{describe_type(tp)}; default: {defaults[name]!r}]"
        kwargs: dict[str, Any] = {"dest": _CFG_PREFIX + name, "default": argparse.SUPPRESS, "help": _esc(text),
                                  "metavar": _metavar(tp)}
        if is_bool:
            kwargs.update(nargs="?", const="true")
        group.add_argument(f"--{name}", **kwargs)


def build_config(args: argparse.Namespace, base: SmoloraConfig | None = None) -> SmoloraConfig:
    """The config from ``base`` (or the defaults), the recipe, ``--set`` and the ``--<field>`` options.

    Every problem is reported at once as a ConfigError naming the field, the value and what is allowed.
    """
    values: dict[str, Any] = base.to_dict() if base is not None else {}
    problems: list[str] = list(getattr(args, "unknown_problems", []))
    if args.config:
        try:
            values.update(load_yaml(args.config))
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        values.update(parse_overrides(args.set_overrides))
    except ConfigError as e:
        problems.extend(e.problems)
    for key, raw in vars(args).items():
        if key.startswith(_CFG_PREFIX):
            name = key[len(_CFG_PREFIX):]
            try:
                values[name] = coerce(name, raw)
            except ConfigError as e:
                problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return SmoloraConfig.from_dict(values)


def _unknown_options(command: str, extras: list[str]) -> list[str]:
    """Messages for options the parser did not know, naming each and its value."""
    problems, i = [], 0
    while i < len(extras):
        token = extras[i]
        if not token.startswith("--"):
            problems.append(f"unexpected argument {token!r} for `{PROG} {command}`.")
            i += 1
            continue
        name, eq, value = token[2:].partition("=")
        if not eq and i + 1 < len(extras) and not extras[i + 1].startswith("--"):
            value, i = extras[i + 1], i + 1
        i += 1
        if command in CONFIG_COMMANDS:
            try:
                coerce(name.replace("-", "_"), value)
            except ConfigError as e:
                problems.append(f"unknown parameter --{name}={value!r}: {e.problems[0]}")
        else:
            problems.append(f"unknown option --{name} (value {value!r}) for `{PROG} {command}`; "
                            f"see `{PROG} {command} --help`.")
    return problems


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``--lora-r`` -> ``--lora_r``: options are spelt with underscores (as ``mlflow run -P`` passes them)."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + eq + value
        out.append(token)
    return out


# ----------------------------------------------------------------------------------------------------
# the parser


def _sub(subs, name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help_text, description=description or help_text, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)


def _min_delta(text: str) -> float:
    """``--min_delta``: a finite number >= 0 (``float`` also reads nan and inf, which no gain can beat)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}; e.g. 0 or 0.01")
    return value


def _tracking_option(parser) -> None:
    parser.add_argument("--tracking_uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or MLflow's).")


def _add_lifecycle_commands(subs) -> None:
    p = _sub(subs, "run", "Train -> evaluate -> log -> register -> (optionally) promote, under one parent run.",
             "Fine-tune a LoRA adapter, merge it, evaluate it on the held-out split, log it with the smolora\n"
             "flavor, register a version (when registered_model_name is set) and, with --promote, promote it\n"
             "if it beats the current Production version. Training and evaluation are nested runs.")
    _flag(p, "promote", "Promote the new version (gated on --metric) after registering it.")
    p.add_argument("--metric", default="eval_loss",
                   help="Metric that gates the promotion: eval_loss (default), eval_perplexity, or with "
                        "--task_eval exact_match, contains_answer, regex_match, answer_length.")
    p.add_argument("--min_delta", type=_min_delta, default=0.0, help="The new version must win by more than this.")
    _direction_option(p)
    _add_model_log_options(p)
    p.add_argument("--eval_dataset", help="Evaluate on all rows of this dataset instead of the held-out split.")
    add_config_options(p)

    p = _sub(subs, "sweep", "Hyperparameter search with Optuna: one parent run, a nested run per trial, the best "
                            "registered.",
             "Train sweep_trials trials over sweep_space (e.g. --sweep_space 'lora_r=choice:4|8|16,learning_rate=\n"
             "log:1e-4..1e-2'), each a run nested under one sweep run, optimising sweep_metric (eval_loss needs\n"
             "eval_fraction > 0; task scores need --task_eval). The best trial's model is logged, registered\n"
             "when registered_model_name is set, and with --promote promoted on sweep_metric.")
    p.add_argument("--backend", dest=_CFG_PREFIX + "sweep_backend", default=argparse.SUPPRESS,
                   choices=("optuna", "ray"), help="Same as --sweep_backend: optuna (default) or ray (Ray Tune trials "
                                                   "in --sweep_workers parallel processes).")
    _flag(p, "promote", "Promote the best trial's version (gated on sweep_metric) after registering it.")
    p.add_argument("--min_delta", type=_min_delta, default=0.0, help="The new version must win by more than this.")
    _add_model_log_options(p)
    add_config_options(p)

    p = _sub(subs, "train", "Fine-tune a LoRA adapter and log the merged model (registered if registered_model_name).")
    _add_model_log_options(p)
    p.add_argument("--log_model", nargs="?", const="true", default="true", metavar="BOOL",
                   help="Merge and log the model to the training run (default: true).")
    add_config_options(p)
    _resume_option(p)

    p = _sub(subs, "evaluate", "Eval loss, perplexity and sample generations of a model, logged to a run.",
             "Score MODEL on the held-out split of its training dataset (the config its training run logged,\n"
             "updated by the config options given here) or on all rows of --eval_dataset.")
    p.add_argument("model", metavar="MODEL",
                   help="Run id, runs:/ or models:/ URI, MLflow model folder, merged or adapter folder.")
    p.add_argument("--eval_dataset", help="Score all rows of this dataset (a file, folder or hub id).")
    add_config_options(p)


def _direction_option(p) -> None:
    p.add_argument("--higher_is_better", nargs="?", const="true", default=None, metavar="BOOL",
                   help="The metric is better when higher (default: inferred; task scores such as exact_match "
                        "are higher-is-better, losses lower-is-better).")


def _resume_option(p) -> None:
    p.add_argument("--resume", dest=_CFG_PREFIX + "resume_from_checkpoint", default=argparse.SUPPRESS,
                   metavar="RUN_ID|CHECKPOINT|latest",
                   help="Continue a stopped training in the same MLflow run: its run id, a checkpoint folder, "
                        "or `latest` (the newest complete checkpoint in output_dir).")


def _add_model_log_options(p) -> None:
    p.add_argument("--mode", choices=("merged", "adapter"), default="merged",
                   help="Log full merged weights (default) or only the adapter plus a base-model reference.")
    p.add_argument("--pip_requirements", metavar="FILE|LIST",
                   help="Requirements of the logged model: a requirements file or a comma-separated list "
                        "(default: inferred from the saved model, which takes a while).")


def _add_registry_commands(subs) -> None:
    p = _sub(subs, "register", "Register a logged model as a new version (with lineage tags).")
    p.add_argument("model", metavar="MODEL", help="Run id (training or pipeline run), runs:/ or models:/ URI.")
    p.add_argument("--name", required=True, help="Registered model name (created if missing).")
    p.add_argument("--description", help="Version description (default: the model card).")
    p.add_argument("--semver", help="MAJOR.MINOR.PATCH of the new version instead of the one derived from what "
                                    "changed since the previous version; greater than every existing one.")
    _tracking_option(p)

    p = _sub(subs, "transition", "Move a version to a stage; the alias of the same name follows.")
    p.add_argument("name")
    p.add_argument("version", help="Version number, semver (1.2.0), alias or `latest`.")
    p.add_argument("stage", help="None, Staging, Production or Archived (case-insensitive).")
    p.add_argument("--reason", help="Why (kept in the version's history).")
    _flag(p, "no_archive_existing", "Keep the versions that hold the stage where they are.")
    _tracking_option(p)

    p = _sub(subs, "promote", "Promote a version if it beats the current holder of the stage on a metric.")
    p.add_argument("name")
    p.add_argument("version", nargs="?", default="latest",
                   help="Version number, semver (1.2.0), alias or `latest` (default).")
    p.add_argument("--to", default="Production", help="Staging or Production (default).")
    p.add_argument("--metric", default="eval_loss",
                   help="Metric to compare (default: eval_loss); any metric of the version's evaluation, e.g. "
                        "exact_match, contains_answer, regex_match, answer_length.")
    _direction_option(p)
    p.add_argument("--min_delta", type=_min_delta, default=0.0, help="Must win by more than this (default 0).")
    _flag(p, "force", "Promote even if the gate says no (needs --reason).")
    p.add_argument("--reason", help="Why (required with --force).")
    _tracking_option(p)

    p = _sub(subs, "rollback", "Give Production back to the version that held it before the current one.")
    p.add_argument("name")
    p.add_argument("--reason", help="Why (kept in the history).")
    _tracking_option(p)

    p = _sub(subs, "versions", "List the versions of a registered model (semver, stage, aliases, metrics).")
    p.add_argument("name")
    _flag(p, "history", "Also print every stage transition, oldest first.")
    _tracking_option(p)


def _add_serving_commands(subs) -> None:
    p = _sub(subs, "predict", "Generate completions with a model for prompts from arguments, a file or stdin.",
             "Prompts come from PROMPT arguments, from -f FILE (one per line, or .jsonl with a `prompt` or\n"
             "`messages` field per line), or from stdin (also with PROMPT `-`). One completion is printed per\n"
             "prompt; --jsonl prints {\"prompt\", \"completion\"} objects instead.")
    p.add_argument("model", metavar="MODEL", help="Run id, runs:/ or models:/ URI, or a local model folder.")
    p.add_argument("prompts", metavar="PROMPT", nargs="*", help="Prompts (`-` reads stdin).")
    p.add_argument("-f", "--file", help="File of prompts: one per line, or .jsonl objects.")
    p.add_argument("--max_new_tokens", type=int, default=64)
    _flag(p, "do_sample", "Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--seed", type=int, help="Seed for sampling.")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda...")
    p.add_argument("--prompt_format", choices=("auto", "chat", "plain"),
                   help="How plain prompts reach the model: through the chat template (chat) or as they are "
                        "(plain). Default: what the model's training recorded.")
    _flag(p, "full_text", "Print each prompt followed by its completion.")
    _flag(p, "jsonl", "Print one JSON object per prompt.")
    _tracking_option(p)

    p = _sub(subs, "serve", "Serve a registered model over HTTP: MLflow's scoring server behind a request guard.",
             "Runs MLflow's own scoring server (what `mlflow models serve --env-manager local` runs) for\n"
             "models:/<name>@<alias> (or models:/<name>/<stage|version>, or MODEL as given when it is a URI or\n"
             "a path), behind a guard that answers oversized, too deeply nested or untyped requests with a\n"
             "4xx; models:/ and runs:/ URIs are checked against the manifest digest on record first.\n"
             "Other --env_manager values run plain `mlflow models serve`.\n"
             "POST {\"inputs\": {\"prompt\": [\"The food was\"]}, \"params\": {\"max_new_tokens\": 16}}\n"
             "to /invocations.")
    p.add_argument("model", metavar="NAME_OR_URI",
                   help="Registered model name, NAME@ALIAS or NAME@SEMVER (e.g. reviews@1.2.0), or a model URI/path.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", help="Alias to serve (default: production).")
    which.add_argument("--stage", help="Stage to serve, e.g. Staging.")
    which.add_argument("--version", help="Version number or semver (1.2.0) to serve.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1).")
    p.add_argument("-p", "--port", type=int, default=5000, help="Port (default 5000).")
    p.add_argument("--workers", type=int, help="Server worker processes.")
    p.add_argument("--env_manager", default="local", choices=("local", "virtualenv", "uv", "conda"),
                   help="Environment for the server (default: local, this Python).")
    p.add_argument("--api_key", metavar="KEY",
                   help="Require `Authorization: Bearer KEY` on every route but /ping and /health (401 otherwise); "
                        "default: $SMOLORA_SERVE_API_KEY. The server gets it through its environment, never its "
                        "command line; prefer the variable, as this command's own line is visible in `ps`.")
    _flag(p, "dry_run", "Print the server command instead of running it.")
    _tracking_option(p)

    p = _sub(subs, "sync", "Upload what a training could not log while the tracking server was unreachable.",
             "A training whose tracking server stayed unreachable past SMOLORA_TRACKING_RETRY_SECONDS keeps\n"
             "the unsent writes (metrics, tags, artifacts, final status) in OUTPUT_DIR/mlflow_outbox.json.\n"
             "This sends them, in order, to the same run, and ends the run FINISHED.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="The training's output_dir.")
    _tracking_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune, track, register, promote and serve LoRA adapters of causal LMs with MLflow.",
        epilog="`smolora <command> --help` lists a command's options. Exit codes: 0 ok, 1 failure, "
               "2 bad usage or config.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors (anywhere on the line).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Log progress of smolora_mlflow at INFO (--verbose: anywhere on the line).")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_lifecycle_commands(subs)
    _add_registry_commands(subs)
    _add_serving_commands(subs)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line (argparse errors exit 2).

    An unknown option of a config command is kept in ``args.unknown_problems`` for :func:`build_config`, which
    reports it together with any ill-typed value; for other commands it raises a UsageError at once.
    """
    args, extras = build_parser().parse_known_args(normalize_argv(argv))
    problems = _unknown_options(args.command, extras)
    if problems and args.command not in CONFIG_COMMANDS:
        raise UsageError(" ".join(problems))
    args.unknown_problems = problems  # build_config reports them with the bad values, all at once
    return args
