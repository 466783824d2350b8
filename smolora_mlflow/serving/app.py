"""The ASGI app ``smolora serve`` runs: ``uvicorn smolora_mlflow.serving.app:app``.

Built the way MLflow's ``mlflow.pyfunc.scoring_server.app`` builds its own (the model path in
``__pyfunc_model_path__``, load-time settings in ``SERVING_MODEL_CONFIG``), so ``/invocations``,
``/ping``, ``/health`` and ``/version`` answer as ``mlflow models serve``'s do, with
:class:`~smolora_mlflow.serving.guard.RequestGuard` in front. Beside them, as Starlette routes with MLflow's
app as the default, :class:`~smolora_mlflow.serving.routes.Routes` adds ``/stream`` (server-sent events),
``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` and ``/metrics``; every response is counted
by :class:`~smolora_mlflow.serving.metrics.MetricsMiddleware`. When the launcher looked up a manifest
digest (``SMOLORA_MANIFEST_SHA256``), the files about to load are checked against it first. With
``SMOLORA_SERVE_API_KEY`` set, :class:`~smolora_mlflow.serving.auth.ApiKeyAuth` sits outside the guard;
:class:`~smolora_mlflow.serving.openai_api.OpenAIErrors` gives every ``/v1/`` error OpenAI's shape.
"""

from __future__ import annotations

import os

from mlflow.pyfunc import scoring_server

from smolora_mlflow.constants import ENV_SERVED_MODEL_NAME
from smolora_mlflow.serving.auth import api_key_from_env, protect
from smolora_mlflow.serving.guard import RequestGuard
from smolora_mlflow.serving.metrics import Metrics, MetricsMiddleware
from smolora_mlflow.serving.openai_api import OpenAIErrors
from smolora_mlflow.serving.routes import Routes

GUARDED_PATHS = ("/invocations", "/stream", "/v1/completions", "/v1/chat/completions")


def build_app(model_path: str):
    api_key = api_key_from_env()  # read (and checked) before the model loads: a bad key fails at once
    # The flavor's loader checks the files against the digest `smolora serve` looked up (SMOLORA_MANIFEST_SHA256).
    model = scoring_server.load_model_with_mlflow_config(model_path)
    mlflow_app = scoring_server.init(model)
    wrapper = getattr(model, "_model_impl", None)
    if not hasattr(wrapper, "open_stream"):  # not a smolora model: MLflow's app, guarded, as before
        return protect(RequestGuard(mlflow_app), api_key)
    metrics = Metrics()
    wrapper.observer = metrics
    # Request threads: every request that may wait for the scheduler at once, plus some for quick work.
    threads = max(64, 2 * wrapper.scheduler.max_batch_size)
    routes = Routes(mlflow_app, wrapper, metrics, os.environ.get(ENV_SERVED_MODEL_NAME) or "default", threads)
    # Outside in: count every answer, OpenAI's error shape on /v1/, the key, then the input checks.
    return MetricsMiddleware(OpenAIErrors(protect(RequestGuard(routes, paths=GUARDED_PATHS), api_key)), metrics)


app = build_app(os.environ[scoring_server._SERVER_MODEL_PATH])
