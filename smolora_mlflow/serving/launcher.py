"""``python -m smolora_mlflow.serving MODEL_URI``: check the model, then run the guarded scoring server.

What ``smolora serve`` runs. Like ``mlflow models serve --env-manager local`` it downloads the model
and starts uvicorn in this Python, but on :mod:`smolora_mlflow.serving.app` (MLflow's app behind the
request guard), and first it opens the model through the integrity gate
(:func:`smolora_mlflow.models.integrity.open_verified`): ``models:/`` and ``runs:/`` URIs are pinned and
the manifest compared with the digest on record, the MLmodel's ``python_function`` loader must be this
package's flavor, links may not leave the folder, every file is hashed. A refusal exits with status 1
naming the version, file or MLmodel key, before anything loads. Only smolora models are served.

The server process gets the digest (``SMOLORA_MANIFEST_SHA256``), so its loader checks the files again
against it, and ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, so no pickle is ever unpickled in it. An API
key (``SMOLORA_SERVE_API_KEY``) is passed on in the environment only, never on a command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from smolora_mlflow.constants import ENV_SERVED_MODEL_NAME

UVICORN_APP = "smolora_mlflow.serving.app:app"


def command(model_uri: str, host: str, port: int, workers: int | None = None) -> list[str]:
    """The command ``smolora serve`` runs (and ``--dry_run`` prints)."""
    cmd = [sys.executable, "-m", "smolora_mlflow.serving", model_uri, "--host", host, "--port", str(port)]
    return cmd + (["--workers", str(workers)] if workers else [])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smolora_mlflow.serving", description=__doc__.splitlines()[0])
    p.add_argument("model_uri")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int)
    p.add_argument("--timeout", type=int, help="Seconds a request may take (default: MLflow's, 60).")
    return p


def served_name(model_uri: str) -> str:
    """The name ``/v1/models`` lists: the registered model's name, else the folder's name."""
    if model_uri.startswith("models:/"):
        return model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    return os.path.basename(os.path.normpath(model_uri)) or "default"


def server_environment(model_uri: str, timeout: int | None = None) -> dict[str, str]:
    """Download and check the model; the environment of the uvicorn process that serves it."""
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    from smolora_mlflow.models import integrity

    vm = integrity.open_verified(model_uri)
    env = dict(os.environ)
    env[scoring_server._SERVER_MODEL_PATH] = str(vm.root)
    env[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(timeout or MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    env[ENV_SERVED_MODEL_NAME] = served_name(model_uri)
    env[MLFLOW_ALLOW_PICKLE_DESERIALIZATION.name] = "false"  # no loader in the server may unpickle anything
    env.pop(integrity.ENV_DIGEST, None)
    env.pop(integrity.ENV_SOURCE, None)
    if vm.expected.digest:
        env[integrity.ENV_DIGEST], env[integrity.ENV_SOURCE] = vm.expected.digest, str(vm.expected.source)
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    from smolora_mlflow.serving.auth import api_key_from_env

    try:  # a bad SMOLORA_SERVE_API_KEY stops here, before the download; the key stays in the environment
        api_key_from_env()
    except ValueError as e:
        print(f"smolora serve: {e}", file=sys.stderr, flush=True)
        return 2

    try:
        env = server_environment(args.model_uri, args.timeout)
    except MlflowException as e:
        print(f"smolora serve: {e.message}", file=sys.stderr, flush=True)
        return 1
    cmd = [sys.executable, "-m", "uvicorn", "--host", args.host, "--port", str(args.port)]
    cmd += ["--workers", str(args.workers)] if args.workers else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [*cmd, UVICORN_APP], env)  # the server keeps this PID (stopped by it)
    return 0  # not reached
