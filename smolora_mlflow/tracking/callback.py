"""The Trainer callback that streams per-step metrics to MLflow in batches, without blocking training.

Metrics are buffered and sent with ``MlflowClient.log_batch`` from the run's outbox thread every few
steps (or seconds); `flush()` waits, for a bounded time, for everything sent so far. On resume, steps
the run already holds are skipped, so a resumed run's history continues without duplicate steps.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time

from transformers import TrainerCallback

from smolora_mlflow import constants as C
from smolora_mlflow.evaluation import perplexity, whole_run_train_loss
from smolora_mlflow.tracking.outbox import Op, Outbox, retry_seconds

try:
    import resource
except ImportError:  # Windows: no getrusage, so no peak-RSS metric
    resource = None

logger = logging.getLogger(__name__)

# Trainer log keys and the metric names we give them. Step keys are read from training-step logs only:
# transformers repeats `epoch` in every eval log and the final summary, which would log a step twice.
# Every point is a row the store writes and the UI reads, so nothing derivable is logged:
# transformers' cumulative `num_input_tokens_seen` is left out (tokens/s carries it).
_STEP_KEYS = {"loss": C.METRIC_LOSS, "learning_rate": "learning_rate", "grad_norm": "grad_norm",
              "epoch": "epoch", "mean_token_accuracy": "mean_token_accuracy", "entropy": "entropy"}
# The end-of-training summary (the only log holding `train_loss`). Its `train_runtime` also appears in
# every step log (transformers' speed metrics), so it is read from the summary alone.
_FINAL_KEYS = {"train_loss": C.METRIC_TRAIN_LOSS, "train_runtime": "train_runtime",
               "train_samples_per_second": "train_samples_per_second",
               "train_steps_per_second": "train_steps_per_second"}
_EVAL_SKIP = {"eval_runtime"}
# What DPO, KTO and GRPO add to a training-step log (TRL's names), forwarded as they are: rewards/chosen,
# rewards/<function>/mean, logps/rejected, completions/mean_length, clip_ratio/low_mean, kl, ...
_METHOD_PREFIXES = ("rewards/", "logps/", "logits/", "completions/", "clip_ratio/", "sampling/")
_METHOD_KEYS = {"kl", "reward", "reward_std", "frac_reward_zero_std", "policy_loss", "aux_loss", "cispo_clip_ratio"}
_MAX_BATCH = 1000  # MLflow caps one log_batch at 1000 metrics
CHECKPOINT_SYNC_SECONDS = 30.0


class MetricBuffer:
    """Collects metric points and hands them, in batches, to the run's :class:`Outbox`.

    The outbox's one background thread calls the ordinary ``log_batch`` (not MLflow's
    ``synchronous=False`` queue, which polls on a timer, so ending a run that used it waits for the next
    poll), keeps batches in order and retries them through a tracking outage.

    Args:
        client: an ``MlflowClient``.
        run_id: the run to log to.
        max_points: send once this many points are buffered (a store spends less per point in big
            batches than one step at a time)...
        max_seconds: ...or once this long has passed since the last send, so the UI stays current.
        skip_through_step: points at or before this step are dropped (a resumed run already has them).
        outbox: where batches go; a new one for ``run_id`` by default.
    """

    def __init__(self, client, run_id: str, *, max_points: int = _MAX_BATCH, max_seconds: float = 5.0,
                 skip_through_step: int = -1, outbox: Outbox | None = None):
        self.run_id = run_id
        self.max_points = max_points
        self.max_seconds = max_seconds
        self.skip_through_step = skip_through_step
        self.outbox = outbox or Outbox(client, run_id)
        self._points: list[tuple[str, float, int, int]] = []
        self._last_send = time.monotonic()
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.lost_points = 0

    def add(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.skip_through_step:
            return
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            self._points.append((key, value, ts, step))
            self.history.setdefault(key, []).append((step, value))
        if len(self._points) >= self.max_points or time.monotonic() - self._last_send > self.max_seconds:
            self.send()

    def send(self) -> None:
        """Hand what is buffered to the outbox; returns without waiting."""
        if not self._points:
            return
        points, self._points = self._points, []
        self._last_send = time.monotonic()
        for i in range(0, len(points), _MAX_BATCH):
            self.outbox.put(Op("metrics", {"metrics": points[i : i + _MAX_BATCH]}))

    def flush(self, timeout: float | None = None) -> list[Op]:
        """Send what is buffered and wait (at most ``timeout``, default :func:`retry_seconds`) for every
        write queued so far; returns the writes MLflow did not take in time (they are no longer retried)."""
        self.send()
        unsent = self.outbox.drain(retry_seconds() if timeout is None else timeout)
        lost = sum(op.points for op in unsent)
        self.lost_points += lost
        if unsent:
            logger.warning("%d MLflow write(s) (%d metric points) for run %s were not accepted in time.",
                           len(unsent), lost, self.run_id)
        return unsent

    def sync(self, timeout: float) -> bool:
        """Send what is buffered and wait up to ``timeout`` for it to be delivered (nothing is dropped)."""
        self.send()
        return self.outbox.wait(timeout)

    def close(self, timeout: float | None = None) -> list[Op]:
        """Flush, then stop the background thread; returns the unsent writes."""
        try:
            return self.flush(timeout)
        finally:
            self.outbox.close()


class MlflowTrainingCallback(TrainerCallback):
    """Per-step metrics (loss, lr, grad norm, epoch, throughput, memory), evals and sample generations.

    Throughput counts training time only: the time spent evaluating or checkpointing between two
    steps is left out, so tokens/s after an evaluation is comparable with tokens/s before it.
    """

    def __init__(self, tracker):
        self.tracker = tracker
        self.buffer: MetricBuffer = tracker.buffer
        self._seg_start = 0.0  # start of the current stretch of training time
        self._active = 0.0  # training seconds since the last logged step, before the current stretch
        self._last_step_end = 0.0
        self._paused = False  # an evaluation or a save ran since the last step
        self._last_tokens = 0
        self._last_step = 0
        self._session_start = 0  # the step this train() call started from

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.tracker.training_started(model, kwargs.get("processing_class"))
        self._seg_start = self._last_step_end = time.perf_counter()
        self._active = 0.0
        self._paused = False
        self._last_tokens = state.num_input_tokens_seen or 0
        self._last_step = self._session_start = state.global_step  # a resume starts at its checkpoint

    def on_step_begin(self, args, state, control, **kwargs):
        if self._paused:
            now = time.perf_counter()
            self._active += max(self._last_step_end - self._seg_start, 0.0)
            self._seg_start = now
            self._paused = False

    def on_step_end(self, args, state, control, **kwargs):
        self._last_step_end = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics: dict[str, float] = {}
        if "loss" in logs:
            metrics.update((name, logs[key]) for key, name in _STEP_KEYS.items() if key in logs)
            metrics.update((metric_name(k), v) for k, v in logs.items()
                           if (k in _METHOD_KEYS or k.startswith(_METHOD_PREFIXES)) and isinstance(v, (int, float)))
            metrics.update(self._throughput(args, state))
            metrics.update(_memory_metrics())
        if "eval_loss" in logs:
            metrics.update((metric_name(k), v) for k, v in logs.items()
                           if k.startswith("eval_") and k not in _EVAL_SKIP and isinstance(v, (int, float)))
            if self.tracker.cfg.method == "sft":  # other objectives' losses are no NLL
                metrics[C.METRIC_EVAL_PERPLEXITY] = perplexity(logs["eval_loss"])
        if "train_loss" in logs:
            metrics.update((name, logs[key]) for key, name in _FINAL_KEYS.items() if key in logs)
            # transformers averages this train() call's steps only; a resumed run's covers all its steps
            metrics[C.METRIC_TRAIN_LOSS] = whole_run_train_loss(state.log_history, state.global_step,
                                                                self._session_start, logs["train_loss"])
        if metrics:
            self.buffer.add(metrics, state.global_step)

    def _throughput(self, args, state) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(self._active + (now - self._seg_start), 1e-9)
        steps = state.global_step - self._last_step
        tokens = (state.num_input_tokens_seen or 0) - self._last_tokens
        samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self._seg_start, self._active = now, 0.0
        self._last_step, self._last_tokens = state.global_step, state.num_input_tokens_seen or 0
        out = {"samples_per_second": samples / elapsed}
        if tokens > 0:
            out["tokens_per_second"] = tokens / elapsed
        return out

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        self._paused = True
        if state.is_world_process_zero and model is not None:
            self.tracker.log_generations(model, kwargs.get("processing_class"), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self._paused = True
        if state.is_world_process_zero:
            self.tracker.note_checkpoint_dir(args.output_dir)
            # Deliver every step up to this checkpoint before it is marked complete: a process killed
            # later resumes here, and its run must already hold these steps (bounded during an outage).
            if not self.buffer.sync(timeout=CHECKPOINT_SYNC_SECONDS):
                logger.warning("MLflow has not yet taken the metrics up to checkpoint %d; still retrying.",
                               state.global_step)


_ILLEGAL = re.compile(r"[^\w\-. /]")


def metric_name(key: str) -> str:
    """``key`` as a name MLflow accepts on every platform: alphanumerics, ``_ - . /`` and spaces (a reward
    function's name is the user's, and may hold anything); no empty or leading-slash path parts."""
    name = _ILLEGAL.sub("_", key).strip("/")
    return re.sub(r"/+", "/", name).replace("/./", "/_/") or "_"


def _memory_metrics() -> dict[str, float]:
    """Peak memory so far: the process's peak RSS and, on CUDA, peak allocated GPU memory."""
    import torch

    out = {}
    if resource is not None:
        unit = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss is bytes on macOS, KiB on Linux
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
