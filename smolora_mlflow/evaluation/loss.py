"""Evaluate a causal LM on a dataset: token-level loss, perplexity and sample generations.

:mod:`smolora_mlflow.evaluation.loading` loads the model a user names. The loss is computed the way TRL's
``SFTTrainer`` builds its labels: text gets an EOS token, prompt/completion rows score only the completion,
chats are rendered with the chat template; sequences are cut at ``max_length``. The loss is the mean over
every scored token of the split.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> split = eval_split(SmoloraConfig(eval_fraction=0.1))
    >>> from smolora_mlflow.evaluation.loading import load_for_inference
    >>> loaded = load_for_inference("models:/reviews/1")          # doctest: +SKIP
    >>> eval_loss(loaded.model, loaded.tokenizer, split.rows, split.format, max_length=64)  # doctest: +SKIP
    {'eval_loss': 2.31, 'eval_perplexity': 10.1, 'eval_tokens': 812.0, 'eval_rows': 40.0}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from smolora_mlflow.config import SmoloraConfig

logger = logging.getLogger(__name__)


@dataclass
class EvalSplit:
    """The rows an evaluation scores, with a description for the run record."""

    rows: list[dict[str, Any]]
    format: str
    description: str
    data: Any  # PreparedData
    dataset: Any  # datasets.Dataset of ``rows``


# ----------------------------------------------------------------------------------------------------
# which rows


def eval_split(cfg: SmoloraConfig, dataset: Any = None, *, prepared: Any = None) -> EvalSplit:
    """The held-out split of ``cfg.dataset`` (same seed and fraction as training), or all rows of ``dataset``.

    Args:
        cfg: the dataset, its columns, ``eval_fraction`` and seed.
        dataset: score all rows of this dataset instead.
        prepared: the :class:`~smolora_mlflow.data.PreparedData` a training already made from ``cfg``, so
            the data is not loaded and split a second time.

    With ``eval_fraction`` 0 there is no held-out split; every row is scored and the description says that
    the model saw them in training.
    """
    from smolora_mlflow.data import as_scored, prepare_data, prepare_method_data

    # DPO/KTO/GRPO data is scored on its desired completions (chosen, label-true, answer).
    prepare = prepare_data if cfg.method == "sft" else prepare_method_data
    if dataset is not None:
        data = as_scored(prepare(cfg.replace(eval_fraction=0.0, max_samples=None), dataset))
        return EvalSplit(data.train.to_list(), data.format, f"all {data.num_train} rows of {data.name}", data,
                         data.train)
    data = as_scored(prepared if prepared is not None else prepare(cfg))
    if data.eval is not None:
        return EvalSplit(data.eval.to_list(), data.format,
                         f"held-out {data.num_eval} rows (eval_fraction={cfg.eval_fraction:g}) of {data.name}",
                         data, data.eval)
    logger.warning("eval_fraction is 0, so %s has no held-out rows; scoring its %d training rows instead.",
                   data.name, data.num_train)
    return EvalSplit(data.train.to_list(), data.format,
                     f"all {data.num_train} training rows of {data.name} (eval_fraction=0: not held out)",
                     data, data.train)


# ----------------------------------------------------------------------------------------------------
# loss and perplexity


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run logs a large finite number instead of inf."""
    return math.exp(min(float(loss), 50.0))


def whole_run_train_loss(log_history: list[dict[str, Any]], global_step: int, session_start: int,
                         session_loss: float) -> float:
    """The mean training loss over every step of a run, a run resumed from a checkpoint included.

    transformers' ``train_loss`` is the mean over the steps of one ``train()`` call, so after a resume it
    covers the resumed steps only. The trainer state, which a checkpoint keeps and a resume restores, holds
    every logged ``loss``: each the mean over the steps since the previous log, so weighted by those steps
    they add up to the run's total, in the order transformers adds them (with ``logging_steps=1`` an
    uninterrupted run gets exactly its own ``train_loss`` back). Steps after the last log are known only to
    this call's mean, ``session_loss`` over the steps from ``session_start``. Exact when the checkpoint's
    step is a logging step (always with ``logging_steps=1``, the default).

    Example:
        >>> whole_run_train_loss([{"loss": 3.0, "step": 1}, {"loss": 1.0, "step": 2}], 2, 1, 1.0)
        2.0
    """
    if global_step <= 0:
        return session_loss
    total, last, in_session = 0.0, 0, 0.0
    for step, loss in sorted({e["step"]: e["loss"] for e in log_history if "loss" in e and "step" in e}.items()):
        if step > global_step:
            break
        part = loss * (step - last)
        total += part
        in_session += part if step > session_start else 0.0
        last = step
    if last < global_step:  # the steps after the last log: what this call's mean holds beyond its logs
        total += session_loss * (global_step - session_start) - in_session
    return total / global_step


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def encode_row(tokenizer, row: dict[str, Any], fmt: str, max_length: int,
               prompt_format: str = "plain") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row, labels ``-100`` where nothing is scored.

    With ``prompt_format="chat"`` a prompt/completion row is scored as TRL trains it: the prompt as a
    user turn with the generation prompt, the completion as the assistant turn of the chat template.
    """
    eos = tokenizer.eos_token or ""
    if fmt == "prompt_completion" and prompt_format == "chat":
        from smolora_mlflow.models.generation import chat_messages

        messages = chat_messages(row["prompt"], row["completion"])
        prompt_ids = _chat_ids(tokenizer, messages[:1], add_generation_prompt=True)
        ids = _chat_ids(tokenizer, messages)
        start = _common_prefix(prompt_ids, ids)
        labels = [-100] * start + ids[start:]
    elif fmt == "chat":
        ids = list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
        labels = list(ids)
    elif fmt == "prompt_completion":
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + completion)["input_ids"]
        start = _common_prefix(prompt_ids, ids)
        labels = [-100] * start + ids[start:]
    else:
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = tokenizer(text)["input_ids"]
        labels = list(ids)
    return ids[:max_length], labels[:max_length]


def eval_loss(model, tokenizer, rows: list[dict[str, Any]], fmt: str, *, max_length: int, batch_size: int = 8,
              progress: bool | None = None, prompt_format: str = "plain") -> dict[str, float]:
    """Mean next-token loss over every scored token of ``rows``, and its perplexity.

    Returns:
        ``eval_loss``, ``eval_perplexity``, ``eval_tokens`` (scored tokens) and ``eval_rows``.
    """
    import torch
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("no rows to evaluate; pass a dataset with at least one example.")
    encoded = [encode_row(tokenizer, r, fmt, max_length, prompt_format) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    show = _progress_enabled() if progress is None else progress
    model.eval()
    for start in tqdm(range(0, len(encoded), batch_size), desc="evaluating", unit="batch", disable=not show):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   target.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError(f"none of the {len(rows)} rows has a token to score within max_length={max_length}; "
                         "raise `max_length` or check the completions.")
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss), "eval_tokens": float(count),
            "eval_rows": float(len(rows))}


def _progress_enabled() -> bool:
    from smolora_mlflow.models.pretrained import progress_enabled

    return progress_enabled()


def sample_generations(model, tokenizer, prompts: list[str], max_new_tokens: int,
                       prompt_format: str = "plain") -> list[dict[str, str]]:
    """Greedy completions of ``prompts`` (through the chat template when ``chat``), as rows
    ``{"prompt", "generated_text"}``."""
    from smolora_mlflow.models.generation import generate, render_prompts

    if not prompts:
        return []
    outputs = generate(model, tokenizer, render_prompts(tokenizer, list(prompts), prompt_format),
                       max_new_tokens=max_new_tokens)
    return [{"prompt": p, "generated_text": o} for p, o in zip(prompts, outputs, strict=True)]
