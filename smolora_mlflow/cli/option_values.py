"""What several ``smolora`` handlers make of the options they share.

The tracking URI every MLflow-facing command talks to, the promotion direction (``--higher_is_better``) and
the pip requirements a logged model records (``--pip_requirements``). Imports only the standard library and
:mod:`smolora_mlflow.config_parsing` at start (MLflow inside :func:`use_tracking_uri`), so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smolora_mlflow.config_parsing import parse_bool


def use_tracking_uri(uri: str | None) -> None:
    """Point MLflow's tracking and registry at ``uri`` (``--tracking_uri``); None keeps MLflow's default."""
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


def promotion_direction(args: argparse.Namespace) -> bool | None:
    """--higher_is_better as given, or None: the registry infers it from the metric's name."""
    return None if args.higher_is_better is None else parse_bool("higher_is_better", args.higher_is_better)


def pip_requirements(spec: str | None) -> list[str] | str | None:
    """``--pip_requirements``: a requirements file (its absolute path), a comma-separated list, or None."""
    if not spec:
        return None
    if Path(spec).is_file():
        return str(Path(spec).resolve())
    return [r.strip() for r in spec.split(",") if r.strip()]


def log_model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments for logging a model: ``pip_requirements`` when the option was given."""
    req = pip_requirements(args.pip_requirements)
    return {"pip_requirements": req} if req is not None else {}
