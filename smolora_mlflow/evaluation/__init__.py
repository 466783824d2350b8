"""Evaluating a causal LM: token-level loss and perplexity, task metrics, sample generations.

:mod:`~smolora_mlflow.evaluation.loss` (loss, perplexity, samples), :mod:`~smolora_mlflow.evaluation.tasks`
(exact match and friends) and :mod:`~smolora_mlflow.evaluation.loading` (loading the model a user names).
"""

from __future__ import annotations

from smolora_mlflow.evaluation.loss import (
    EvalSplit,
    encode_row,
    eval_loss,
    eval_split,
    perplexity,
    sample_generations,
    whole_run_train_loss,
)

__all__ = ["EvalSplit", "encode_row", "eval_loss", "eval_split", "perplexity", "sample_generations",
           "whole_run_train_loss"]
