"""LoRA fine-tuning with TRL's SFTTrainer and PEFT, behind the SmoLoRA API.

Example:
    >>> from smolora_mlflow import SmoLoRA, SmoloraConfig
    >>> lora = SmoLoRA("smolora:demo", "smolora:reviews", config=SmoloraConfig(max_steps=30))
    >>> result = lora.train()            # adapter checkpoint + one MLflow run
    >>> merged = lora.save()             # final_merged/ as safetensors
    >>> lora.inference("The food was", max_new_tokens=16)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.data import PreparedData, as_chat, as_chat_turns, prepare_data, prepare_method_data
from smolora_mlflow.evaluation import whole_run_train_loss
from smolora_mlflow.models import generation, pretrained
from smolora_mlflow.models.adapters import BASE_INFO_FILE
from smolora_mlflow.train import checkpoints
from smolora_mlflow.train.checkpoint_models import CheckpointModels
from smolora_mlflow.train.methods import build_method_trainer
from smolora_mlflow.train.upstream import (
    check_quantization,
    get_bnb_config,
    get_lora_config,
    get_trainer_config,
    prepare_quantized,
)
from smolora_mlflow.train.variants import INITIAL_ADAPTER_DIR, InitialAdapterCallback, needs_conversion, save_adapter

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MERGED_DIR = "final_merged"


@dataclass
class TrainResult:
    """What a training call produced."""

    adapter_dir: Path
    run_id: str | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)


class SmoLoRA:
    """Fine-tune a LoRA adapter on a causal LM, merge it, run inference, and log it all to MLflow.

    Args:
        base_model: hub id, local folder or ``smolora:demo``; overrides ``config.base_model``.
        dataset: hub id, local file/folder, ``smolora:reviews`` or an in-memory dataset.
        text_field: column with plain-text examples.
        output_dir: where the adapter, checkpoints and merged model go.
        config: a full :class:`SmoloraConfig`; the arguments above override its fields.
        **overrides: any other config field, e.g. ``lora_r=16``.
    """

    def __init__(
        self,
        base_model: str | None = None,
        dataset: Any = None,
        text_field: str | None = None,
        output_dir: str | os.PathLike | None = None,
        config: SmoloraConfig | None = None,
        **overrides: Any,
    ):
        changes = dict(overrides)
        if base_model is not None:
            changes["base_model"] = str(base_model)
        if isinstance(dataset, (str, os.PathLike)):
            changes["dataset"] = str(dataset)
            dataset = None
        if text_field is not None:
            changes["text_field"] = text_field
        if output_dir is not None:
            changes["output_dir"] = str(output_dir)
        self.config = (config or SmoloraConfig()).replace(**changes) if changes else (config or SmoloraConfig())
        self._dataset_obj = dataset
        self.output_dir = Path(self.config.output_dir)
        self.adapter_dir = self.output_dir / ADAPTER_DIR
        self.merged_dir = self.output_dir / MERGED_DIR
        self.device = generation.resolve_device(self.config.device)
        self.dtype = pretrained.resolve_dtype(self.config.dtype, self.device.type)
        check_quantization(self.config.quantization, self.device.type)  # before any data or model loads
        self.quantization_error: float | None = None  # merged vs adapter-on-quantized-base, after save()
        self.model = None
        self.tokenizer = None
        self.data: PreparedData | None = None
        self.run_id: str | None = None
        self.base_info: dict[str, Any] = {}
        self._checkpoint_models: CheckpointModels | None = None
        self.checkpoint_roles: dict[str, str] = {}  # best / latest -> LoggedModel id of the checkpoint

    # --- training ---
    def prepare(self) -> PreparedData:
        """Load and validate the dataset (done once; train() calls it)."""
        if self.data is None:
            prepare = prepare_data if self.config.method == "sft" else prepare_method_data
            self.data = prepare(self.config, self._dataset_obj)
        return self.data

    def _load_base(self):
        cfg = self.config
        path = pretrained.resolve_model_path(cfg.base_model)
        tokenizer = pretrained.load_tokenizer(path, revision=cfg.base_model_revision,
                                           trust_remote_code=cfg.trust_remote_code)
        bnb = get_bnb_config(cfg.quantization)
        model = pretrained.load_causal_lm(path, revision=cfg.base_model_revision,
                                       trust_remote_code=cfg.trust_remote_code, dtype=self.dtype,
                                       hub_kernels=cfg.hub_kernels,
                                       # a quantized model is placed by device_map when loaded, never moved
                                       **({"quantization_config": bnb, "device_map": {"": self.device.type}}
                                          if bnb is not None else {}))
        self.base_info = pretrained.base_model_info(cfg.base_model, path, model)
        if bnb is not None:
            model = prepare_quantized(model, cfg)
        return model, tokenizer

    def train(self) -> TrainResult:
        """Fine-tune, save the adapter (safetensors) to ``<output_dir>/adapter``, log the run to MLflow."""
        from smolora_mlflow.tracking import make_tracker

        cfg = self.config
        pretrained.silence_progress_bars_if_asked()
        data = self.prepare()
        resume = checkpoints.resolve_resume(
            cfg.resume_from_checkpoint, self.output_dir,
            checkpoint_dir_of_run=lambda run_id: _checkpoint_dir_of_run(run_id, cfg.tracking_uri),
        )
        model, tokenizer = self._load_base()
        # `auto` becomes what it means for this tokenizer, so the run, the evaluation and the logged model
        # all record (and use) the same prompt format.
        # The run logs the config as given; the format `auto` resolved to is its `smolora.prompt_format` tag.
        fmt, why = generation.decide_prompt_format(cfg.prompt_format, tokenizer, cfg.base_model,
                                                   getattr(model, "generation_config", None))
        logger.info("Prompt format: %s (%s).", fmt, why)
        train_data = (as_chat(data) if cfg.method == "sft" else as_chat_turns(data)) if fmt == "chat" else data
        tracker = make_tracker(cfg, data, self.base_info, device=self.device.type)
        tracker.prompt_format, tracker.prompt_format_reason = fmt, why
        if fmt != cfg.prompt_format:
            self.config = cfg = cfg.replace(prompt_format=fmt)
        resume_run = checkpoints.read_run_id(resume) if resume else None
        with tracker.run(resume_run_id=resume_run) as run_id:
            self.run_id = run_id
            self._checkpoint_models = (CheckpointModels(self, lambda: tracker.run_id, tracker.reachable)
                                       if run_id and cfg.checkpoint_models and cfg.save_steps > 0 else None)
            trainer = self._build_trainer(model, tokenizer, train_data, tracker)
            tracker.log_training_setup(trainer)
            start = _step_of(resume)  # read now: checkpoint rotation may delete it during training
            with pretrained.quiet_upstream_deprecations():  # TRL's trainers read a deprecated transformers name
                output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            metrics = {**output.metrics, "train_loss": whole_run_train_loss(
                trainer.state.log_history, trainer.state.global_step, start, output.training_loss)}
            if data.eval is not None:
                final = _final_eval(trainer)
                # DPO/KTO/GRPO losses are not a token NLL, so they have no perplexity.
                metrics.update(_with_perplexity(final) if cfg.method == "sft" else final)
            self._save_adapter(trainer, tokenizer)  # before anything else talks to the tracking server
            if self._checkpoint_models is not None:
                self.checkpoint_roles = self._checkpoint_models.finish(cfg.save_total_limit)
            tracker.finish(trainer, self.adapter_dir, metrics)
        self.model = trainer.model
        self.tokenizer = tokenizer
        return TrainResult(self.adapter_dir, run_id, trainer.state.global_step, metrics)

    def _build_trainer(self, model, tokenizer, data: PreparedData, tracker):
        cfg = self.config
        args = get_trainer_config(cfg, device=self.device.type, dtype=self.dtype,
                                  has_eval=data.eval is not None, output_dir=str(self.output_dir))
        lora_config = get_lora_config(cfg)
        # The tracker's on_save delivers the metrics up to a checkpoint before the marker makes it resumable.
        publish = self._checkpoint_models.log if self._checkpoint_models is not None else None
        callbacks = [*tracker.callbacks(), checkpoints.CheckpointMarkerCallback(lambda: tracker.run_id, publish)]
        if needs_conversion(cfg.peft):
            callbacks.append(InitialAdapterCallback(self.output_dir / INITIAL_ADAPTER_DIR))
        with pretrained.quiet_upstream_deprecations():
            trainer = build_method_trainer(cfg.method, model=model, args=args, data=data, tokenizer=tokenizer,
                                           peft_config=lora_config, callbacks=callbacks, tracker=tracker, cfg=cfg)
        _drop_stock_mlflow_callback(trainer)
        tracker.log_upstream_configs(lora_config, args)
        return trainer

    def _save_adapter(self, trainer, tokenizer) -> None:
        import json

        if not trainer.is_world_process_zero():
            return
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        initial = self.output_dir / INITIAL_ADAPTER_DIR if needs_conversion(self.config.peft) else None
        save_adapter(trainer.model, self.adapter_dir, initial)
        tokenizer.save_pretrained(self.adapter_dir)
        info = {**self.base_info, "architecture": type(trainer.model.get_base_model()).__name__}
        (self.adapter_dir / BASE_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")

    # --- merge and load ---
    def save(self, path: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
        """Merge the trained adapter into a freshly loaded base model and save it (safetensors + tokenizer)."""
        from smolora_mlflow.train.merge import merge_adapter

        if not (self.adapter_dir / "adapter_config.json").is_file():
            raise RuntimeError(f"no adapter at `{self.adapter_dir}`; call train() before save().")
        out = Path(path) if path else self.merged_dir
        # A QLoRA adapter is merged into the unquantized base, in float32; the verification compares it with
        # the adapter on that same base (exact), and the quantization error is measured against training's model.
        quantized = self.model if self.config.quantization != "none" and self.model is not None else None
        merge_adapter(self.adapter_dir, out, base_model=self.config.base_model,
                      revision=self.config.base_model_revision,
                      trust_remote_code=self.config.trust_remote_code, verify=verify,
                      save_dtype=self.config.merged_dtype, hub_kernels=self.config.hub_kernels)
        self.merged_dir = out
        self.model, self.tokenizer = self.load_model(out)
        if quantized is not None:
            from smolora_mlflow.train.merge import quantization_error

            self.quantization_error = quantization_error(quantized, self.model, self.tokenizer)
            logger.info("Merged QLoRA model differs from the adapter on the %s base by at most %.3g in logits.",
                        self.config.quantization, self.quantization_error)
        return out

    def load_model(self, path: str | os.PathLike):
        """Load a merged model folder for inference and make it this object's model."""
        tokenizer = pretrained.load_tokenizer(str(path))
        model = pretrained.load_causal_lm(str(path), dtype=self.dtype, device=self.device,
                                          hub_kernels=self.config.hub_kernels)
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        return model, tokenizer

    def load_adapter_model(self, base_model: str, adapter_dir: str | os.PathLike, *, merge: bool = False):
        """Load ``base_model`` with the adapter at ``adapter_dir`` on top (merged in memory when asked)."""
        from smolora_mlflow.models.adapters import apply_adapter

        path = pretrained.resolve_model_path(base_model)
        tokenizer = pretrained.load_tokenizer(path)
        base = pretrained.load_causal_lm(path, dtype=self.dtype, hub_kernels=self.config.hub_kernels)
        model = apply_adapter(base, adapter_dir, merge=merge)
        model.to(self.device).eval()
        self.model, self.tokenizer = model, tokenizer
        return model, tokenizer

    # --- inference ---
    def _require_model(self):
        if self.model is None:
            if (self.merged_dir / "config.json").is_file():
                self.load_model(self.merged_dir)
            elif (self.adapter_dir / "adapter_config.json").is_file():
                self.load_adapter_model(self.config.base_model, self.adapter_dir)
            else:
                raise RuntimeError("no model loaded: call train(), save() or load_model(path) first.")
        self.model.eval()
        return self.model, self.tokenizer

    def inference(self, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, **params: Any) -> str:
        """Generate a completion for one prompt."""
        return self.batch_inference([prompt], max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, **params)[0]

    def batch_inference(self, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
                        temperature: float = 1.0, batch_size: int = 8, **params: Any) -> list[str]:
        """Generate completions for many prompts, one ``generate`` call per batch (left padding)."""
        model, tokenizer = self._require_model()
        return generation.generate(model, tokenizer, list(prompts), batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, **params)

    def streaming_inference(self, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
                            temperature: float = 1.0, **params: Any) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        model, tokenizer = self._require_model()
        yield from generation.stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                     do_sample=do_sample, temperature=temperature, **params)

    # --- MLflow model ---
    def log_model(self, name: str = "model", *, mode: str = "merged", registered_model_name: str | None = None,
                  **kwargs: Any):
        """Log the merged (or adapter-only) model with the ``smolora`` flavor to this object's run."""
        from smolora_mlflow.train.publish import log_trained_model

        return log_trained_model(self, name=name, mode=mode, registered_model_name=registered_model_name,
                                 **kwargs)


def _with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    from smolora_mlflow.evaluation import perplexity

    out = dict(metrics)
    if "eval_loss" in out:
        out["eval_perplexity"] = perplexity(out["eval_loss"])
    return out


def _step_of(checkpoint: Path | None) -> int:
    """The step a training resumed from ``checkpoint`` starts at (0 for a fresh one)."""
    from transformers import TrainerState

    return TrainerState.load_from_json(str(checkpoint / "trainer_state.json")).global_step if checkpoint else 0


def _final_eval(trainer) -> dict[str, float]:
    """Eval metrics at the last step: reuse the periodic eval if it just ran, else evaluate once more."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == trainer.state.global_step:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
            break
    return trainer.evaluate()


def _drop_stock_mlflow_callback(trainer) -> None:
    """Our tracking replaces transformers' MLflowCallback, and our progress bar its log printing."""
    from transformers.integrations import MLflowCallback
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(MLflowCallback)
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress())


class QuietProgress(ProgressCallback):
    """The training progress bar, without a dict printed at every logging step, and without a second bar
    for each evaluation inside training (an evaluation on its own keeps its bar)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.training_bar is None:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


def _checkpoint_dir_of_run(run_id: str, tracking_uri: str | None) -> str | None:
    from smolora_mlflow.tracking import checkpoint_dir_of_run

    return checkpoint_dir_of_run(run_id, tracking_uri=tracking_uri)
