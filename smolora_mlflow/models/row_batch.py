"""Continuous batching by hand: a running batch whose rows join and leave between tokens.

:class:`RowBatch` holds the rows being generated, their key/value cache (one ``DynamicCache``, rows
left-padded to a common length) and the attention mask. :meth:`RowBatch.add` prefills new rows and merges
their cache into the running one (the shorter side is left-padded with masked zeros);
:meth:`RowBatch.step` feeds every row's last token through one ``model.forward`` and picks each row's next
token with that row's own params; :meth:`RowBatch.keep` drops rows (finished, or whose client left) and
the leading columns no row needs any more. Greedy rows give the tokens ``model.generate`` gives for the
prompt alone, as static left-padded batches do.

Why not transformers' own continuous batching (``ContinuousBatchingManager`` / ``generate_batch``, paged
attention): on the 2-core CPU this project is served and tested on, ``generate_batch`` measured 50-200x
slower than one static batched ``generate`` (transformers 5.25; ``benchmarks/bench_serving.py --only cb``
re-measures it), while this loop runs a batch at about the speed of static ``generate``. On CUDA the
paged manager may win for large batches; :func:`supports_rows` is where a device-specific choice belongs
(see the README's Performance section for what was measured where).

Rows need a cache that can be sliced and padded per batch row (attention-only decoders with
``DynamicLayer`` caches) and a generation config with no logits processors beyond the flavor's own
params; :func:`supports_rows` says so, and callers fall back to whole ``generate`` calls otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# generation_config fields that make `generate` apply processors this loop does not: such a model is
# generated with `generate` itself (grouped), so its outputs stay what `generate` gives.
_UNSUPPORTED_CONFIG = ("min_length", "min_new_tokens", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                       "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias",
                       "exponential_decay_length_penalty", "encoder_repetition_penalty", "renormalize_logits",
                       "guidance_scale", "watermarking_config", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
_NEUTRAL = (None, 0, 0.0, False, 1.0, [], ())


def supports_rows(model) -> tuple[bool, str]:
    """Whether :class:`RowBatch` can generate with ``model`` exactly as ``generate`` does, and why not."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False, "not a decoder-only model"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = set(getattr(text, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        return False, f"layer types {sorted(layer_types)} keep state a per-row KV cache cannot carry"
    gen = getattr(model, "generation_config", None)
    for name in _UNSUPPORTED_CONFIG:
        value = getattr(gen, name, None)
        if (name == "typical_p" and value == 1.0) or (name == "min_p" and value in (None, 0.0)):
            continue
        if value not in _NEUTRAL:
            return False, f"its generation_config sets `{name}` ({value!r}), which only `generate` applies"
    return True, "attention-only decoder with a plain generation config"


def eos_ids(model, tokenizer) -> frozenset[int]:
    """The token ids that end a row: the generation config's ``eos_token_id`` (an int or a list), else the
    tokenizer's."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])


@dataclass
class Row:
    """One prompt being generated: its prompt ids, params, adapter, the tokens so far and why it ended."""

    prompt_ids: list[int]
    params: Mapping[str, Any]  # resolved generation params (GENERATION_PARAMS keys)
    eos: frozenset[int]
    adapter: str | None = None  # PEFT adapter name, for a multi-adapter PeftModel
    generator: Any = None  # a torch.Generator for seeded sampling rows, else the global RNG
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (an end-of-sequence token) or "length" (max_new_tokens)

    def push(self, token: int) -> None:
        self.generated.append(token)
        if token in self.eos:
            self.finish = "stop"
        elif len(self.generated) >= int(self.params["max_new_tokens"]):
            self.finish = "length"


def _choose(logits, rows: list[Row]) -> list[int]:
    """Each row's next token from its last-position ``logits`` [B, V], with the row's own params, in the order
    ``generate`` applies them (repetition penalty, then temperature, top-k, top-p, then sampling)."""
    import torch
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    greedy = logits.argmax(-1).tolist()
    out = []
    for i, row in enumerate(rows):
        p = row.params
        penalty, sample = float(p["repetition_penalty"]), bool(p["do_sample"])
        if not sample and penalty == 1.0:
            out.append(greedy[i])
            continue
        scores = logits[i : i + 1]
        ids = torch.tensor([row.prompt_ids + row.generated], device=logits.device)
        if penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
        if not sample:
            out.append(int(scores.argmax(-1)))
            continue
        if float(p["temperature"]) != 1.0:
            scores = TemperatureLogitsWarper(float(p["temperature"]))(ids, scores)
        if int(p["top_k"]) > 0:
            scores = TopKLogitsWarper(int(p["top_k"]))(ids, scores)
        if float(p["top_p"]) < 1.0:
            scores = TopPLogitsWarper(float(p["top_p"]))(ids, scores)
        probs = torch.softmax(scores, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return out


def _left_pad(t, width: int, dim: int):
    """``t`` with zeros inserted before its first entry along ``dim`` up to ``width``."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class RowBatch:
    """The rows being generated, their left-padded KV cache and attention mask.

    Example:
        >>> batch = RowBatch(model, pad_id=0)
        >>> batch.add([Row(ids, {"max_new_tokens": 4, ...}, eos)])   # prefill: the first token
        >>> while batch.rows: batch.step(); batch.keep([r.finish is None for r in batch.rows])
    """

    def __init__(self, model, pad_id: int, uses_adapters: bool = False):
        import inspect

        self.model, self.pad_id, self.uses_adapters = model, int(pad_id), uses_adapters
        self.rows: list[Row] = []
        self.cache: Any = None  # a DynamicCache, [B, heads, L, dim] per layer
        self.mask: Any = None  # [B, L] long: 1 where the cache holds a real token
        self.device = next(model.parameters()).device
        forward = getattr(model, "get_base_model", lambda: model)().forward
        self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters

    def _forward(self, input_ids, mask, position_ids, cache, rows: list[Row]):
        import torch

        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                                  "cache": cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.uses_adapters:
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in rows]
        with torch.inference_mode():
            out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), out.cache

    def add(self, rows: list[Row]) -> None:
        """Prefill ``rows`` (left-padded together), give each its first token and merge them into the batch."""
        import torch
        from transformers import DynamicCache

        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, position_ids, DynamicCache(), rows)
        for row, token in zip(rows, _choose(logits, rows), strict=True):
            row.push(token)
        if self.cache is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        total = max(self.mask.shape[1], width)
        layers = [(torch.cat([_left_pad(k0, total, 2), _left_pad(k1, total, 2)]),
                   torch.cat([_left_pad(v0, total, 2), _left_pad(v1, total, 2)]))
                  for (k0, v0, *_), (k1, v1, *_) in zip(self.cache, cache, strict=True)]
        self.cache = DynamicCache(layers)
        self.mask = torch.cat([_left_pad(self.mask, total, 1), _left_pad(mask, total, 1)])
        self.rows += rows

    def step(self) -> None:
        """One token for every row: their last tokens through one forward, then each row's choice."""
        import torch

        if not self.rows:
            return
        last = torch.tensor([[r.generated[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        position_ids = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.cache = self._forward(last, self.mask, position_ids, self.cache, self.rows)
        for row, token in zip(self.rows, _choose(logits, self.rows), strict=True):
            row.push(token)

    def keep(self, flags: list[bool]) -> None:
        """Keep the rows flagged True (in order); drop the cache columns no kept row attends to."""
        import torch
        from transformers import DynamicCache

        if all(flags):
            return
        index = [i for i, f in enumerate(flags) if f]
        if not index:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in index]
        select = torch.tensor(index, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, select)
        # Leading columns padded in every kept row cost attention for nothing: cut them.
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())
        self.mask = mask[:, start:]
        self.cache = DynamicCache([(k.index_select(0, select)[:, :, start:], v.index_select(0, select)[:, :, start:])
                                   for k, v, *_ in self.cache])


def generate_ids(model, tokenizer, prompts: list[str], *, adapter_names: list[str] | None = None,
                 on_token: Any = None, decode: Any = None, **params: Any) -> list[list[int]]:
    """The new token ids of each prompt from one ``model.generate`` call, cut after each row's end token.

    The grouped path, for what :class:`RowBatch` does not do (seeded sampling, whose random stream belongs to
    the call; models :func:`supports_rows` refuses). ``on_token(row, token_id)`` is called as each step's
    tokens are produced (a streamer that routes each row of the batch to its own request). ``decode``: the
    cache and compilation (``models.decoding.decode_settings``; None: the dynamic cache).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    from smolora_mlflow.models.decoding import DYNAMIC
    from smolora_mlflow.models.generation import _encode, generate_kwargs, resolve_params

    p = resolve_params(params)
    enc = _encode(tokenizer, list(prompts), next(model.parameters()).device)
    kwargs = generate_kwargs(model, tokenizer, p, decode or DYNAMIC, prompt_tokens=enc["input_ids"].shape[1])
    if adapter_names is not None:
        enc["adapter_names"] = list(adapter_names)
    eos = eos_ids(model, tokenizer)
    ended = [False] * len(prompts)

    class RowStreamer(BaseStreamer):
        prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate hands the prompt ids over first
                self.prompt_seen = True
                return
            for row, token in enumerate(value.reshape(-1).tolist()):
                if not ended[row]:
                    on_token(row, int(token))
                    ended[row] = int(token) in eos

        def end(self) -> None: ...

    if int(p["seed"]) >= 0:
        torch.manual_seed(int(p["seed"]))
    with torch.inference_mode():
        seqs = model.generate(**enc, **kwargs, streamer=RowStreamer() if on_token is not None else None)
    out = []
    for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out
