"""The pyfunc wrapper a smolora model loads as: validation, request coalescing, streaming, adapter routing.

One wrapper serves a single model (merged, or one adapter) or an adapter set (several LoRA adapters on one
resident base, see :mod:`.adapter_set`). In an adapter set a request names its adapter (param
``adapter``); requests for different adapters share one ``generate`` call through PEFT's mixed-adapter
batches (``adapter_names``), since the batcher groups by generation params only.

What a server needs beyond ``predict``/``predict_stream``: :meth:`complete` and :meth:`open_stream` (the
same with the adapter as an argument and a cancel event), or :meth:`prepare` (checked and tokenized once,
with the prompt token counts) then :meth:`complete_prepared` / :meth:`stream_prepared`; :attr:`adapter_names`;
and :attr:`observer`, an object the server sets to be told about requests, batches and tokens
(``request(adapter)``, ``batch(prompts, adapters, waits)``, ``tokens(adapter, n)``); see
``smolora_mlflow.serving.metrics``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from smolora_mlflow.constants import ADAPTER_PARAM
from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor.batching import SCORING_SERVER_ENV, RequestBatcher, widen_scoring_server_pool
from smolora_mlflow.flavor.inputs import (
    OUTPUT_COLUMN,
    check_prompt_lengths,
    check_request_size,
    to_prompts,
    validate_params,
)
from smolora_mlflow.models.generation import count_tokens, decode_settings, generate, stream, warm_up

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

    def new_text(self, i: int, text: str) -> str:
        """``text`` generated for prompt ``i`` without the echoed prompt (``return_full_text``)."""
        prompt = self.prompts[i]
        return text[len(prompt):] if self.params.get("return_full_text") and text.startswith(prompt) else text


@dataclass(frozen=True)
class _Item:
    prompt: str
    adapter: str
    submitted: float


class _NoObserver:
    def request(self, adapter: str) -> None: ...
    def batch(self, prompts: int, adapters: list[str], waits: list[float]) -> None: ...
    def tokens(self, adapter: str, n: int) -> None: ...


class _SmoloraPyfuncWrapper:
    """pyfunc implementation: validates inputs and params, coalesces concurrent calls, streams."""

    def __init__(self, model, tokenizer, conf: dict[str, Any], *, batch_size: int = 8,
                 coalesce_window_ms: float | None = None, max_batch_size: int = 32,
                 max_prompts_per_request: int = 256, max_prompt_chars: int = 100_000,
                 server_threads: int | None = None, adapters: Any = None, cache_implementation: str = "auto",
                 compile: str | bool = "auto"):
        self.model, self.tokenizer = model, tokenizer
        self.adapters = adapters  # an AdapterSet, or None for a single model
        self.observer: Any = _NoObserver()
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
        # Unset, the wait adapts: in `mlflow models serve` a lone request waits for company for 5 ms or 5%
        # of a generate call, whichever is longer (requests sent together reach predict a few ms apart
        # after MLflow's parsing), 15 ms while requests have been coalescing; a direct predict call runs at
        # once unless calls have been coalescing. A number fixes the quiet gap; 0 never waits.
        in_server = SCORING_SERVER_ENV in os.environ
        if coalesce_window_ms is None:
            self._batcher = RequestBatcher(self._run_batch, window_s=0.005 if in_server else 0.0,
                                           max_batch_size=int(max_batch_size),
                                           wait_fraction=0.05 if in_server else 0.0)
        else:
            gap = float(coalesce_window_ms) / 1000
            self._batcher = RequestBatcher(self._run_batch, window_s=gap, busy_window_s=gap,
                                           max_batch_size=int(max_batch_size))
        if adapters is not None:
            adapters.lock = self._batcher.lock  # adapters are swapped between generate calls, never during
        self._server_threads = int(max_batch_size if server_threads is None else server_threads) if in_server else 0
        count_tokens(tokenizer, "warm up")  # settle the fast tokenizer's state before threads share it

    @property
    def stats(self):
        """Coalescing counters: requests, batches, coalesced_requests, largest_batch."""
        return self._batcher.stats

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

    def _run_batch(self, items: list[_Item], params: dict[str, Any]) -> list[str]:
        started = time.monotonic()
        prompts = [i.prompt for i in items]
        names = None if self.adapters is None else [self.adapters.internal(i.adapter) for i in items]
        self.observer.batch(len(items), [i.adapter for i in items], [started - i.submitted for i in items])
        texts = generate(self.model, self.tokenizer, prompts, batch_size=self.batch_size, adapter_names=names,
                         decode=self.decode, **params)
        if not isinstance(self.observer, _NoObserver):  # counting re-tokenizes every output: only for metrics
            for item, text in zip(items, texts, strict=True):
                self.observer.tokens(item.adapter, self.count_new_tokens(text))
        return texts

    def count_new_tokens(self, text: str) -> int:
        """Tokens in generated ``text`` (for usage and metrics)."""
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def prepare(self, model_input: Any, params: dict[str, Any] | None = None, adapter: str | None = None
                ) -> Prepared:
        """Check a request (adapter, params, size limits before any tokenizing, token limits) and tokenize
        each prompt once; the counts are the prompt side of a server's usage."""
        name = self.check_adapter(adapter)
        params = validate_params(params, self.defaults, self.max_new_tokens_limit)
        with self._tokenizer_lock:
            prompts = to_prompts(model_input, self.tokenizer, self.prompt_format)
            check_request_size(prompts, self.max_prompts_per_request, self.max_prompt_chars)
            lengths = [count_tokens(self.tokenizer, p) for p in prompts]
        check_prompt_lengths(lengths, params["max_new_tokens"], self.max_prompt_tokens, self.context_length)
        return Prepared(name, prompts, params, lengths)

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

    def complete_prepared(self, prepared: Prepared) -> list[str]:
        """:meth:`complete` of a request :meth:`prepare` checked."""
        if self._server_threads:  # first request in `mlflow models serve`
            widen_scoring_server_pool(self._server_threads)
            self._server_threads = 0
        self.observer.request(prepared.adapter)
        now = time.monotonic()
        return self._batcher.submit([_Item(p, prepared.adapter, now) for p in prepared.prompts], prepared.params)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One ``generated_text`` row per prompt, in order; param ``adapter`` picks an adapter set's adapter."""
        adapter, params = self._split(params)
        # object dtype: pandas' string inference costs more than the rest of this wrapper per call
        return pd.DataFrame({OUTPUT_COLUMN: self.complete(model_input, params, adapter)}, dtype=object)

    def open_stream(self, model_input: Any, params: dict[str, Any] | None = None, adapter: str | None = None,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Text pieces of one prompt's completion, validated before returning; ``cancel`` stops it."""
        return self.stream_prepared(self.prepare(model_input, params, adapter), cancel)

    def stream_prepared(self, prepared: Prepared, cancel: threading.Event | None = None) -> Iterator[str]:
        """:meth:`open_stream` of a request :meth:`prepare` checked."""
        if len(prepared.prompts) != 1:
            raise invalid_input(
                f"A stream takes exactly one prompt, got {len(prepared.prompts)}; send one prompt per stream.")
        self.observer.request(prepared.adapter)
        return self._stream(prepared.prompts[0], prepared.params, prepared.adapter, cancel)

    def _stream(self, prompt: str, params: dict[str, Any], name: str, cancel) -> Iterator[str]:
        pieces: list[str] = []
        # Looked up under the generation lock: an alias swapped while this stream waited serves its new adapter.
        internal = None if self.adapters is None else (lambda: self.adapters.internal(name))
        try:
            for piece in stream(self.model, self.tokenizer, prompt, lock=self._batcher.lock,
                                adapter_name=internal, cancel=cancel, decode=self.decode, **params):
                pieces.append(piece)
                yield piece
        finally:
            text = "".join(pieces)
            new = text[len(prompt):] if params["return_full_text"] else text
            if not isinstance(self.observer, _NoObserver):
                self.observer.tokens(name, self.count_new_tokens(new))

    def predict_stream(self, model_input: Any, params: dict[str, Any] | None = None) -> Iterator[str]:
        """Text pieces of one prompt's completion; validated before the first piece is asked for."""
        adapter, params = self._split(params)
        return self.open_stream(model_input, params, adapter)
