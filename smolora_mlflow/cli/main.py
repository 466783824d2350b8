"""The ``smolora`` command line: the whole lifecycle of a LoRA fine-tune, one subcommand per step.

    smolora run --config configs/demo.yaml --promote          # train -> evaluate -> log -> register -> promote
    smolora train --config configs/demo.yaml --max_steps 20
    smolora evaluate models:/smolora-demo/1
    smolora register <run_id> --name smolora-demo
    smolora transition smolora-demo 1 Staging
    smolora promote smolora-demo 2 --metric eval_loss
    smolora rollback smolora-demo
    smolora versions smolora-demo
    smolora predict models:/smolora-demo@production "The food was"
    smolora serve smolora-demo --alias production -p 5001

The parser is :mod:`smolora_mlflow.cli.parser` (it also serves ``mlflow run``), the command table and the
handlers :mod:`smolora_mlflow.cli.commands` (the registry ones :mod:`smolora_mlflow.cli.registry_commands`).
Only the standard library and the config modules (:mod:`smolora_mlflow.config` and its siblings) are imported
at start, so ``--help`` is instant; the handlers import torch, transformers and MLflow when they run.
Exit codes: 0 success, 1 runtime failure, 2 bad usage, config or input, 130 interrupted.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from smolora_mlflow.cli.commands import COMMANDS
from smolora_mlflow.cli.parser import (
    PROG,
    UsageError,
    parse_args,
)
from smolora_mlflow.config_parsing import ConfigError

__all__ = ["main"]


# ----------------------------------------------------------------------------------------------------
# main


def _exit_code_and_message(e: BaseException) -> tuple[int, str]:
    if isinstance(e, ConfigError):
        return 2, "invalid config: " + " ".join(e.problems)
    if isinstance(e, UsageError):
        return 2, str(e)
    text = " ".join(str(e).split()) or type(e).__name__
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        if isinstance(e, MlflowException):
            usage = e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
            return (2 if usage else 1), " ".join(e.message.split())
    if "smolora_mlflow.data" in sys.modules:
        from smolora_mlflow.data import DataError

        if isinstance(e, DataError):
            return 2, text
    if isinstance(e, FileNotFoundError):
        return 2, text
    return 1, f"{type(e).__name__}: {text}"


def _setup_output(verbose: bool) -> None:
    """Logging to stderr; keep the trainer's and the evaluation's progress bars, drop the per-step noise."""
    import logging
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # one bar per tiny dataset.map
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if os.environ.get("SMOLORA_PROGRESS") == "0":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("smolora_mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # "Creating initial MLflow database tables..." on a new SQLite store: not the command's news
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``smolora`` command; returns the exit code (0 ok, 1 failure, 2 bad usage/config, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug and --verbose work anywhere on the line, not only before the command.
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = parse_args(argv)
        command = args.command
        _setup_output(args.verbose or verbose)
        return int(COMMANDS[command](args) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code, message = _exit_code_and_message(e)
        if debug:
            traceback.print_exc()
        where = f"{PROG} {command}".strip()
        hint = "" if debug else " (--debug shows the traceback)" if code == 1 else ""
        print(f"{where}: error: {message}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
