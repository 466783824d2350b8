"""Request coalescing: concurrent calls with equal params share one batch.

The served model no longer uses it: :mod:`.scheduler` admits every request into one running batch between
tokens. :class:`RequestBatcher` stays a small, tested utility for callers that batch whole calls, and
:class:`BatcherStats` names the scheduler's counters.

MLflow's scoring server runs each request's ``predict`` in its own thread. Calling ``model.generate``
from several threads at once is unsafe and slow, so one lock serialises generation, and requests that
arrive close together with identical generation params are merged into one batched call (a leader
and followers): the first request of a group waits for company while requests keep arriving (a quiet
gap ends the wait), then runs the whole group under the lock and hands each caller its own slice of
the results. Requests that arrive while a batch is running keep joining the next group until its
leader gets the lock, so a busy server batches more, not less.

Seeded sampling requests are never merged: their random stream must not depend on the neighbours.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from smolora_mlflow.errors import invalid_input

logger = logging.getLogger(__name__)

# Set by `mlflow models serve` in the uvicorn process that loads the model.
SCORING_SERVER_ENV = "__pyfunc_model_path__"

RunBatch = Callable[[list[Any], dict[str, Any]], list[str]]  # (items submitted, params) -> one text per item


@dataclass
class _Group:
    params: dict[str, Any]
    prompts: list[Any] = field(default_factory=list)
    requests: int = 0
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    results: list[str] | None = None
    error: BaseException | None = None


@dataclass
class BatcherStats:
    """Counters read by tests and benchmarks."""

    requests: int = 0  # predict calls submitted
    batches: int = 0  # run_batch calls made
    coalesced_requests: int = 0  # requests that shared their batch with at least one other
    largest_batch: int = 0  # most prompts in one run_batch call


class RequestBatcher:
    """Merge concurrent ``submit`` calls with equal params into one ``run_batch`` call.

    Args:
        run_batch: ``(items, params) -> completions`` (items as submitted: the wrapper's prompts with
            their adapter), called under ``self.lock``.
        window_s: the quiet gap a group's first request waits for company: it keeps waiting while
            requests keep joining, until a gap of ``window_s`` passes with none (0, with the other gaps
            0, disables the wait).
        max_batch_size: most prompts per group; a full group is closed and a new one started.
        busy_window_s: the gap used instead while requests have been coalescing (within
            ``busy_memory_s``): an idle server answers a lone request at once, a busy one batches.
        max_wait_s: the longest a leader waits for company in all (at least one gap).
        wait_fraction: a gap of at least this fraction of a typical ``run_batch`` call: waiting 5% of a
            generate call for company costs a lone request little and saves a whole call when company
            comes, on small and large models alike.

    Example:
        >>> b = RequestBatcher(lambda ps, kw: [p.upper() for p in ps], window_s=0.01)
        >>> b.submit(["a", "b"], {})
        ['A', 'B']
    """

    def __init__(self, run_batch: RunBatch, *, window_s: float = 0.01, max_batch_size: int = 32,
                 busy_window_s: float = 0.015, busy_memory_s: float = 10.0, max_wait_s: float = 0.05,
                 wait_fraction: float = 0.0):
        if window_s < 0:
            raise ValueError(f"`window_s` must be >= 0, got {window_s}.")
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        self._run_batch = run_batch
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self.busy_window_s = busy_window_s
        self.busy_memory_s = busy_memory_s
        self.max_wait_s = max_wait_s
        self.wait_fraction = wait_fraction
        self._batch_s = 0.0  # moving average of a run_batch call's duration
        self._last_coalesced = float("-inf")
        self.lock = threading.Lock()  # serialises generation (also used by streaming)
        self._state_lock = threading.Lock()  # guards the open groups and the counters
        self._open: dict[Hashable, _Group] = {}
        self.stats = BatcherStats()

    @staticmethod
    def _key(params: dict[str, Any]) -> Hashable | None:
        if params.get("do_sample") and int(params.get("seed", -1)) >= 0:
            return None  # seeded sampling runs alone
        return tuple(sorted((k, repr(v)) for k, v in params.items()))

    def _join(self, prompts: list[Any], params: dict[str, Any]) -> tuple[_Group, int, bool]:
        key = self._key(params)
        with self._state_lock:
            self.stats.requests += 1
            group = self._open.get(key) if key is not None else None
            leader = (
                group is None or group.closed or len(group.prompts) + len(prompts) > self.max_batch_size
            )
            if leader:
                group = _Group(params=dict(params))
                if key is not None:
                    self._open[key] = group
            start = len(group.prompts)
            group.prompts.extend(prompts)
            group.requests += 1
            if not leader:
                self._last_coalesced = time.monotonic()
            return group, start, leader

    def _close(self, group: _Group) -> None:
        """Stop the group taking members (idempotent: also called on the leader's way out)."""
        with self._state_lock:
            if group.closed:
                return
            group.closed = True
            for key, open_group in list(self._open.items()):
                if open_group is group:
                    del self._open[key]
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(group.prompts))
            if group.requests > 1:
                self.stats.coalesced_requests += group.requests

    def _wait_for_company(self, group: _Group) -> None:
        """Sleep in gaps while the group keeps growing; stop at a quiet gap, a full group or max_wait_s."""
        busy = time.monotonic() - self._last_coalesced < self.busy_memory_s
        configured = max(self.window_s, self.busy_window_s if busy else 0.0)
        # The learned gap stays under the cap (one 60 s generation must not make the next lone request wait
        # 3 s); a configured gap longer than the cap wins.
        gap = max(configured, min(self.wait_fraction * self._batch_s, self.max_wait_s))
        if not gap:
            return
        deadline = time.monotonic() + max(self.max_wait_s, configured)
        seen = 0
        while time.monotonic() < deadline:
            with self._state_lock:
                grown = group.requests > seen
                seen = group.requests
                full = len(group.prompts) >= self.max_batch_size
            if not grown or full:
                return
            time.sleep(min(gap, max(0.0, deadline - time.monotonic())))

    def _lead(self, group: _Group) -> None:
        try:  # whatever happens (even KeyboardInterrupt while waiting), the group is closed and released
            self._wait_for_company(group)
            with self.lock:
                self._close(group)
                logger.debug("generate: %d prompt(s) from %d request(s)", len(group.prompts), group.requests)
                started = time.monotonic()
                results = self._run_batch(list(group.prompts), dict(group.params))
                took = time.monotonic() - started
                self._batch_s = took if not self._batch_s else 0.7 * self._batch_s + 0.3 * took
            if len(results) != len(group.prompts):
                raise RuntimeError(f"run_batch gave {len(results)} results for {len(group.prompts)} prompts")
            group.results = results
        except BaseException as e:  # handed to every member of the group, then re-raised
            group.error = e
        finally:
            self._close(group)
            group.done.set()

    def submit(self, prompts: list[Any], params: dict[str, Any]) -> list[str]:
        """Run ``prompts`` with ``params``, possibly batched with concurrent calls; results in order."""
        if not prompts:
            return []
        group, start, leader = self._join(list(prompts), params)
        if leader:
            self._lead(group)
        else:
            group.done.wait()
        if group.error is not None:
            raise group.error
        assert group.results is not None
        return group.results[start : start + len(prompts)]


# The request threads of `mlflow models serve`. MLflow's scoring server runs each request's `predict` through
# `asyncio.to_thread`, i.e. in the event loop's default executor of `min(32, cpus + 4)` threads (6 on a 2-core
# machine), and offers no setting for it. The public way to widen it is `loop.set_default_executor`, which needs
# the running loop; a model is loaded before that loop exists and `predict` runs in a worker thread that has
# none, and MLflow gives a model no startup hook. So no public mechanism reaches it from the flavor: `smolora
# serve` (serving.routes.Routes) sets a wide default executor on its own loop, and under plain `mlflow models
# serve` a 7th concurrent request waits for a thread, then joins the running batch at the next token (the
# scheduler admits requests between tokens, so nobody waits for a whole batch). Earlier versions raised the
# executor's private `_max_workers` through CPython's thread internals; that is gone.


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_to_stderr_if_asked() -> None:
    """``SMOLORA_LOG_LEVEL=DEBUG|INFO|...``: show this package's log in a scoring server's output."""
    level = os.environ.get("SMOLORA_LOG_LEVEL", "").strip().upper()
    if not level:
        return
    if level not in _LOG_LEVELS:
        raise invalid_input(
            f"SMOLORA_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {level!r}; fix or unset it.")
    package_logger = logging.getLogger("smolora_mlflow")
    if not any(getattr(h, "smolora_stderr", False) for h in package_logger.handlers):
        handler = logging.StreamHandler()
        handler.smolora_stderr = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(level)
