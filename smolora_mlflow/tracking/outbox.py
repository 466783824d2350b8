"""An ordered outbox of MLflow writes, sent from one background thread, that survives a tracking outage.

Every write a training makes after its run has started (metric batches, tags, the generations table, the
adapter and the model card, the final status) is an :class:`Op`. The worker thread applies them in order;
when one fails (the tracking server is down) it keeps that op and retries it with backoff, and the ops
behind it wait. The training loop never waits on the network. At the end, :meth:`Outbox.drain` waits a
bounded time for everything to go out; what is still unsent is written to ``<output_dir>/mlflow_outbox.json``,
and ``smolora sync <output_dir>`` (:func:`sync`) sends it once the server is back.

Example:
    >>> box = Outbox(client, run_id)                                   # doctest: +SKIP
    >>> box.put(Op("tags", {"tags": {"stage": "done"}}))                # doctest: +SKIP
    >>> unsent = box.drain(timeout=120)                                 # doctest: +SKIP
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OUTBOX_FILE = "mlflow_outbox.json"
RETRY_SECONDS_ENV = "SMOLORA_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0


def retry_seconds() -> float:
    """How long the end of a run waits for unsent writes (``SMOLORA_TRACKING_RETRY_SECONDS``, default 120)."""
    return float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS))


@dataclass
class Op:
    """One MLflow write: ``kind`` names it, ``payload`` holds plain JSON values only (so it can be saved)."""

    kind: str  # metrics | tags | table | artifacts | artifact | text | terminate
    payload: dict[str, Any]

    @property
    def points(self) -> int:
        return len(self.payload.get("metrics", ())) if self.kind == "metrics" else 0

    def apply(self, client, run_id: str) -> None:
        from mlflow.entities import Metric, RunTag

        p = self.payload
        if self.kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in p["metrics"]])
        elif self.kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in p["tags"].items()])
        elif self.kind == "table":
            import mlflow
            import pandas as pd

            mlflow.log_table(pd.DataFrame(p["rows"]), artifact_file=p["artifact_file"], run_id=run_id)
        elif self.kind == "artifacts":
            client.log_artifacts(run_id, p["local_dir"], p["artifact_path"])
        elif self.kind == "artifact":
            client.log_artifact(run_id, p["local_path"], p.get("artifact_path"))
        elif self.kind == "text":
            client.log_text(run_id, p["text"], p["artifact_file"])
        elif self.kind == "terminate":
            client.set_terminated(run_id, p["status"])
        else:
            raise ValueError(f"unknown outbox op kind {self.kind!r}")


class Outbox:
    """Applies :class:`Op` s to one run in order, from one daemon thread, retrying through outages."""

    def __init__(self, client, run_id: str, *, max_backoff: float = 10.0):
        self.client = client
        self.run_id = run_id
        self.max_backoff = max_backoff
        self._queue: collections.deque[Op] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self.failures = 0  # failed attempts so far (each retried)
        self.stalled = False  # the last attempt failed: the tracking server is not taking writes now
        self._thread: threading.Thread | None = None

    def put(self, op: Op) -> None:
        """Queue ``op``; returns at once."""
        with self._cond:
            self._queue.append(op)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="smolora-mlflow-outbox", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                op = self._queue[0]
                self._busy = True
            try:
                op.apply(self.client, self.run_id)
            except Exception as e:
                self.failures += 1
                self.stalled = True
                if self.failures == 1 or self.failures % 10 == 0:
                    logger.warning("MLflow write (%s) failed, keeping %d queued write(s) and retrying: %s",
                                   op.kind, len(self._queue), str(e).splitlines()[0][:300])
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait(timeout=backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.5
            self.stalled = False
            with self._cond:
                self._queue.popleft()
                self._busy = False
                self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty; keeps retrying afterwards either way."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            return not self._queue

    def drain(self, timeout: float) -> list[Op]:
        """Wait up to ``timeout`` seconds for every queued op to be applied; return (and stop on) the rest."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.notify_all()  # wake a worker sleeping in its backoff
                self._cond.wait(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            unsent = list(self._queue)
            if unsent:
                self._stop = True
                self._queue.clear()
                self._cond.notify_all()
        return unsent

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()


def save_unsent(output_dir: str | os.PathLike, tracking_uri: str, run_id: str, ops: list[Op]) -> Path:
    """Write the unsent ops beside the training outputs, for :func:`sync` (atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / OUTBOX_FILE
    existing = json.loads(path.read_text()) if path.is_file() else {"ops": []}
    doc = {"tracking_uri": tracking_uri, "run_id": run_id,
           "ops": existing["ops"] + [{"kind": op.kind, "payload": op.payload} for op in ops]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)
    return path


def sync(output_dir: str | os.PathLike, tracking_uri: str | None = None) -> tuple[str, int]:
    """Send the writes a training could not deliver (``smolora sync``); returns (run id, ops sent).

    Raises:
        FileNotFoundError: ``output_dir`` holds no unsent writes.
    """
    import mlflow

    path = Path(output_dir) / OUTBOX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`{path}` does not exist: nothing from that training waits to be uploaded.")
    doc = json.loads(path.read_text(encoding="utf-8"))
    client = mlflow.MlflowClient(tracking_uri or doc["tracking_uri"])
    ops = [Op(o["kind"], o["payload"]) for o in doc["ops"]]
    for i, op in enumerate(ops):
        try:
            op.apply(client, doc["run_id"])
        except Exception:
            doc["ops"] = doc["ops"][i:]  # keep what is left for the next try
            path.write_text(json.dumps(doc), encoding="utf-8")
            raise
    path.unlink()
    return doc["run_id"], len(ops)
