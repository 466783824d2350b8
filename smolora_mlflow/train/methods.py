"""One trainer per training objective: TRL's SFTTrainer, DPOTrainer, KTOTrainer and GRPOTrainer, with LoRA.

Every method gets the same things from :class:`~smolora_mlflow.train.smolora.SmoLoRA`: the base model,
the TRL config of its method (:func:`~smolora_mlflow.train.upstream.get_trainer_config`), the LoRA config,
and the run's callbacks. What is particular to a method is here: its trainer, and its per-step table
(GRPO's sampled completions with each reward; DPO's chosen/rejected scores of eval rows), which TRL would
send only to W&B or Trackio.

With a LoRA ``peft_config`` and no ``ref_model``, DPO, KTO and GRPO use the base model with the adapter
disabled as the reference, so no second copy of the weights is loaded.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from smolora_mlflow import constants as C

logger = logging.getLogger(__name__)

PREFERENCE_TABLE_ROWS = 8  # eval rows scored for the DPO table at each evaluation


def build_method_trainer(method: str, *, model, args, data, tokenizer, peft_config, callbacks: list,
                         tracker, cfg) -> Any:
    """The TRL trainer of ``method`` with the run's callbacks (and its table callback) attached."""
    import trl

    common = dict(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                  processing_class=tokenizer, peft_config=peft_config)
    if method == "sft":
        return trl.SFTTrainer(**common, callbacks=callbacks)
    if method == "dpo":
        extra = [PreferenceScoresCallback(tracker, data.eval, args.beta)] if data.eval is not None else []
        return trl.DPOTrainer(**common, callbacks=[*callbacks, *extra])
    if method == "kto":
        return trl.KTOTrainer(**common, callbacks=callbacks)
    if method == "grpo":
        from smolora_mlflow.train.rewards import RewardRecorder, resolve_rewards

        recorder = RewardRecorder(resolve_rewards(cfg))
        return trl.GRPOTrainer(**common, reward_funcs=recorder.funcs,
                               callbacks=[*callbacks, CompletionsTableCallback(tracker, recorder)])
    raise ValueError(f"unknown method {method!r}; use sft, dpo, kto or grpo.")


class CompletionsTableCallback(TrainerCallback):
    """GRPO's sampled completions with each reward, per logged step, appended to the run's table.

    Rows are kept in memory and written at each checkpoint, evaluation and at the end: ``log_table`` appends
    by reading the table back and writing it whole, which on every step would cost more than the step.
    """

    def __init__(self, tracker, recorder, flush_every: int = 50):
        self.tracker = tracker
        self.recorder = recorder
        self.flush_every = flush_every  # logged steps between writes, so a long run's table stays current
        self._rows: list[dict] = []
        self._logged = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self._rows.extend(self.recorder.take(state.global_step))
        self._logged += 1
        if self._logged % self.flush_every == 0:
            self._flush()

    def _flush(self) -> None:
        rows, self._rows = self._rows, []
        self.tracker.log_table_rows(rows, C.ARTIFACT_COMPLETIONS)

    def on_save(self, args, state, control, **kwargs):
        self._flush()

    def on_evaluate(self, args, state, control, **kwargs):
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


class PreferenceScoresCallback(TrainerCallback):
    """At each evaluation, DPO's implicit rewards of a few eval pairs: beta * (log pi - log pi_ref), where the
    reference is the base model with the adapter disabled (as DPOTrainer does with a LoRA ``peft_config``)."""

    def __init__(self, tracker, eval_rows, beta: float):
        self.tracker = tracker
        self.rows = eval_rows.select(range(min(PREFERENCE_TABLE_ROWS, eval_rows.num_rows))).to_list()
        self.beta = beta

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or model is None or processing_class is None:
            return
        table = []
        for row in self.rows:
            scores = {}
            for side in ("chosen", "rejected"):
                policy = _completion_logp(model, processing_class, row["prompt"], row[side])
                with model.disable_adapter():
                    ref = _completion_logp(model, processing_class, row["prompt"], row[side])
                scores[f"{side}_reward"] = self.beta * (policy - ref)
            table.append({"step": state.global_step, "prompt": _text(row["prompt"]), "chosen": _text(row["chosen"]),
                          "rejected": _text(row["rejected"]), **scores,
                          "margin": scores["chosen_reward"] - scores["rejected_reward"]})
        self.tracker.log_table_rows(table, C.ARTIFACT_PREFERENCE_SCORES)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) for m in value)
    return str(value)


def _completion_logp(model, tokenizer, prompt: Any, completion: Any) -> float:
    """Sum of the log-probabilities of ``completion``'s tokens after ``prompt`` (chat rows via the template)."""
    import torch

    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full_ids], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
    finally:
        model.train(was_training)
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())
