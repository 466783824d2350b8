"""Request coalescing and the scoring server's request threads, on real threads and thread pools."""

from __future__ import annotations

import threading
import time

import pytest

from smolora_mlflow.flavor.batching import RequestBatcher


def _recording_batcher(**kwargs) -> tuple[RequestBatcher, list[list[str]]]:
    calls: list[list[str]] = []

    def run(prompts, params):
        calls.append(list(prompts))
        return [p.upper() for p in prompts]

    return RequestBatcher(run, **kwargs), calls


def test_leader_keeps_waiting_while_requests_keep_arriving():
    # Gaps of 0.1 s between arrivals, under the 0.5 s quiet gap: all three share one batch.
    batcher, calls = _recording_batcher(window_s=0.5, max_wait_s=10.0)
    results: dict[str, list[str]] = {}

    def submit(p: str) -> None:
        results[p] = batcher.submit([p], {"max_new_tokens": 4})

    threads = []
    for p in ("a", "b", "c"):
        threads.append(threading.Thread(target=submit, args=(p,)))
        threads[-1].start()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=30)
    assert [sorted(c) for c in calls] == [["a", "b", "c"]]
    assert results == {"a": ["A"], "b": ["B"], "c": ["C"]}
    assert batcher.stats.coalesced_requests == 3


def test_different_params_and_seeded_sampling_never_share_a_batch():
    batcher, calls = _recording_batcher(window_s=0.3, max_wait_s=5.0)
    barrier = threading.Barrier(3)
    params = [{"max_new_tokens": 4}, {"max_new_tokens": 8}, {"do_sample": True, "seed": 1}]

    def submit(i: int) -> None:
        barrier.wait()
        batcher.submit([f"p{i}"], params[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(calls) == [["p0"], ["p1"], ["p2"]]


def test_errors_reach_every_member_of_the_batch():
    def run(prompts, params):
        raise ValueError(f"bad batch of {len(prompts)}")

    batcher = RequestBatcher(run, window_s=0.3, max_wait_s=5.0)
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def submit(p: str) -> None:
        barrier.wait()
        try:
            batcher.submit([p], {})
        except ValueError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=submit, args=(p,)) for p in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == ["bad batch of 2", "bad batch of 2"]


def test_a_negative_window_is_refused():
    with pytest.raises(ValueError, match="window_s"):
        RequestBatcher(lambda p, k: p, window_s=-1)


def test_the_wait_scales_with_how_long_a_batch_takes():
    # After one 0.4 s batch, wait_fraction=1 makes the quiet gap 0.4 s: a request 0.15 s behind joins.
    calls: list[list[str]] = []

    def slow(prompts, params):
        calls.append(list(prompts))
        time.sleep(0.4)
        return list(prompts)

    batcher = RequestBatcher(slow, window_s=0.0, busy_window_s=0.0, max_wait_s=5.0, wait_fraction=1.0)
    batcher.submit(["warm"], {})
    threads = [threading.Thread(target=batcher.submit, args=([p], {})) for p in ("a", "b")]
    threads[0].start()
    time.sleep(0.15)
    threads[1].start()
    for t in threads:
        t.join(timeout=30)
    assert [sorted(c) for c in calls] == [["warm"], ["a", "b"]]


def test_log_level_from_environment(monkeypatch):
    import logging

    from mlflow.exceptions import MlflowException

    from smolora_mlflow.flavor.batching import log_to_stderr_if_asked

    monkeypatch.setenv("SMOLORA_LOG_LEVEL", "loud")
    with pytest.raises(MlflowException, match="must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"):
        log_to_stderr_if_asked()
    package_logger = logging.getLogger("smolora_mlflow")
    before = (package_logger.level, list(package_logger.handlers))
    monkeypatch.setenv("SMOLORA_LOG_LEVEL", "debug")
    try:
        log_to_stderr_if_asked()
        log_to_stderr_if_asked()  # idempotent: one handler
        added = [h for h in package_logger.handlers if getattr(h, "smolora_stderr", False)]
        assert package_logger.level == logging.DEBUG and len(added) == 1
    finally:
        package_logger.setLevel(before[0])
        package_logger.handlers[:] = before[1]


def test_a_gap_longer_than_the_cap_is_honoured():
    batcher, calls = _recording_batcher(window_s=0.5)  # max_wait_s stays at its 50 ms default
    first = threading.Thread(target=batcher.submit, args=(["a"], {}))
    first.start()
    time.sleep(0.15)
    batcher.submit(["b"], {})
    first.join(timeout=30)
    assert [sorted(c) for c in calls] == [["a", "b"]]


def test_a_leader_interrupted_while_waiting_releases_its_group():
    class Interrupt(BaseException):
        pass

    def interrupting_sleep(_seconds):
        raise Interrupt

    batcher, calls = _recording_batcher(window_s=0.5)
    batcher._wait_for_company = lambda group: interrupting_sleep(0)
    with pytest.raises(Interrupt):
        batcher.submit(["a"], {})
    del batcher._wait_for_company  # back to the real wait
    done = threading.Event()
    threading.Thread(target=lambda: (batcher.submit(["b"], {}), done.set()), daemon=True).start()
    assert done.wait(timeout=30), "a later request with the same params hung on the dead group"
    assert calls == [["b"]]
