"""Request coalescing for the served model: concurrent calls with equal params share one batch.

MLflow's scoring server runs each request's ``predict`` in its own thread. Calling ``model.generate``
from several threads at once is unsafe and slow, so one lock serialises generation, and requests that
arrive close together with identical generation params are merged into one batched call (a leader
and followers): the first request of a group waits ``window_s`` for company, then runs the whole
group under the lock and hands each caller its own slice of the results. Requests that arrive while a
batch is running keep joining the next group until its leader gets the lock, so a busy server batches
more, not less.

Seeded sampling requests are never merged: their random stream must not depend on the neighbours.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[list[str], dict[str, Any]], list[str]]


@dataclass
class _Group:
    params: dict[str, Any]
    prompts: list[str] = field(default_factory=list)
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
        run_batch: ``(prompts, params) -> completions``, called under ``self.lock``.
        window_s: how long a group's first request waits for others (0 disables the wait).
        max_batch_size: most prompts per group; a full group is closed and a new one started.

    Example:
        >>> b = RequestBatcher(lambda ps, kw: [p.upper() for p in ps], window_s=0.01)
        >>> b.submit(["a", "b"], {})
        ['A', 'B']
    """

    def __init__(self, run_batch: RunBatch, *, window_s: float = 0.01, max_batch_size: int = 32,
                 busy_window_s: float = 0.01, busy_memory_s: float = 2.0):
        if window_s < 0:
            raise ValueError(f"`window_s` must be >= 0, got {window_s}.")
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        self._run_batch = run_batch
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        # Adaptive wait: an idle server answers a lone request at once; once requests have been arriving
        # together (within `busy_memory_s`), a new group's leader waits `busy_window_s` for company.
        self.busy_window_s = busy_window_s
        self.busy_memory_s = busy_memory_s
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

    def _join(self, prompts: list[str], params: dict[str, Any]) -> tuple[_Group, int, bool]:
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
        with self._state_lock:
            group.closed = True
            for key, open_group in list(self._open.items()):
                if open_group is group:
                    del self._open[key]
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(group.prompts))
            if group.requests > 1:
                self.stats.coalesced_requests += group.requests

    def _lead(self, group: _Group) -> None:
        busy = time.monotonic() - self._last_coalesced < self.busy_memory_s
        wait = max(self.window_s, self.busy_window_s if busy else 0.0)
        if wait:
            time.sleep(wait)
        try:
            with self.lock:
                self._close(group)
                results = self._run_batch(list(group.prompts), dict(group.params))
            if len(results) != len(group.prompts):
                raise RuntimeError(f"run_batch gave {len(results)} results for {len(group.prompts)} prompts")
            group.results = results
        except BaseException as e:  # handed to every member of the group, then re-raised
            group.error = e
        finally:
            group.done.set()

    def submit(self, prompts: list[str], params: dict[str, Any]) -> list[str]:
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
