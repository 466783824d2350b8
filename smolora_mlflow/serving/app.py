"""The ASGI app ``smolora serve`` runs: ``uvicorn smolora_mlflow.serving.app:app``.

Built the way MLflow's ``mlflow.pyfunc.scoring_server.app`` builds its own (the model path in
``__pyfunc_model_path__``, load-time settings in ``SERVING_MODEL_CONFIG``), so ``/invocations``,
``/ping``, ``/health`` and ``/version`` answer as ``mlflow models serve``'s do, with
:class:`~smolora_mlflow.serving.guard.RequestGuard` in front. When the launcher looked up a manifest
digest (``SMOLORA_MANIFEST_SHA256``), the files about to load are checked against it first.
"""

from __future__ import annotations

import os

from mlflow.pyfunc import scoring_server

from smolora_mlflow.models import manifest
from smolora_mlflow.serving.guard import RequestGuard


def build_app(model_path: str):
    conf = (manifest.read_mlmodel(model_path).get("flavors") or {}).get("smolora")
    if conf:
        manifest.check_environment(conf)
    model = scoring_server.load_model_with_mlflow_config(model_path)
    return RequestGuard(scoring_server.init(model))


app = build_app(os.environ[scoring_server._SERVER_MODEL_PATH])
