"""``smolora serve``: MLflow's own scoring server behind a guard that answers bad requests with a 4xx.

- :mod:`.launcher`: resolves the model URI (pinning aliases and stages to a version), checks its
  manifest against the digest on record, then runs uvicorn on :mod:`.app` (``python -m
  smolora_mlflow.serving MODEL_URI --host H --port P``).
- :mod:`.app`: the ASGI app: MLflow's ``scoring_server.init(model)`` (``/invocations``, ``/ping``,
  ``/health``, ``/version`` exactly as ``mlflow models serve``) wrapped in :class:`.guard.RequestGuard`.
- :mod:`.guard`, :mod:`.payload`: content type, body size, JSON depth and prompt JSON types.
"""
