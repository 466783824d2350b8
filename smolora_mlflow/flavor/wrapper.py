"""The pyfunc wrapper a smolora model loads as: validation, one generation scheduler, streaming, adapters.

One wrapper serves a single model (merged, or one adapter) or an adapter set (several LoRA adapters on one
resident base, see :mod:`.adapter_set`). In an adapter set a request names its adapter (param
``adapter``). Every request, predicted or streamed, goes to the model's one
:class:`~smolora_mlflow.flavor.scheduler.GenerationScheduler`, where rows of any adapter and any params share
forwards (PEFT's mixed-adapter batches, ``adapter_names``).

What a server needs beyond ``predict``/``predict_stream``: :meth:`complete` and :meth:`open_stream` (the
same with the adapter as an argument and a cancel event), or :meth:`prepare` (checked and tokenized once,
with the prompt token ids) then :meth:`complete_results` (texts, token ids, finish reasons) /
:meth:`stream_prepared` (a ``TokenStream`` whose ``result`` has the same once read); :attr:`adapter_names`;
and :attr:`observer` (:class:`~smolora_mlflow.flavor.scheduler.Observer`), which the server sets to be told about
requests, batches and tokens; see ``smolora_mlflow.serving.metrics``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from smolora_mlflow.constants import ADAPTER_PARAM
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor.inputs import (
    OUTPUT_COLUMN,
    check_prompt_lengths,
    check_request_size,
    to_prompts,
    validate_params,
)
from smolora_mlflow.flavor.scheduler import GenerationScheduler
from smolora_mlflow.flavor.server_env import SCORING_SERVER_ENV
from smolora_mlflow.flavor.streams import Completion, LoopEvents, TokenStream
from smolora_mlflow.models.generation import count_tokens, decode_settings, warm_up

DEFAULT_ADAPTER = "default"  # the label of a single model's requests in metrics
# What `model_config` (pyfunc.load_model, SERVING_MODEL_CONFIG) may set; the MLmodel declares each key, since
# MLflow drops the keys a model does not declare.
MODEL_CONFIG_KEYS = ("device", "dtype", "base_model_path", "batch_size", "coalesce_window_ms", "max_batch_size",
                     "max_prompts_per_request", "max_prompt_chars", "server_threads", "refresh_seconds",
                     "hub_kernels", "cache_implementation", "compile")


def check_adapter_type(adapter: Any) -> None:
    """An adapter name is a string (or absent); anything else is the client's mistake, not a 500."""
    if adapter is not None and not isinstance(adapter, str):
        raise invalid_input(
            f"`{ADAPTER_PARAM}` must be a string naming an adapter, got {adapter!r:.200}.")


@dataclass(frozen=True)
class Prepared:
    """A request checked and tokenized once: what :meth:`complete_prepared` and :meth:`stream_prepared` run."""

    adapter: str  # the public adapter name (DEFAULT_ADAPTER for a single model)
    prompts: list[str]  # as generate sees them (chat rendered)
    params: dict[str, Any]  # over the model's defaults, checked
    prompt_tokens: list[int]  # tokens of each prompt
    prompt_ids: list[list[int]] = field(default_factory=list)  # each prompt's ids, as the model sees them

    def new_text(self, i: int, text: str) -> str:
        """``text`` generated for prompt ``i`` without the echoed prompt (``return_full_text``)."""
        prompt = self.prompts[i]
        return text[len(prompt):] if self.params.get("return_full_text") and text.startswith(prompt) else text


class _SmoloraPyfuncWrapper:
    """pyfunc implementation: validates inputs and params, hands every request to one scheduler, streams."""

    def __init__(self, model, tokenizer, conf: dict[str, Any], *, batch_size: int = 8,
                 coalesce_window_ms: float | None = None, max_batch_size: int = 32,
                 max_prompts_per_request: int = 256, max_prompt_chars: int = 100_000,
                 server_threads: int | None = None, adapters: Any = None, cache_implementation: str = "auto",
                 compile: str | bool = "auto"):
        self.model, self.tokenizer = model, tokenizer
        self.adapters = adapters  # an AdapterSet, or None for a single model
        self.defaults = dict(conf.get("generation_defaults") or {})
        self.max_new_tokens_limit = int(conf.get("max_new_tokens_limit") or 1024)
        self.max_prompt_tokens = conf.get("max_prompt_tokens")
        self.prompt_format = conf.get("prompt_format") or "plain"  # models saved before it existed: plain
        self.context_length = getattr(model.config, "max_position_embeddings", None) or conf.get(
            "context_length")
        self.batch_size = int(batch_size)
        try:  # generate runs batches of 1 (streams) and of batch_size: the shapes a compiled decode step needs
            self.decode = decode_settings(model, cache_implementation, compile, (1, self.batch_size))
        except ValueError as e:
            raise invalid_input(str(e)) from e
        warm_up(model, tokenizer, self.decode)  # compile now, not in the first request
        # One request must not be able to exhaust memory or hold the model for minutes.
        self.max_prompts_per_request = int(max_prompts_per_request)
        self.max_prompt_chars = int(max_prompt_chars)
        self._tokenizer_lock = threading.Lock()
        # Unset, an idle model in `mlflow models serve` waits 5 ms for company (requests sent together reach
        # predict a few ms apart after MLflow's parsing); a direct predict call runs at once. A busy model
        # never waits: new requests join the running batch at the next token. A number fixes the gap.
        in_server = SCORING_SERVER_ENV in os.environ
        window = (0.005 if in_server else 0.0) if coalesce_window_ms is None else float(coalesce_window_ms) / 1000
        self.scheduler = GenerationScheduler(model, tokenizer, tokenizer_lock=self._tokenizer_lock, adapters=adapters,
                                             max_batch_size=int(max_batch_size), prefill_batch=self.batch_size,
                                             window_s=window, decode=self.decode)
        if adapters is not None:
            adapters.lock = self.scheduler.lock  # adapters are swapped between tokens, never during a forward
            # A weak reference: the pool must not keep the scheduler (and the model) alive, so the pool's refresh
            # thread ends as soon as the model is dropped.
            in_use = weakref.WeakMethod(self.scheduler.adapters_in_use)
            adapters.in_use = lambda: ((method := in_use()) and method()) or set()
        # `server_threads` (how many requests may wait inside predict at once) is kept for saved model configs;
        # `smolora serve` sizes its request pool itself (serving.app) and `mlflow models serve` offers no
        # public way to (see flavor.server_env).
        self.server_threads = server_threads
        count_tokens(tokenizer, "warm up")  # settle the fast tokenizer's state before threads share it

    @property
    def observer(self) -> Any:
        """Told about requests, batches and tokens (``request``, ``batch``, ``tokens``); set by a server."""
        return self.scheduler.observer

    @observer.setter
    def observer(self, value: Any) -> None:
        self.scheduler.observer = value

    @property
    def stats(self):
        """Scheduling counters: requests, batches (admissions), coalesced_requests, largest_batch."""
        return self.scheduler.stats

    @property
    def adapter_names(self) -> list[str] | None:
        """The adapters an adapter set serves (None for a single model)."""
        return None if self.adapters is None else self.adapters.names()

    def get_raw_model(self) -> tuple[Any, Any]:
        return self.model, self.tokenizer

    def check_adapter(self, adapter: Any) -> str:
        """The public adapter name a request asked for, checked; DEFAULT_ADAPTER for a single model."""
        check_adapter_type(adapter)
        if self.adapters is None:
            if adapter not in (None, "", DEFAULT_ADAPTER):
                raise invalid_input(
                    f"`{ADAPTER_PARAM}` is {adapter!r}, but this model is a single model, not an adapter set; "
                    f"leave `{ADAPTER_PARAM}` out.")
            return DEFAULT_ADAPTER
        return self.adapters.check_name(adapter)

    def count_new_tokens(self, text: str) -> int:
        """Tokens in ``text`` when re-tokenized (usage comes from the generated ids; this is for other text)."""
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _encode(self, prompt: str) -> list[int]:
        bos = self.tokenizer.bos_token
        return self.tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]

    def prepare(self, model_input: Any, params: dict[str, Any] | None = None, adapter: str | None = None
                ) -> Prepared:
        """Check a request (adapter, params, size limits before any tokenizing, token limits) and tokenize
        each prompt once; the counts are the prompt side of a server's usage."""
        name = self.check_adapter(adapter)
        params = validate_params(params, self.defaults, self.max_new_tokens_limit)
        with self._tokenizer_lock:
            prompts = to_prompts(model_input, self.tokenizer, self.prompt_format)
            check_request_size(prompts, self.max_prompts_per_request, self.max_prompt_chars)
            ids = [self._encode(p) for p in prompts]
        lengths = [len(x) for x in ids]
        check_prompt_lengths(lengths, params["max_new_tokens"], self.max_prompt_tokens, self.context_length)
        return Prepared(name, prompts, params, lengths, ids)

    def _internal(self, name: str):
        # Looked up when the row is admitted: an alias swapped while a request waited serves its new adapter.
        return (lambda: None) if self.adapters is None else (lambda: self.adapters.internal(name))

    @staticmethod
    def _split(params: dict[str, Any] | None) -> tuple[Any, dict[str, Any] | None]:
        if not params or ADAPTER_PARAM not in params:
            return None, params
        rest = dict(params)
        return rest.pop(ADAPTER_PARAM), rest

    def complete(self, model_input: Any, params: dict[str, Any] | None = None, adapter: str | None = None
                 ) -> list[str]:
        """One completion per prompt, in order, with ``adapter`` (an adapter set's name, or None)."""
        return self.complete_prepared(self.prepare(model_input, params, adapter))

    def complete_results(self, prepared: Prepared) -> list[Completion]:
        """The :class:`Completion` (text without the prompt, token ids, finish reason) of each prompt."""
        self.observer.request(prepared.adapter)
        return self.scheduler.submit(prepared.prompts, prepared.prompt_ids, prepared.params, prepared.adapter,
                                     self._internal(prepared.adapter))

    def complete_prepared(self, prepared: Prepared) -> list[str]:
        """:meth:`complete` of a request :meth:`prepare` checked (with the prompt when ``return_full_text``)."""
        full = prepared.params.get("return_full_text")
        return [p + c.text if full else c.text
                for p, c in zip(prepared.prompts, self.complete_results(prepared), strict=True)]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One ``generated_text`` row per prompt, in order; param ``adapter`` picks an adapter set's adapter."""
        adapter, params = self._split(params)
        # object dtype: pandas' string inference costs more than the rest of this wrapper per call
        return pd.DataFrame({OUTPUT_COLUMN: self.complete(model_input, params, adapter)}, dtype=object)

    def open_stream(self, model_input: Any, params: dict[str, Any] | None = None, adapter: str | None = None,
                    cancel: threading.Event | None = None) -> TokenStream:
        """Text pieces of one prompt's completion, validated before returning; ``cancel`` stops it."""
        return self.stream_prepared(self.prepare(model_input, params, adapter), cancel)

    def stream_prepared(self, prepared: Prepared, cancel: threading.Event | None = None,
                        events: LoopEvents | None = None) -> TokenStream:
        """:meth:`open_stream` of a request :meth:`prepare` checked; its ``result`` once exhausted. ``events``
        (a :class:`~smolora_mlflow.flavor.streams.LoopEvents`) hands the pieces to an asyncio loop."""
        if len(prepared.prompts) != 1:
            raise invalid_input(
                f"A stream takes exactly one prompt, got {len(prepared.prompts)}; send one prompt per stream.")
        self.observer.request(prepared.adapter)
        return self.scheduler.open(prepared.prompts[0], prepared.prompt_ids[0], prepared.params, prepared.adapter,
                                   self._internal(prepared.adapter), cancel, events)

    def predict_stream(self, model_input: Any, params: dict[str, Any] | None = None) -> Iterator[str]:
        """Text pieces of one prompt's completion; validated before the first piece is asked for."""
        adapter, params = self._split(params)
        return self.open_stream(model_input, params, adapter)
