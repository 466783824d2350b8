"""What a training run records in MLflow, and how.

One run per training: readable flat params (nothing dropped), lineage tags, dataset inputs,
trainable-parameter counts, per-step metrics sent in asynchronous batches, sample generations, the
adapter, a model card and a loss curve. The run attaches to whatever run is already there (``mlflow run``
sets ``MLFLOW_RUN_ID``; a resume brings the checkpoint's run id) and never rewrites a param it holds. A run
that raises ends FAILED (KILLED on Ctrl-C) with the reason recorded. Only the main process logs.

Training talks to one tracker object: ``run`` (start or attach, end FINISHED/FAILED), ``callbacks`` (the
Trainer callback that logs parameter counts, per-step metrics, evaluations and samples) and ``finish``.

Example:
    >>> tracker = make_tracker(cfg, data, base_info, device="cpu")  # doctest: +SKIP
    >>> with tracker.run() as run_id:                                 # doctest: +SKIP
    ...     trainer = build_trainer(callbacks=tracker.callbacks())
    ...     metrics = trainer.train().metrics
    ...     tracker.finish(trainer, adapter_dir, metrics)
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

from smolora_mlflow import constants as C
from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.constants import ARTIFACT_ERROR, TAG_ERROR
from smolora_mlflow.redaction import redact
from smolora_mlflow.tracking.experiments import experiment_id_for, mark_experiment
from smolora_mlflow.tracking.fluent_run import forget_active_run, sampling_interval, system_metrics_option
from smolora_mlflow.tracking.null_tracker import NullTracker
from smolora_mlflow.tracking.record import run_description, same_param

logger = logging.getLogger(__name__)

_BATCH = 100  # MLflow accepts at most 100 params and 100 tags in one log_batch


def is_main_process() -> bool:
    """Whether this process logs: rank 0 of a distributed launch (RANK, else LOCAL_RANK), or a lone process."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def make_tracker(cfg: SmoloraConfig, data, base_info: dict, *, device: str):
    """A :class:`RunTracker`, or a :class:`NullTracker` when tracking is off or this is not the main process."""
    if not cfg.tracking or not is_main_process():
        return NullTracker()
    return RunTracker(cfg, data, base_info, device=device)


class RunTracker:
    """Owns one MLflow run for one training."""

    def __init__(self, cfg: SmoloraConfig, data, base_info: dict, *, device: str):
        self.cfg = cfg
        self.data = data
        self.base_info = base_info
        self.device = device
        self.run_id: str | None = None
        self.run_name: str | None = None
        self.buffer = None
        self.client = None
        self.last_eval_step: int | None = None
        self._tokenizer = None
        self._checkpoint_dir_noted = False
        self._loss_history: list[tuple[int, float]] = []
        self._params: dict[str, str] = {}  # what the run holds, so no param is ever sent twice
        self._param_prefix = "resolved."  # where a value that differs from the run's own goes
        self.prompt_format = "plain"  # what `cfg.prompt_format` resolved to for this tokenizer (set by training)
        self.prompt_format_reason = ""  # and why

    # --- lifecycle ---
    @contextlib.contextmanager
    def run(self, resume_run_id: str | None = None) -> Iterator[str]:
        """Start (or attach to) the run, yield its id, and end it FINISHED, FAILED or KILLED."""
        import mlflow

        from smolora_mlflow.tracking.callback import MetricBuffer

        if self.cfg.tracking_uri:
            mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self.client = mlflow.MlflowClient()
        run, owned, existed = self._start_run(resume_run_id)
        self.run_id, self.run_name = run.info.run_id, run.info.run_name
        try:
            last_step = self._last_logged_step() if existed else -1
            if resume_run_id and last_step >= 0:
                self._param_prefix = f"resumed_at_step_{last_step}."
            self.buffer = MetricBuffer(self.client, self.run_id, skip_through_step=last_step)
            if last_step >= 0:
                self._seed_history()
            self._log_start(run)
            yield self.run_id
        except BaseException as e:
            self._record_failure(e)
            if owned:
                mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self._finish(owned)

    def _finish(self, owned: bool) -> None:
        """Deliver the queued writes (bounded wait) and end the run; keep what MLflow did not take.

        Training has succeeded by now and its outputs are on disk, so an unreachable tracking server
        does not fail it: the unsent writes (and the final status) go to ``<output_dir>/mlflow_outbox.json``
        and ``smolora sync <output_dir>`` delivers them later.
        """
        import mlflow

        from smolora_mlflow.tracking.outbox import Op

        unsent = self.buffer.close()
        if not unsent:
            if owned:
                try:
                    mlflow.end_run("FINISHED")
                except Exception as e:
                    self._keep_unsent([Op("terminate", {"status": "FINISHED"})], e)
            return
        if owned:
            unsent.append(Op("terminate", {"status": "FINISHED"}))
            forget_active_run()  # ending it would be one more call to the unreachable server
        self._keep_unsent(unsent, None)

    def _keep_unsent(self, ops, error) -> None:
        import mlflow

        from smolora_mlflow.tracking.outbox import save_unsent

        path = save_unsent(self.cfg.output_dir, mlflow.get_tracking_uri(), self.run_id, ops)
        logger.warning(
            "MLflow at %s did not take %d write(s) for run %s%s; training finished and its outputs are in %s. "
            "They are saved in %s: when the server is back, run `smolora sync %s`.",
            mlflow.get_tracking_uri(), len(ops), self.run_id, f" ({error})" if error else "",
            self.cfg.output_dir, path, self.cfg.output_dir)

    def _start_run(self, resume_run_id: str | None):
        """(run, whether we end it, whether it existed before) for the run this training logs to."""
        with sampling_interval(self.cfg):  # MLflow's monitor reads it when the run starts
            return self._start_or_attach(resume_run_id)

    def _start_or_attach(self, resume_run_id: str | None):
        import mlflow

        active = mlflow.active_run()
        target = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
        if target and active is not None and active.info.run_id == target:
            return active, False, True
        system = system_metrics_option(self.cfg)
        if target:  # the checkpoint's run, or the one `mlflow run` made: keep its name unless one was given
            run = mlflow.start_run(run_id=target, run_name=self.cfg.run_name, nested=active is not None,
                                   log_system_metrics=system)
            mark_experiment(run.info.experiment_id, self.client)
            return run, True, True
        if active is not None:  # e.g. the parent run of a workflow: the training is its child
            run = mlflow.start_run(run_name=self._default_run_name(), nested=True,
                                   experiment_id=active.info.experiment_id, log_system_metrics=system)
            return run, True, False
        experiment_id = experiment_id_for(self.cfg.experiment_name, self.client)
        run = mlflow.start_run(run_name=self._default_run_name(), experiment_id=experiment_id,
                               log_system_metrics=system)
        return run, True, False

    def _default_run_name(self) -> str:
        cfg = self.cfg
        if cfg.run_name:
            return cfg.run_name
        base = Path(cfg.base_model.rstrip("/")).name.replace("smolora:", "")
        return f"{base}-r{cfg.lora_r}-lr{cfg.learning_rate:g}"

    def _last_logged_step(self) -> int:
        history = self.client.get_metric_history(self.run_id, C.METRIC_LOSS)
        self._loss_history = [(m.step, m.value) for m in history]
        return max((m.step for m in history), default=-1)

    def _seed_history(self) -> None:
        """A resumed run's loss curve starts at step 1, not at the resume point."""
        self.buffer.history[C.METRIC_LOSS] = list(self._loss_history)
        evals = self.client.get_metric_history(self.run_id, C.METRIC_EVAL_LOSS)
        if evals:
            self.buffer.history[C.METRIC_EVAL_LOSS] = [(m.step, m.value) for m in evals]

    def _record_failure(self, e: BaseException) -> None:
        """Keep what was logged, and say why the run stopped: a tag, the note, and the traceback."""
        if self.buffer is not None:
            with contextlib.suppress(Exception):
                self.buffer.close()
        reason = "interrupted (KeyboardInterrupt)" if isinstance(e, KeyboardInterrupt) else (
            f"{type(e).__name__}: {e}")
        with contextlib.suppress(Exception):
            note = self.client.get_run(self.run_id).data.tags.get(C.TAG_NOTE, "")
            self._log_batch(tags={TAG_ERROR: reason[:5000],
                                  C.TAG_NOTE: f"{note}\n\n**Failed**: {reason[:2000]}".strip()})
            self.client.log_text(self.run_id, "".join(traceback.format_exception(e)), ARTIFACT_ERROR)

    # --- start of run ---
    def _log_start(self, run) -> None:
        import mlflow

        from smolora_mlflow.tracking.record import config_yaml, dataset_inputs, flat_params, lineage_tags

        self._params = dict(run.data.params)
        params, long_values = flat_params(self.cfg, self.data)
        fresh = self._fresh_params(params)
        # `mlflow run` (and MLflow's own context) may have recorded the commit already: keep theirs.
        have_commit = C.TAG_GIT_COMMIT in run.data.tags
        tags = {**lineage_tags(self.cfg, self.data, self.base_info, self.device, with_git=not have_commit),
                **redact(self.cfg.run_tags)}
        if C.TAG_NOTE not in run.data.tags:
            tags[C.TAG_NOTE] = run_description(self.cfg, self.data)
        self._log_batch(params=fresh, tags=tags)
        for key in fresh:
            base = key.removeprefix(self._param_prefix)
            if base in long_values:
                self.client.log_text(self.run_id, long_values[base], f"params/{key}.txt")
        # Inputs are deduplicated by MLflow, so a resume on the same data adds nothing and new data shows.
        inputs = dataset_inputs(self.data)
        mlflow.log_inputs(datasets=[ds for ds, _ in inputs], contexts=[ctx for _, ctx in inputs],
                          tags_list=[None] * len(inputs))  # our run is the active one
        # The config this session trained with; a resume replaces it (what changed is in the params).
        self.client.log_text(self.run_id, config_yaml(self.cfg), C.ARTIFACT_CONFIG)

    def _fresh_params(self, params: dict[str, str]) -> dict[str, str]:
        """Params the run lacks. A key it holds with another value (an ``mlflow run -P`` spelling, or a
        setting changed on resume) keeps the run's value; ours goes under a prefixed key, because MLflow
        rejects a changed param and would drop the whole batch with it."""
        fresh = {}
        for key, value in params.items():
            have = self._params.get(key)
            if have is None:
                fresh[key] = value
            elif not same_param(have, value):
                alt = f"{self._param_prefix}{key}"
                logger.info("param %s is already %r on run %s; %r logged as %s.", key, have, self.run_id,
                            value, alt)
                if alt not in self._params:
                    fresh[alt] = value
        self._params.update(fresh)
        return fresh

    def _log_batch(self, params: dict | None = None, tags: dict | None = None) -> None:
        from mlflow.entities import Param, RunTag

        p = [Param(k, str(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(t)), _BATCH):
            self.client.log_batch(self.run_id, params=p[i : i + _BATCH], tags=t[i : i + _BATCH])

    # --- during training ---
    def log_upstream_configs(self, lora_config, trainer_args) -> None:
        """The complete resolved ``LoraConfig`` and TRL config, as JSON artifacts (every field, defaults too)."""
        from smolora_mlflow.tracking.record import upstream_config_json

        self._put("text", text=upstream_config_json(lora_config), artifact_file=C.ARTIFACT_LORA_CONFIG)
        self._put("text", text=upstream_config_json(trainer_args), artifact_file=C.ARTIFACT_TRAINER_CONFIG)

    def log_table_rows(self, rows: list[dict], artifact_file: str) -> None:
        """Append rows (each with a ``step``) to one of the run's ``log_table`` tables."""
        if rows:
            self._put("table", rows=rows, artifact_file=artifact_file)

    def callbacks(self) -> list:
        from smolora_mlflow.tracking.callback import MlflowTrainingCallback

        return [MlflowTrainingCallback(self)]

    def reachable(self) -> bool:
        """Whether the tracking server is taking writes (the outbox's last attempt did not fail)."""
        return self.buffer is None or not self.buffer.outbox.stalled

    def training_started(self, model, tokenizer) -> None:
        """Called by the callback when training starts: the parameter counts, and the tokenizer for samples."""
        self._tokenizer = tokenizer
        self.log_model_stats(model)
        self.log_prompt_format(tokenizer)

    def log_training_setup(self, trainer) -> None:
        """How the trainer will run the model: the attention implementation and TRL's padding-free mode
        (packing with ``bfd`` flattens a batch into one row), which decide training speed on a GPU."""
        config = trainer.model.config  # a PeftModel answers with its base model's
        # TRL 1.16's KTOTrainer and GRPOTrainer have no padding-free mode (nor the attribute).
        padding_free = bool(getattr(trainer, "padding_free", False))
        self._put("tags", tags={C.TAG_ATTN_IMPLEMENTATION: str(config._attn_implementation),
                                C.TAG_PADDING_FREE: str(padding_free).lower()})

    def log_prompt_format(self, tokenizer) -> None:
        """Which prompt format training used and, for chat, the template itself (tag with its sha256)."""
        from smolora_mlflow.tracking.record import prompt_tags

        tags = prompt_tags(self.prompt_format, tokenizer, self.prompt_format_reason)
        self._put("tags", tags=tags)
        if C.TAG_CHAT_TEMPLATE_SHA256 in tags:
            self._put("text", text=tokenizer.chat_template, artifact_file=C.ARTIFACT_CHAT_TEMPLATE)

    def log_model_stats(self, model) -> None:
        """Trainable and total parameter counts (PEFT's own count) as params and as metrics at step 0."""
        trainable, total = model.get_nb_trainable_parameters()
        stats = {C.METRIC_TRAINABLE_PARAMS: trainable, C.METRIC_TOTAL_PARAMS: total,
                 C.METRIC_TRAINABLE_PERCENT: round(100.0 * trainable / total, 4)}
        self._log_batch(params=self._fresh_params({k: str(v) for k, v in stats.items()}))
        self.buffer.add(stats, 0)

    def note_checkpoint_dir(self, output_dir: str) -> None:
        if not self._checkpoint_dir_noted:
            self._put("tags", tags={C.TAG_CHECKPOINT_DIR: str(Path(output_dir).resolve())})
            self._checkpoint_dir_noted = True

    def log_generations(self, model, tokenizer, step: int) -> None:
        """Generate on the fixed sample prompts and append the rows (with `step`) to the run's table."""
        import pandas as pd

        from smolora_mlflow.models.generation import generate, render_prompts

        self.last_eval_step = step
        tokenizer = tokenizer or self._tokenizer
        prompts = self.cfg.sample_prompts
        if not prompts or tokenizer is None:
            return
        was_training = model.training
        model.eval()
        try:
            # One generate call for a typical prompt set, not one per 8 prompts.
            outputs = generate(model, tokenizer, render_prompts(tokenizer, prompts, self.prompt_format),
                               batch_size=min(len(prompts), 32),
                               max_new_tokens=self.cfg.sample_max_new_tokens)
        finally:
            model.train(was_training)
        table = pd.DataFrame({"step": [step] * len(prompts), "prompt": prompts, "generated_text": outputs})
        self._put("table", rows=table.to_dict("records"), artifact_file=C.ARTIFACT_GENERATIONS)

    def log_final_eval(self, metrics: dict[str, float], step: int, model, tokenizer) -> None:
        if step == self.last_eval_step:  # the periodic evaluation already covered the last step
            return
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_runtime"}
        self.buffer.add(evals, step)
        self.log_generations(model, tokenizer, step)

    # --- end of run ---
    def finish(self, trainer, adapter_dir: Path, metrics: dict[str, float]) -> None:
        """After training: the final evaluation (unless the periodic one covered the last step), then the
        saved adapter, its size, the model card and the loss curve."""
        if any(k.startswith("eval_") for k in metrics):
            self.log_final_eval(metrics, trainer.state.global_step, trainer.model, trainer.processing_class)
        self.log_adapter(adapter_dir, metrics)

    def log_adapter(self, adapter_dir: Path, metrics: dict[str, float]) -> None:
        """The saved adapter, its size, the model card and the loss curve; flushes the metrics first."""
        from smolora_mlflow.tracking.record import loss_curve_png, model_card

        size = sum(f.stat().st_size for f in Path(adapter_dir).glob("adapter_model*.safetensors"))
        last_step = max((s for points in self.buffer.history.values() for s, _ in points), default=0)
        self.buffer.add({C.METRIC_ADAPTER_SIZE: size}, last_step)
        self.buffer.send()
        self._put("artifacts", local_dir=str(Path(adapter_dir).resolve()), artifact_path=C.ARTIFACT_ADAPTER)
        card = model_card(self.cfg, self.data, self.base_info, metrics, self.run_id, size)
        self._put("text", text=card, artifact_file=C.ARTIFACT_MODEL_CARD)
        png = loss_curve_png(self.buffer.history, title=self.run_name or self._default_run_name())
        if png is not None:  # kept beside the outputs too, so an outage loses nothing
            local = Path(self.cfg.output_dir).resolve() / Path(C.ARTIFACT_LOSS_CURVE).name
            png.save(local)
            self._put("artifact", local_path=str(local), artifact_path=str(Path(C.ARTIFACT_LOSS_CURVE).parent))
        self._put("tags", tags={C.TAG_ADAPTER_SIZE: str(size)})

    def _put(self, kind: str, **payload) -> None:
        """Queue one write on the run's outbox (in order with the metrics; retried through outages)."""
        from smolora_mlflow.tracking.outbox import Op

        self.buffer.send()  # metrics logged before this write go before it
        self.buffer.outbox.put(Op(kind, payload))


def checkpoint_dir_of_run(run_id: str, tracking_uri: str | None = None) -> str | None:
    """The folder a run wrote its checkpoints to, as recorded in its tags."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri).get_run(run_id).data.tags.get(C.TAG_CHECKPOINT_DIR)
