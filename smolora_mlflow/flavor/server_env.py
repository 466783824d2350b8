"""What the flavor knows about the process it is served in: MLflow's scoring server, and the log it shows."""

from __future__ import annotations

import logging
import os

from smolora_mlflow.errors import invalid_input

# Set by `mlflow models serve` in the uvicorn process that loads the model.
SCORING_SERVER_ENV = "__pyfunc_model_path__"

# The request threads of `mlflow models serve`. MLflow's scoring server runs each request's `predict` through
# `asyncio.to_thread`, i.e. in the event loop's default executor of `min(32, cpus + 4)` threads (6 on a 2-core
# machine), and offers no setting for it. The public way to widen it is `loop.set_default_executor`, which needs
# the running loop; a model is loaded before that loop exists and `predict` runs in a worker thread that has
# none, and MLflow gives a model no startup hook. So no public mechanism reaches it from the flavor: `smolora
# serve` (serving.routes.Routes) sets a wide default executor on its own loop, and under plain `mlflow models
# serve` a 7th concurrent request waits for a thread, then joins the running batch at the next token (the
# scheduler admits requests between tokens, so nobody waits for a whole batch). Earlier versions raised the
# executor's private `_max_workers` through CPython's thread internals; that is gone.


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_to_stderr_if_asked() -> None:
    """``SMOLORA_LOG_LEVEL=DEBUG|INFO|...``: show this package's log in a scoring server's output."""
    level = os.environ.get("SMOLORA_LOG_LEVEL", "").strip().upper()
    if not level:
        return
    if level not in _LOG_LEVELS:
        raise invalid_input(
            f"SMOLORA_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {level!r}; fix or unset it.")
    package_logger = logging.getLogger("smolora_mlflow")
    if not any(getattr(h, "smolora_stderr", False) for h in package_logger.handlers):
        handler = logging.StreamHandler()
        handler.smolora_stderr = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(level)
