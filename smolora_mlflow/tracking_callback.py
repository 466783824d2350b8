"""The Trainer callback that streams per-step metrics to MLflow in batches, without blocking training.

Metrics are buffered and sent with ``MlflowClient.log_batch(..., synchronous=False)`` every few steps;
`flush()` waits for everything sent so far. On resume, steps the run already holds are skipped, so a
resumed run's history continues without duplicate steps.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from transformers import TrainerCallback

from smolora_mlflow import constants as C

logger = logging.getLogger(__name__)

# Trainer log keys and the metric names we give them.
_STEP_KEYS = {"loss": C.METRIC_LOSS, "learning_rate": "learning_rate", "grad_norm": "grad_norm",
              "epoch": "epoch", "mean_token_accuracy": "mean_token_accuracy", "entropy": "entropy"}
_FINAL_KEYS = {"train_loss": C.METRIC_TRAIN_LOSS, "train_runtime": "train_runtime",
               "train_samples_per_second": "train_samples_per_second",
               "train_steps_per_second": "train_steps_per_second"}


class MetricBuffer:
    """Collects metric points and ships them to one run in asynchronous batches."""

    def __init__(self, client, run_id: str, *, max_points: int = 200, max_seconds: float = 5.0,
                 skip_through_step: int = -1):
        self.client = client
        self.run_id = run_id
        self.max_points = max_points
        self.max_seconds = max_seconds
        self.skip_through_step = skip_through_step
        self._points: list[Any] = []
        self._last_send = time.monotonic()
        self._pending: list[Any] = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.lost_points = 0

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.skip_through_step:
            return
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            self._points.append(Metric(key, float(value), ts, step))
            self.history.setdefault(key, []).append((step, float(value)))
        if len(self._points) >= self.max_points or time.monotonic() - self._last_send > self.max_seconds:
            self.send()

    def send(self) -> None:
        if not self._points:
            return
        points, self._points = self._points, []
        self._last_send = time.monotonic()
        for i in range(0, len(points), 1000):  # MLflow caps one batch at 1000 metrics
            chunk = points[i : i + 1000]
            try:
                self._pending.append((self.client.log_batch(self.run_id, metrics=chunk, synchronous=False),
                                      len(chunk)))
            except Exception as e:  # a tracking outage must not kill training
                self.lost_points += len(chunk)
                logger.warning("Could not queue %d metric points for MLflow: %s", len(chunk), e)

    def flush(self) -> None:
        """Send what is buffered and wait for every batch sent so far."""
        self.send()
        pending, self._pending = self._pending, []
        for op, n in pending:
            try:
                op.wait()
            except Exception as e:
                self.lost_points += n
                logger.warning("MLflow did not accept %d metric points: %s", n, e)
        if self.lost_points:
            logger.warning("%d metric points could not be logged to MLflow run %s.", self.lost_points,
                           self.run_id)


class MlflowTrainingCallback(TrainerCallback):
    """Per-step metrics (loss, lr, grad norm, epoch, throughput, memory), evals and sample generations."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.buffer: MetricBuffer = tracker.buffer
        self._t0 = None
        self._last_time = None
        self._last_tokens = 0
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen or 0
        self._last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        metrics = {name: logs[key] for key, name in _STEP_KEYS.items() if key in logs}
        if "loss" in logs:
            metrics.update(self._throughput(args, state))
            metrics.update(_memory_metrics())
        for key, value in logs.items():
            if key.startswith("eval_") and key not in ("eval_runtime",):
                metrics[key] = value
        if "eval_loss" in logs:
            metrics[C.METRIC_EVAL_PERPLEXITY] = math.exp(min(float(logs["eval_loss"]), 50.0))
        final = {name: logs[key] for key, name in _FINAL_KEYS.items() if key in logs}
        metrics.update(final)
        self.buffer.add(metrics, step)

    def _throughput(self, args, state) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps = state.global_step - self._last_step
        tokens = (state.num_input_tokens_seen or 0) - self._last_tokens
        samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self._last_time, self._last_step = now, state.global_step
        self._last_tokens = state.num_input_tokens_seen or 0
        out = {"samples_per_second": samples / elapsed}
        if tokens > 0:
            out["tokens_per_second"] = tokens / elapsed
        return out

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.tracker.log_generations(model, kwargs.get("processing_class"), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.tracker.note_checkpoint_dir(args.output_dir)


def _memory_metrics() -> dict[str, float]:
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
