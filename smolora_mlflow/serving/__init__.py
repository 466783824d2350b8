"""``smolora serve``: MLflow's own scoring server behind a guard that answers bad requests with a 4xx.

- :mod:`.launcher`: resolves the model URI (pinning aliases and stages to a version), checks its
  manifest against the digest on record, then runs uvicorn on :mod:`.app` (``python -m
  smolora_mlflow.serving MODEL_URI --host H --port P``).
- :mod:`.app`: the ASGI app: MLflow's ``scoring_server.init(model)`` (``/invocations``, ``/ping``,
  ``/health``, ``/version`` exactly as ``mlflow models serve``) wrapped in :class:`.guard.RequestGuard`.
- :mod:`.guard`, :mod:`.payload`: the one input check of every route that reads a body: content type,
  body size, JSON depth, strict JSON, lone surrogates and prompt JSON types.
- :mod:`.auth`: ``--api_key`` / ``SMOLORA_SERVE_API_KEY``, a bearer token on every route but the probes.
- :mod:`.openai_api`: the OpenAI wire format, and OpenAI's error shape for every error under ``/v1/``.
"""
