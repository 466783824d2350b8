"""The handlers of the ``smolora`` subcommands and the command table (see :mod:`smolora_mlflow.cli` for the parser).

Each ``cmd_<name>(args) -> int`` builds and validates its inputs first (so a bad value fails before any
work), then calls the library (:mod:`~smolora_mlflow.workflow`, :mod:`~smolora_mlflow.registry`, ...)
and prints a summary. Heavy modules are imported inside the handlers. Progress and step lines go to
stderr; results go to stdout. The lifecycle (run, train, evaluate, sweep), predict, serve and sync handlers
are here; the registry ones are in :mod:`~smolora_mlflow.cli.registry_commands`, and the option values
several handlers share in :mod:`~smolora_mlflow.cli.option_values`. :data:`COMMANDS` maps every
subcommand to its handler.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from smolora_mlflow import constants as C
from smolora_mlflow.cli.option_values import log_model_options, promotion_direction, use_tracking_uri
from smolora_mlflow.cli.parser import PROG, UsageError, build_config
from smolora_mlflow.cli.registry_commands import cmd_promote, cmd_register, cmd_rollback, cmd_transition, cmd_versions
from smolora_mlflow.config_parsing import parse_bool


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ui_link(run_id: str | None) -> str:
    """A link to the run in the MLflow UI when the tracking server is http(s), else an empty string."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not run_id or not uri.startswith(("http://", "https://")):
        return ""
    from smolora_mlflow.tracking.experiments import run_ui_url

    return run_ui_url(uri, mlflow.MlflowClient().get_run(run_id).info.experiment_id, run_id)


def _print_summary(title: str, rows: list[tuple[str, Any]]) -> None:
    rows = [(k, v) for k, v in rows if v not in (None, "", {})]
    width = max((len(k) for k, _ in rows), default=0)
    print(title)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _fmt_metrics(metrics: dict[str, float], keys: tuple[str, ...] = ("train_loss", "eval_loss",
                                                                      "eval_perplexity")) -> str:
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


TASK_KEYS = C.TASK_METRICS


def _run_row(label: str, run_id: str | None) -> tuple[str, str | None]:
    link = _ui_link(run_id)
    return label, (f"{run_id}  {link}" if link else run_id)


# ----------------------------------------------------------------------------------------------------
# lifecycle


def cmd_run(args: argparse.Namespace) -> int:
    from smolora_mlflow.workflow import check_pipeline_config

    cfg = build_config(args)
    promote = parse_bool("promote", args.promote)
    higher = promotion_direction(args)
    check_pipeline_config(cfg, promote=promote)
    use_tracking_uri(cfg.tracking_uri)
    from smolora_mlflow.workflow import run_pipeline

    steps = itertools.count(1)
    result = run_pipeline(
        cfg, promote=promote, eval_dataset=args.eval_dataset, mode=args.mode,
        promote_options={"metric": args.metric, "min_delta": args.min_delta, "higher_is_better": higher},
        log_model_options=log_model_options(args), on_step=lambda msg: _err(f"==> [{next(steps)}] {msg}"))
    registered = (f"{result.registered_model_name} version {result.registered_version}  "
                  f"(models:/{result.registered_model_name}/{result.registered_version})"
                  if result.registered_version else "not registered (set registered_model_name)")
    promotion = None
    if result.promotion is not None:
        d = result.promotion
        promotion = f"{'promoted to ' + d.stage if d.promoted else 'not promoted'}: {d.reason}"
    _print_summary(f"{PROG} run: done", [
        _run_row("parent run", result.parent_run_id), _run_row("training run", result.train_run_id),
        _run_row("evaluation run", result.eval_run_id), ("model URI", result.model_uri),
        ("registered", registered), ("promotion", promotion), ("metrics", _fmt_metrics(result.metrics)),
    ])
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from smolora_mlflow.workflow import check_pipeline_config

    cfg = build_config(args)
    promote = parse_bool("promote", args.promote)
    check_pipeline_config(cfg, promote=promote)
    use_tracking_uri(cfg.tracking_uri)
    from smolora_mlflow.workflow.sweep import run_sweep

    result = run_sweep(cfg, promote=promote, promote_options={"min_delta": args.min_delta},
                       log_model_options=log_model_options(args), on_step=lambda msg: _err(f"==> {msg}"))
    d = result.promotion
    _print_summary(f"{PROG} sweep: done", [
        _run_row("sweep run", result.parent_run_id), _run_row("best trial run", result.best_run_id),
        ("best params", json.dumps(result.best_params)), (cfg.sweep_metric, f"{result.best_value:.6g}"),
        ("model URI", result.model_uri),
        ("registered", f"{cfg.registered_model_name} version {result.registered_version}"
         if result.registered_version else None),
        ("promotion", None if d is None else f"{'promoted to ' + d.stage if d.promoted else 'not promoted'}: "
                                             f"{d.reason}"),
    ])
    for t in sorted(result.trials, key=lambda t: t["number"]):
        print(f"  trial {t['number']}: {cfg.sweep_metric}={t['value']:.6g}  {json.dumps(t['params'])}  {t['run_id']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    log_model = parse_bool("log_model", args.log_model)
    use_tracking_uri(cfg.tracking_uri)
    from smolora_mlflow.train import SmoLoRA

    _err("==> train: fine-tuning the LoRA adapter")
    lora = SmoLoRA(config=cfg)
    result = lora.train()
    info, note = None, None
    if log_model and result.run_id:
        from smolora_mlflow.workflow import log_trained_model

        _err(f"==> log: logging the {args.mode} model with the smolora flavor")
        info = log_trained_model(lora, mode=args.mode, registered_model_name=cfg.registered_model_name,
                                 **log_model_options(args))
    elif log_model:
        from smolora_mlflow.tracking import is_main_process

        note = ("model not logged: tracking is off" if is_main_process()
                else "this is not the main process: rank 0 logs the run and the model")
    version = getattr(info, "registered_model_version", None)
    _print_summary(f"{PROG} train: done", [
        _run_row("training run", result.run_id), ("adapter", result.adapter_dir),
        ("model URI", info.model_uri if info else None),
        ("registered", f"{cfg.registered_model_name} version {version}" if version else None),
        ("note", note), ("steps", result.global_step), ("metrics", _fmt_metrics(result.metrics)),
    ])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = build_config(args)  # validates the options before anything is looked up
    use_tracking_uri(cfg.tracking_uri)
    from smolora_mlflow.evaluation.loading import training_config_of
    from smolora_mlflow.workflow import evaluate_run

    base = training_config_of(args.model)
    if base is not None:
        cfg = build_config(args, base)
    _err(f"==> evaluate: {args.model}")
    result = evaluate_run(args.model, cfg, dataset=args.eval_dataset)
    _print_summary(f"{PROG} evaluate: done", [
        _run_row("evaluation run", result.run_id), ("model", args.model), ("data", result.split),
        ("metrics", _fmt_metrics(result.metrics, ("eval_loss", "eval_perplexity", "eval_tokens", "eval_rows"))),
        ("task (fine-tuned)", _fmt_metrics(result.metrics, TASK_KEYS)),
        ("task (base)", _fmt_metrics(result.metrics, tuple(C.BASE_PREFIX + k for k in TASK_KEYS))),
    ])
    for row in result.generations:
        print(f"  > {row['prompt']}{row['generated_text']}")
    return 0


# ----------------------------------------------------------------------------------------------------
# predict and serve


def _parse_prompt_lines(text: str, jsonl: bool, where: str) -> list[Any]:
    prompts: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} line {number} is not valid JSON ({e.msg}).") from e
        if isinstance(obj, str):
            prompts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            prompts.append(obj["messages"])
        else:
            raise UsageError(f'{where} line {number} must be a string or an object with "prompt" or "messages".')
    return prompts


def read_prompts(prompts: list[str], file: str | None, stdin=None) -> list[Any]:
    """Prompts from arguments, a file (lines or .jsonl) or stdin; chats come back as message lists."""
    stdin = stdin or sys.stdin
    out: list[Any] = [p for p in prompts if p != "-"]
    if file:
        path = Path(file)
        if not path.is_file():
            raise UsageError(f"prompt file `{file}` does not exist.")
        out += _parse_prompt_lines(path.read_text(encoding="utf-8"), path.suffix.lower() == ".jsonl", file)
    if "-" in prompts or (not prompts and not file):
        if stdin.isatty() and not prompts:
            raise UsageError("no prompts: pass PROMPT arguments, -f FILE, or pipe prompts on stdin.")
        out += _parse_prompt_lines(stdin.read(), False, "stdin")
    if not out:
        raise UsageError("no prompts given (the arguments, file or stdin were empty).")
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts, args.file)
    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens,
                              "do_sample": parse_bool("do_sample", args.do_sample)}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    full, as_jsonl = parse_bool("full_text", args.full_text), parse_bool("jsonl", args.jsonl)
    use_tracking_uri(args.tracking_uri)
    from smolora_mlflow.evaluation.loading import load_for_inference
    from smolora_mlflow.models.generation import format_chat, generate, render_prompts, resolve_prompt_format

    loaded = load_for_inference(args.model, device=args.device)
    # Plain prompts go to the model as its training rendered them (the chat template for a chat fine-tune).
    fmt = loaded.prompt_format if args.prompt_format is None else resolve_prompt_format(
        args.prompt_format, loaded.tokenizer, loaded.source)
    texts = [render_prompts(loaded.tokenizer, [p], fmt)[0] if isinstance(p, str) else format_chat(loaded.tokenizer, p)
             for p in prompts]
    outputs = generate(loaded.model, loaded.tokenizer, texts, batch_size=args.batch_size, **params)
    for prompt, completion in zip(texts, outputs, strict=True):
        if as_jsonl:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            print(prompt + completion if full else completion)
    return 0


def serve_uri(args: argparse.Namespace) -> str:
    """``models:/name@alias`` / ``models:/name/<stage|version>``, or MODEL itself when it is a URI or path
    (a bare run id serves the run's ``model``)."""
    from smolora_mlflow.refs import parse_model_ref

    model = args.model
    ref = parse_model_ref(model)
    if ref.kind != "path" or os.path.exists(model):
        if args.alias or args.stage or args.version:
            raise UsageError("--alias/--stage/--version apply to a registered model name, not to a URI or path.")
        if ref.kind == "run" and ref.artifact_path is None:
            return f"runs:/{ref.run_id}/model"
        return f"models:/{ref.model_id}" if ref.kind == "logged_model" else model
    from smolora_mlflow.registry.semver import alias, parse

    if "@" in model and not (args.alias or args.stage or args.version):  # NAME@ALIAS, NAME@1.2.0
        model, _, key = model.rpartition("@")
        uri = f"models:/{model}@{alias(key) if parse(key) else key}"
    elif args.version and parse(args.version):  # MLflow resolves a semver through its alias
        uri = f"models:/{model}@{alias(args.version)}"
    elif args.stage or args.version:
        uri = f"models:/{model}/{args.stage or args.version}"
    else:
        uri = f"models:/{model}@{args.alias or 'production'}"
    return parse_model_ref(uri).text  # refuses what no registry holds before a server process starts


def serve_command(args: argparse.Namespace) -> list[str]:
    """The guarded server (:mod:`smolora_mlflow.serving`); ``mlflow models serve`` for other env managers."""
    if args.env_manager == "local":
        from smolora_mlflow.serving.launcher import command

        return command(serve_uri(args), args.host, args.port, args.workers)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", serve_uri(args),
           "--env-manager", args.env_manager, "-h", args.host, "-p", str(args.port)]
    if args.workers:
        cmd += ["-w", str(args.workers)]
    return cmd


def _serve_api_key(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """The server's API key (``--api_key``, else ``SMOLORA_SERVE_API_KEY``), put in ``env`` for the server:
    the environment, not argv, which every local user can read."""
    from smolora_mlflow.serving.auth import ENV_API_KEY, api_key_from_env, check_api_key

    try:
        key = check_api_key(args.api_key, "--api_key") if args.api_key is not None else api_key_from_env(env)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if key is not None and args.env_manager != "local":  # fail closed: mlflow models serve has no such check
        raise UsageError(f"an API key needs the local server; `mlflow models serve` (--env_manager "
                         f"{args.env_manager}) would serve without it. Use --env_manager local.")
    if key is not None:
        env[ENV_API_KEY] = key
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    cmd = serve_command(args)
    env = dict(os.environ)
    key = _serve_api_key(args, env)  # checked before a dry run too; never part of the printed command
    if parse_bool("dry_run", args.dry_run):
        import shlex

        print(shlex.join(cmd))
        return 0
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if args.env_manager != "local":
        _err(f"==> note: with --env_manager {args.env_manager} this is plain `mlflow models serve`, without the "
             "request guard and manifest-digest check of the local server")
    elif key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        _err(f"==> warning: serving on {args.host} without an API key; anyone who can reach it can use it "
             "(set SMOLORA_SERVE_API_KEY or --api_key)")
    _err(f"==> serving {serve_uri(args)} at http://{args.host}:{args.port}/invocations"
         f"{' (API key required)' if key else ''} (Ctrl-C stops it)")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130



def cmd_sync(args: argparse.Namespace) -> int:
    from smolora_mlflow.tracking.outbox import sync

    run_id, sent = sync(args.output_dir, tracking_uri=args.tracking_uri)
    _print_summary(f"{PROG} sync: done", [_run_row("run", run_id), ("writes sent", sent)])
    return 0


# The handler of each subcommand of the parser (`smolora_mlflow.cli.parser.build_parser`).
COMMANDS = {
    "run": cmd_run, "train": cmd_train, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
    "register": cmd_register, "transition": cmd_transition, "promote": cmd_promote, "rollback": cmd_rollback,
    "versions": cmd_versions,
    "predict": cmd_predict, "serve": cmd_serve, "sync": cmd_sync,
}
