"""``python -m smolora_mlflow.serving MODEL_URI``: check the model, then run the guarded scoring server.

What ``smolora serve`` runs. Like ``mlflow models serve --env-manager local`` it downloads the model
and starts uvicorn in this Python, but on :mod:`smolora_mlflow.serving.app` (MLflow's app behind the
request guard), and for ``models:/`` and ``runs:/`` URIs it first pins the version and compares the
model's manifest with the digest recorded on the version (or run): a mismatch exits with status 1
naming the version, before anything loads. The server process gets the digest too
(``SMOLORA_MANIFEST_SHA256``) and checks the files again as it loads them. An API key
(``SMOLORA_SERVE_API_KEY``) is passed on in the environment only, never on a command line.
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
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    from smolora_mlflow.models import manifest

    local, conf, expected = manifest.fetch_checked(model_uri)
    local = os.path.abspath(local)
    env = dict(os.environ)
    env[scoring_server._SERVER_MODEL_PATH] = local
    env[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(timeout or MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    env[ENV_SERVED_MODEL_NAME] = served_name(model_uri)
    env.pop(manifest.ENV_DIGEST, None)
    if conf and expected.digest:
        env[manifest.ENV_DIGEST], env[manifest.ENV_SOURCE] = expected.digest, str(expected.source)
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
