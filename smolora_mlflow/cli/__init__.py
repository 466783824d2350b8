"""The ``smolora`` command line: one subcommand per step of a LoRA fine-tune's life.

:mod:`~smolora_mlflow.cli.main` runs a command line (exit codes, output), :mod:`~smolora_mlflow.cli.parser`
parses it (it also serves ``mlflow run``) and :mod:`~smolora_mlflow.cli.commands` holds the command table and one
handler per command (the registry handlers in :mod:`~smolora_mlflow.cli.registry_commands`).
"""

from __future__ import annotations

from smolora_mlflow.cli.main import main
from smolora_mlflow.cli.parser import (
    CONFIG_COMMANDS,
    PROG,
    UsageError,
    add_config_options,
    build_config,
    build_parser,
    normalize_argv,
    parse_args,
)
from smolora_mlflow.config_parsing import parse_bool

__all__ = [
    "CONFIG_COMMANDS", "PROG", "UsageError", "add_config_options", "build_config",
    "build_parser", "main", "normalize_argv", "parse_args", "parse_bool",
]
