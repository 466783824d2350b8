"""What a training run records in MLflow, and how.

One run per training: readable flat params (nothing dropped), lineage tags, dataset inputs,
trainable-parameter counts, per-step metrics sent in asynchronous batches, sample generations, the
adapter, a model card and a loss curve. The run attaches to whatever run is already there (``mlflow run``
sets ``MLFLOW_RUN_ID``; a resume brings the checkpoint's run id) and never rewrites a param it holds. A run
that raises ends FAILED (KILLED on Ctrl-C) with the reason recorded. Only the main process logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig, redact

logger = logging.getLogger(__name__)

_ENV_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def make_tracker(cfg: SmoloraConfig, data, base_info: dict, *, device: str):
    """A :class:`RunTracker`, or a :class:`NullTracker` when tracking is off or this is not the main process."""
    if not cfg.tracking or not is_main_process():
        return NullTracker()
    return RunTracker(cfg, data, base_info, device=device)


class NullTracker:
    """Does nothing, with the tracker's interface."""

    run_id = None

    @contextlib.contextmanager
    def run(self, resume_run_id: str | None = None) -> Iterator[str | None]:
        yield None

    def callbacks(self) -> list:
        return []

    def attach(self, trainer) -> None:
        pass

    def log_model_stats(self, model) -> None:
        pass

    def log_final_eval(self, metrics, step, model, tokenizer) -> None:
        pass

    def log_adapter(self, adapter_dir, metrics) -> None:
        pass


class RunTracker:
    """Owns one MLflow run for one training."""

    def __init__(self, cfg: SmoloraConfig, data, base_info: dict, *, device: str):
        self.cfg = cfg
        self.data = data
        self.base_info = base_info
        self.device = device
        self.run_id: str | None = None
        self.buffer = None
        self.client = None
        self._tokenizer = None
        self._checkpoint_dir_noted = False
        self.last_eval_step: int | None = None

    # --- lifecycle ---
    @contextlib.contextmanager
    def run(self, resume_run_id: str | None = None) -> Iterator[str]:
        import mlflow

        from smolora_mlflow.tracking_callback import MetricBuffer

        if self.cfg.tracking_uri:
            mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self.client = mlflow.MlflowClient()
        run, owned = self._start_run(resume_run_id)
        self.run_id = run.info.run_id
        self.buffer = MetricBuffer(self.client, self.run_id, skip_through_step=self._last_logged_step())
        try:
            self._log_start(run)
            yield self.run_id
            self.buffer.flush()
        except BaseException as e:
            self._record_failure(e)
            if owned:
                mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if owned:
            mlflow.end_run("FINISHED")

    def _start_run(self, resume_run_id: str | None):
        import mlflow

        active = mlflow.active_run()
        if resume_run_id:
            if active and active.info.run_id == resume_run_id:
                return active, False
            return mlflow.start_run(run_id=resume_run_id, nested=active is not None), True
        if active is not None:  # e.g. the parent run of a workflow: the training is its child
            return mlflow.start_run(run_name=self._run_name(), nested=True), True
        if not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            mlflow.set_experiment(self.cfg.experiment_name)
        return mlflow.start_run(run_name=self._run_name()), True

    def _run_name(self) -> str:
        cfg = self.cfg
        if cfg.run_name:
            return cfg.run_name
        base = Path(cfg.base_model.rstrip("/")).name.replace("smolora:", "")
        return f"{base}-r{cfg.lora_r}-lr{cfg.learning_rate:g}"

    def _last_logged_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, C.METRIC_LOSS)
        return max((m.step for m in history), default=-1)

    def _record_failure(self, e: BaseException) -> None:
        with contextlib.suppress(Exception):
            self.buffer.flush()
        reason = "interrupted (KeyboardInterrupt)" if isinstance(e, KeyboardInterrupt) else (
            f"{type(e).__name__}: {e}")
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, "smolora.error", reason[:5000])
            note = self.client.get_run(self.run_id).data.tags.get(C.TAG_NOTE, "")
            self.client.set_tag(self.run_id, C.TAG_NOTE, f"{note}\n\n**Failed**: {reason[:2000]}".strip())

    # --- start of run ---
    def _log_start(self, run) -> None:
        from smolora_mlflow.run_record import dataset_inputs, flat_params, lineage_tags

        existing = run.data.params
        params, long_values = flat_params(self.cfg, self.data)
        self._log_params(params, long_values, existing)
        tags = {**lineage_tags(self.cfg, self.data, self.base_info, self.device), **self.cfg.run_tags}
        if C.TAG_GIT_COMMIT in run.data.tags:
            tags.pop(C.TAG_GIT_COMMIT, None)
        if C.TAG_NOTE not in run.data.tags:
            tags[C.TAG_NOTE] = self._description()
        self._log_batch(tags=tags)
        if not run.data.tags.get("smolora.started"):
            import mlflow

            for ds, context in dataset_inputs(self.data):
                mlflow.log_input(ds, context=context)
            self.client.log_text(self.run_id, self.cfg.to_yaml(), C.ARTIFACT_CONFIG)
            self._log_batch(tags={"smolora.started": "true"})

    def _log_params(self, params: dict[str, str], long_values: dict[str, str], existing: dict[str, str]):
        fresh = {}
        for key, value in params.items():
            if key not in existing:
                fresh[key] = value
            elif not _same_param(existing[key], value):
                # `mlflow run -P` logged this key already with the user's spelling; keep theirs and
                # record ours beside it instead of failing the whole batch.
                logger.info("param %s already %r on the run; resolved value %r logged as resolved.%s",
                            key, existing[key], value, key)
                if f"resolved.{key}" not in existing:
                    fresh[f"resolved.{key}"] = value
        self._log_batch(params=fresh)
        for key, value in long_values.items():
            self.client.log_text(self.run_id, value, f"params/{key}.txt")

    def _log_batch(self, params: dict | None = None, tags: dict | None = None) -> None:
        from mlflow.entities import Param, RunTag

        p = [Param(k, str(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(t)), 100):
            self.client.log_batch(self.run_id, params=p[i : i + 100], tags=t[i : i + 100])

    def _description(self) -> str:
        cfg, data = self.cfg, self.data
        steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epoch(s)"
        return (
            f"LoRA fine-tune of `{cfg.base_model}` on `{data.name}` ({data.num_train} train / {data.num_eval} "
            f"eval rows, {data.format} format): r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, "
            f"targets={','.join(cfg.lora_target_modules)}, lr={cfg.learning_rate:g}, {steps}, "
            f"batch {cfg.per_device_train_batch_size}x{cfg.gradient_accumulation_steps}, seed {cfg.seed}."
        )

    # --- during training ---
    def callbacks(self) -> list:
        from smolora_mlflow.tracking_callback import MlflowTrainingCallback

        return [MlflowTrainingCallback(self)]

    def attach(self, trainer) -> None:
        self._tokenizer = trainer.processing_class

    def log_model_stats(self, model) -> None:
        trainable, total = model.get_nb_trainable_parameters()
        stats = {C.METRIC_TRAINABLE_PARAMS: trainable, C.METRIC_TOTAL_PARAMS: total,
                 C.METRIC_TRAINABLE_PERCENT: round(100.0 * trainable / total, 4)}
        existing = self.client.get_run(self.run_id).data.params
        self._log_params({k: str(v) for k, v in stats.items()}, {}, existing)
        self.buffer.add(stats, 0)

    def note_checkpoint_dir(self, output_dir: str) -> None:
        if not self._checkpoint_dir_noted:
            self.client.set_tag(self.run_id, C.TAG_CHECKPOINT_DIR, str(Path(output_dir).resolve()))
            self._checkpoint_dir_noted = True

    def log_generations(self, model, tokenizer, step: int) -> None:
        """Generate on the fixed sample prompts and append the rows (with `step`) to the run's table."""
        import pandas as pd

        from smolora_mlflow.generation import generate

        self.last_eval_step = step
        tokenizer = tokenizer or self._tokenizer
        prompts = self.cfg.sample_prompts
        if not prompts or tokenizer is None:
            return
        was_training = model.training
        model.eval()
        try:
            outputs = generate(model, tokenizer, prompts, max_new_tokens=self.cfg.sample_max_new_tokens)
        finally:
            model.train(was_training)
        table = pd.DataFrame({"step": [step] * len(prompts), "prompt": prompts, "generated_text": outputs})
        import mlflow

        mlflow.log_table(table, artifact_file=C.ARTIFACT_GENERATIONS, run_id=self.run_id)

    def log_final_eval(self, metrics: dict[str, float], step: int, model, tokenizer) -> None:
        if step == self.last_eval_step:  # the periodic evaluation already covered the last step
            return
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_runtime"}
        self.buffer.add(evals, step)
        self.log_generations(model, tokenizer, step)

    # --- end of run ---
    def log_adapter(self, adapter_dir: Path, metrics: dict[str, float]) -> None:
        from smolora_mlflow.run_record import loss_curve_png, model_card

        self.buffer.flush()
        size = sum(f.stat().st_size for f in Path(adapter_dir).glob("adapter_model*.safetensors"))
        self.client.log_artifacts(self.run_id, str(adapter_dir), C.ARTIFACT_ADAPTER)
        self.client.log_metric(self.run_id, C.METRIC_ADAPTER_SIZE, size)
        self.client.set_tag(self.run_id, C.TAG_ADAPTER_SIZE, str(size))
        card = model_card(self.cfg, self.data, self.base_info, metrics, self.run_id, size)
        self.client.log_text(self.run_id, card, C.ARTIFACT_MODEL_CARD)
        png = loss_curve_png(self.buffer.history, title=self._run_name())
        if png is not None:
            self.client.log_image(self.run_id, png, C.ARTIFACT_LOSS_CURVE)


def _same_param(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def git_commit(path: str | os.PathLike = ".") -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def checkpoint_dir_of_run(run_id: str) -> str | None:
    """The folder a run wrote its checkpoints to, as recorded in its tags."""
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).data.tags.get(C.TAG_CHECKPOINT_DIR)


def secret_env_present() -> list[str]:
    return [name for name in _ENV_SECRETS if os.environ.get(name)]


__all__ = ["NullTracker", "RunTracker", "checkpoint_dir_of_run", "make_tracker", "redact"]
