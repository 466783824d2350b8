"""Where a training run meets MLflow's fluent, process-wide run state: the system metrics monitor's switch and
sampling interval when a run starts, and popping the active run when the server cannot be told it ended.

MLflow is imported inside the functions, like everywhere in :mod:`smolora_mlflow.tracking`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from smolora_mlflow.config import SmoloraConfig


def system_metrics_option(cfg: SmoloraConfig) -> bool | None:
    """``log_system_metrics`` for ``mlflow.start_run``: True with ``cfg.system_metrics`` (at its sampling
    interval), else None, so MLflow's own ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` still decides.

    MLflow's monitor samples CPU and memory (psutil), disk and network, and GPU utilisation and memory where
    pynvml (NVIDIA) or pyrsmi (AMD) is installed, as ``system/...`` metrics of the run.
    """
    return True if cfg.system_metrics else None


@contextlib.contextmanager
def sampling_interval(cfg: SmoloraConfig) -> Iterator[None]:
    """``cfg.system_metrics_interval`` for the monitor of the run started inside, and for no other run: MLflow's
    setting is a process-wide environment variable, which a notebook's or a sweep's next run would inherit."""
    name = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
    before = os.environ.get(name)
    if cfg.system_metrics:
        os.environ[name] = str(cfg.system_metrics_interval)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def forget_active_run() -> None:
    """Pop the fluent active run without telling the server (which is unreachable), and stop its system
    metrics monitor, which ``end_run`` would have stopped (it would sample into the dead run until exit)."""
    import mlflow
    from mlflow.tracking import fluent

    try:
        run = fluent._active_run_stack.get().pop()
    except (AttributeError, IndexError):  # another MLflow layout: fall back to the public call
        with contextlib.suppress(Exception):
            mlflow.end_run()
        return
    monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run.info.run_id, None)
    stop = getattr(monitor, "_shutdown_event", None)  # not finish(): it joins, then flushes to the dead server
    if stop is not None:
        stop.set()
