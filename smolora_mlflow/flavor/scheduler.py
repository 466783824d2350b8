"""One generation scheduler per served model: it owns the model, and every request goes through it.

``/invocations`` (``predict``), the OpenAI endpoints (streamed or not) and ``/stream`` all submit here.
A scheduler thread runs one :class:`~smolora_mlflow.models.row_batch.RowBatch`: between two tokens it
admits the requests that arrived (each prompt becomes a row, prefilled and merged into the running
batch), drops the rows that finished or whose client left, and steps every row by one token in one
forward. So a short request never waits for a long stream to end (it joins at the next token), streams
share forwards with each other and with ``/invocations``, rows of different adapters share them through
PEFT's ``adapter_names``, and rows with different sampling params share them too (each row picks its
token with its own params). A stream's row hands each new piece of text to its own reader.

What runs as a whole ``generate`` call instead (grouped, between two tokens of the running batch):
seeded sampling, whose random stream belongs to the call (``generate([p], seed=s)`` and the served
answer stay equal); and every request of a model :func:`~smolora_mlflow.models.row_batch.supports_rows`
refuses.

An idle scheduler that gets a request waits a short gap for company (``window_s``, longer while requests
keep arriving) so that requests sent together are prefilled together. The thread ends after a few idle
seconds and starts again with the next request, so a model nobody uses holds no thread.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smolora_mlflow.flavor.streams import Completion, Events, LoopEvents, TokenStream
from smolora_mlflow.models.row_batch import Row, RowBatch, eos_ids, generate_ids, supports_rows

logger = logging.getLogger(__name__)

IDLE_EXIT_S = 5.0  # an idle scheduler thread ends after this long
EXIT_JOIN_S = 10.0  # how long interpreter exit waits for a scheduler thread to finish its step
_RUNNING: weakref.WeakSet = weakref.WeakSet()  # schedulers whose thread may be alive


@atexit.register
def _stop_running_schedulers() -> None:
    """Stop every scheduler thread before the interpreter finalizes: Python ends a daemon thread that takes the
    GIL after finalization began with ``pthread_exit``, and one inside a torch op (dropping the rows that just
    finished, as the waiter got its answer) then unwinds through C++ frames and aborts the process ("terminate
    called without an active exception", exit -6; about 1 in 14 of MLflow's requirement-inference subprocesses,
    which predict once and exit). ``atexit`` runs while daemon threads still run: the step ends, the thread returns.
    """
    for scheduler in list(_RUNNING):
        scheduler.stop(timeout=EXIT_JOIN_S)


@dataclass
class SchedulerStats:
    """Counters read by tests and benchmarks."""

    requests: int = 0  # requests submitted
    batches: int = 0  # admissions into the running batch, and grouped generate calls
    coalesced_requests: int = 0  # requests that shared their admission with at least one other
    largest_batch: int = 0  # most rows admitted at once


class Observer:
    """What the scheduler tells a server about (``smolora_mlflow.serving.metrics.Metrics`` implements it)."""

    def request(self, adapter: str) -> None: ...
    def batch(self, prompts: int, adapters: list[str], waits: list[float]) -> None: ...
    def tokens(self, adapter: str, n: int) -> None: ...


@dataclass(eq=False)
class _Request:
    prompt_ids: list[list[int]]
    prompts: list[str]
    params: dict[str, Any]
    adapter: str  # public name, for metrics
    internal: Callable[[], str | None]  # the PEFT adapter name, asked when the rows are admitted
    grouped: bool
    cancel: threading.Event
    events: Events | None = None  # a stream's pieces, then its end
    submitted: float = field(default_factory=time.monotonic)
    results: list[Completion | None] = field(default_factory=list)
    next_index: int = 0  # prompts admitted so far
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.results = [None] * len(self.prompts)


@dataclass(eq=False)
class _Live:
    row: Row
    request: _Request
    index: int
    sent: int = 0  # characters of the text already handed to a stream


class GenerationScheduler:
    """The queue and the thread that generate every request of one model.

    Args:
        model: the causal LM (a ``PeftModel`` with several adapters for an adapter set).
        tokenizer: its tokenizer; ``tokenizer_lock`` guards it (request threads tokenize while this decodes).
        adapters: the adapter pool of an adapter set (``collect`` is called as rows leave), or None.
        max_batch_size: most rows generated at once; more wait for a row to free.
        prefill_batch: most prompts prefilled in one forward.
        window_s: the quiet gap an idle scheduler waits for company; ``max_wait_s`` bounds the whole wait.
        decode: the ``DecodeSettings`` of whole ``generate`` calls; a static cache makes every call whole.
    """

    def __init__(self, model, tokenizer, *, tokenizer_lock: threading.Lock, adapters: Any = None,
                 max_batch_size: int = 32, prefill_batch: int = 8, window_s: float = 0.0,
                 max_wait_s: float = 0.05, decode: Any = None):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.tokenizer_lock = tokenizer_lock
        self.max_batch_size, self.prefill_batch = int(max_batch_size), max(1, int(prefill_batch))
        self.window_s, self.max_wait_s = float(window_s), float(max_wait_s)
        self.observer: Any = Observer()
        self.stats = SchedulerStats()
        self.lock = threading.Lock()  # held while the model runs; adapters are swapped between tokens
        self.decode = decode  # models.decoding.DecodeSettings, for whole generate calls
        self.rows_supported, self.rows_reason = supports_rows(model)
        if self.rows_supported and getattr(decode, "cache_implementation", None) == "static":
            # The static cache (compiled on CUDA by `decode_settings`' auto) is a whole-call shape: the rows' cache
            # grows and shrinks. Not measured against the rows on a GPU yet; `cache_implementation: dynamic` in
            # the model config gives a GPU the rows.
            self.rows_supported, self.rows_reason = False, "the static KV cache was chosen (whole generate calls)"
        logger.info("Generation scheduler: %s (%s).", "rows join and leave between tokens" if self.rows_supported
                    else "whole generate calls", self.rows_reason)
        self._eos = eos_ids(model, tokenizer)
        self._decode_batch = self._backend_decode_batch(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._batch = RowBatch(model, pad if pad is not None else 0, uses_adapters=adapters is not None)
        self._live: list[_Live] = []
        self._pending: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------------------------------------
    # the request side

    def _enqueue(self, request: _Request) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("The generation scheduler was stopped (the Python interpreter is exiting).")
            self.stats.requests += 1
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="smolora-scheduler", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
            self._cv.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread after the step in progress (requests still waiting fail) and wait for it; a request
        submitted afterwards is refused. Called at interpreter exit."""
        with self._cv:
            self._stopping = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _request(self, prompts: list[str], prompt_ids: list[list[int]], params: dict[str, Any], adapter: str,
                 internal: Callable[[], str | None], cancel: threading.Event | None, stream: bool,
                 events: LoopEvents | None = None) -> _Request:
        grouped = not self.rows_supported or (bool(params.get("do_sample")) and int(params.get("seed", -1)) >= 0)
        return _Request(prompt_ids, list(prompts), dict(params), adapter, internal, grouped,
                        cancel or threading.Event(), (events or queue.SimpleQueue()) if stream else None)

    def submit(self, prompts: list[str], prompt_ids: list[list[int]], params: dict[str, Any], adapter: str,
               internal: Callable[[], str | None]) -> list[Completion]:
        """Generate every prompt (with its token ids); blocks until all are done. Results in order."""
        if not prompts:
            return []
        request = self._request(prompts, prompt_ids, params, adapter, internal, None, stream=False)
        self._enqueue(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return list(request.results)

    def open(self, prompt: str, prompt_ids: list[int], params: dict[str, Any], adapter: str,
             internal: Callable[[], str | None], cancel: threading.Event | None = None,
             events: LoopEvents | None = None) -> TokenStream:
        """Start streaming one prompt; the returned iterator yields its pieces as they are generated
        (``events``: deliver them to an asyncio loop instead, read with ``await stream.next_piece()``)."""
        request = self._request([prompt], [prompt_ids], params, adapter, internal, cancel, stream=True, events=events)
        self._enqueue(request)
        return TokenStream(prompt, params, request.events, request.cancel)

    def adapters_in_use(self) -> set[str]:
        """PEFT adapter names of the rows being generated (an adapter swapped meanwhile is deleted later)."""
        return {live.row.adapter for live in self._live if live.row.adapter}

    # ------------------------------------------------------------------------------------------------
    # the scheduler thread

    def _run(self) -> None:
        while self._await_work():
            if not self._live:
                self._wait_for_company()
            try:
                self._iteration()
            except BaseException as e:  # handed to every request in flight, never swallowed
                logger.exception("Generation failed; failing the %d request(s) in flight.", len(self._live))
                self._fail_all(e)

    def _await_work(self) -> bool:
        """Wait for requests; False when the thread ends: idle for IDLE_EXIT_S, or stopped (what was in
        flight then fails)."""
        with self._cv:
            idle_since = time.monotonic()
            while not self._pending and not self._live and not self._stopping:
                left = IDLE_EXIT_S - (time.monotonic() - idle_since)
                if left <= 0:
                    self._thread = None
                    return False
                self._cv.wait(left)
            if not self._stopping:
                return True
            self._thread = None
            pending, self._pending = list(self._pending), deque()
        error = RuntimeError("The generation scheduler was stopped (the Python interpreter is exiting).")
        self._fail_all(error)
        for request in pending:
            self._fail(request, error)
        return False

    def _wait_for_company(self) -> None:
        """Requests sent together reach the server a few ms apart: an idle scheduler waits while they come."""
        if self.window_s <= 0:
            return
        deadline, seen = time.monotonic() + max(self.max_wait_s, self.window_s), -1
        while time.monotonic() < deadline:
            with self._cv:
                count = sum(len(r.prompts) - r.next_index for r in self._pending)
            if count == seen or count >= self.max_batch_size:
                return
            seen = count
            time.sleep(min(self.window_s, max(0.0, deadline - time.monotonic())))

    def _take(self) -> tuple[list[tuple[_Request, int]], list[_Request]]:
        """(rows to admit, a group of grouped requests to run whole) from the head of the queue."""
        admitted: list[tuple[_Request, int]] = []
        with self._cv:
            room = self.max_batch_size - len(self._live)
            while self._pending and room > 0:
                request = self._pending[0]
                if request.grouped:
                    if admitted:
                        break
                    return [], self._take_group()
                if request.cancel.is_set():
                    self._pending.popleft()
                    self._finish_cancelled(request)
                    continue
                while request.next_index < len(request.prompts) and room > 0:
                    admitted.append((request, request.next_index))
                    request.next_index += 1
                    room -= 1
                if request.next_index == len(request.prompts):
                    self._pending.popleft()
        return admitted, []

    def _take_group(self) -> list[_Request]:
        """Grouped requests with the same params (unseeded), the head's first; called holding ``_cv``."""
        head = self._pending.popleft()
        group = [head]
        if int(head.params.get("seed", -1)) < 0:
            for request in list(self._pending):
                if request.grouped and request.params == head.params and request.events is None:
                    self._pending.remove(request)
                    group.append(request)
        return group

    def _iteration(self) -> None:
        admitted, group = self._take()
        with self.lock:
            if group:
                self._run_group(group)
            if admitted:
                self._admit(admitted)
            self._drop_ended()
            if self._live:
                self._batch.step()
                self._emit()
                self._drop_ended()

    def _admit(self, admitted: list[tuple[_Request, int]]) -> None:
        now = time.monotonic()
        requests = list(dict.fromkeys(r for r, _ in admitted))
        rows = []
        for request, index in admitted:
            row = Row(request.prompt_ids[index], request.params, self._eos, adapter=request.internal())
            rows.append(row)
            self._live.append(_Live(row, request, index))
        self._observe_batch(requests, [r.adapter for r, _ in admitted], [now - r.submitted for r, _ in admitted],
                            len(self._live))
        for start in range(0, len(rows), self.prefill_batch):
            self._batch.add(rows[start:start + self.prefill_batch])
        self._emit()

    def _observe_batch(self, requests: list[_Request], adapters: list[str], waits: list[float], rows: int) -> None:
        self.stats.batches += 1
        if len(requests) > 1:
            self.stats.coalesced_requests += len(requests)
        self.stats.largest_batch = max(self.stats.largest_batch, rows)
        logger.debug("generate: %d prompt(s) from %d request(s)", len(adapters), len(requests))
        self.observer.batch(len(adapters), adapters, waits)

    def _emit(self) -> None:
        streamed = [live for live in self._live if live.request.events is not None and not live.request.cancel.is_set()]
        if streamed:
            for live, text in zip(streamed, self._texts([live.row.generated for live in streamed]), strict=True):
                self._emit_text(live, text)

    def _emit_one(self, live: _Live) -> None:
        if live.request.events is not None and not live.request.cancel.is_set():
            self._emit_text(live, self._texts([live.row.generated])[0])

    def _texts(self, rows: list[list[int]]) -> list[str]:
        """Each row's text, as ``tokenizer.decode(ids, skip_special_tokens=True)`` gives it. Streams decode every
        row at every token: one call into the fast tokenizer's backend for all rows where that is exactly what
        ``decode`` does, else ``decode`` row by row."""
        with self.tokenizer_lock:
            if self._decode_batch is not None:
                return self._decode_batch(rows, skip_special_tokens=True)
            return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]

    @staticmethod
    def _backend_decode_batch(tokenizer) -> Callable | None:
        """The backend's ``decode_batch`` where ``tokenizer.decode`` is the backend's ``decode`` and nothing more
        (transformers' own ``_decode``, no clean-up of tokenization spaces), else None."""
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # a transformers without the tokenizers backend class
            return None
        if type(tokenizer)._decode is not TokenizersBackend._decode or tokenizer.clean_up_tokenization_spaces:
            return None
        return tokenizer.backend_tokenizer.decode_batch

    def _emit_text(self, live: _Live, text: str) -> None:
        """Hand a streamed row the text it gained, token by token: all of the decoded text but trailing white
        space (the tokenizer's clean-up may drop a space before punctuation that comes next) and an incomplete
        character (a byte-level token that ends mid-character decodes to U+FFFD until the rest comes)."""
        if live.row.finish is None:
            if text.endswith("\ufffd"):
                return
            text = text.rstrip()
        if len(text) > live.sent:
            live.request.events.put(("piece", text[live.sent:]))
            live.sent = len(text)

    def _drop_ended(self) -> None:
        ended = [live.row.finish is not None or live.request.cancel.is_set() for live in self._live]
        if not any(ended):
            return
        for live, gone in zip(self._live, ended, strict=True):
            if gone:
                reason = live.row.finish or "cancelled"
                self._complete(live.request, live.index, live.row.generated, reason)
        self._batch.keep([not gone for gone in ended])
        self._live = [live for live, gone in zip(self._live, ended, strict=True) if not gone]
        if self.adapters is not None:
            self.adapters.collect(self.adapters_in_use())

    def _complete(self, request: _Request, index: int, ids: list[int], reason: str) -> None:
        with self.tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        request.results[index] = Completion(text, tuple(ids), reason)
        self.observer.tokens(request.adapter, len(ids))
        if request.events is not None:
            request.events.put(("end", request.results[index]))
        if all(r is not None for r in request.results):
            request.done.set()

    def _finish_cancelled(self, request: _Request) -> None:
        for i in range(len(request.prompts)):
            if request.results[i] is None:
                self._complete(request, i, [], "cancelled")

    def _run_group(self, group: list[_Request]) -> None:
        """Grouped requests as whole generate calls of up to ``prefill_batch`` prompts."""
        items = [(r, i) for r in group for i in range(len(r.prompts))]
        self._observe_batch(group, [r.adapter for r, _ in items], [time.monotonic() - r.submitted for r, _ in items],
                            len(items))
        for start in range(0, len(items), self.prefill_batch):
            chunk = items[start:start + self.prefill_batch]
            names = None if self.adapters is None else [r.internal() for r, _ in chunk]
            streams = [_Live(Row([], r.params, self._eos), r, i) for r, i in chunk]

            def on_token(row: int, token: int, streams: list[_Live] = streams) -> None:
                streams[row].row.generated.append(token)

            try:
                ids = generate_ids(self.model, self.tokenizer, [r.prompts[i] for r, i in chunk], adapter_names=names,
                                   on_token=self._streaming(streams, on_token), decode=self.decode,
                                   **chunk[0][0].params)
            except BaseException as e:
                for request in group:
                    self._fail(request, e)
                return
            for live, row_ids in zip(streams, ids, strict=True):
                live.row.generated = list(row_ids)
                live.row.finish = "stop" if row_ids and row_ids[-1] in self._eos else "length"
                self._emit_one(live)
                self._complete(live.request, live.index, row_ids, live.row.finish)

    def _streaming(self, streams: list[_Live], on_token: Callable[[int, int], None]):
        """``on_token`` that also hands a streamed row its new text as it is produced."""
        if all(live.request.events is None for live in streams):
            return None

        def routed(row: int, token: int) -> None:
            on_token(row, token)
            self._emit_one(streams[row])

        return routed

    def _fail(self, request: _Request, error: BaseException) -> None:
        request.error = error
        if request.events is not None:
            request.events.put(("error", error))
        request.done.set()

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            failed = {id(live.request): live.request for live in self._live}
            self._live = []
            self._batch.keep([False] * len(self._batch.rows))
        for request in failed.values():
            self._fail(request, error)
