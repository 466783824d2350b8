"""A tracking server that goes away mid-training: training neither dies nor stalls, nothing is lost.

Both tests use a real `mlflow server` (SQLite store, proxied artifacts) that is stopped for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import mlflow
import pytest
from servers import start_mlflow_server
from transformers import TrainerCallback

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow.tracking.outbox import OUTBOX_FILE

pytestmark = pytest.mark.slow

TINY = {"max_steps": 12, "max_length": 32, "per_device_train_batch_size": 4, "max_samples": 64,
        "eval_fraction": 0.1, "eval_steps": 6, "logging_steps": 1, "lora_dropout": 0.0,
        "experiment_name": "outage"}


class _Outage(TrainerCallback):
    """Stops the server after `stop_at`; starts it again (in the background) after `restart_at`."""

    def __init__(self, server_box, stop_at, restart_at, restart):
        self.box, self.stop_at, self.restart_at, self.restart = server_box, stop_at, restart_at, restart
        self.step_ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.monotonic())
        if state.global_step == self.stop_at:
            self.box["server"].stop()
        if self.restart_at is not None and state.global_step == self.restart_at:
            threading.Thread(target=lambda: self.box.update(server=self.restart()), daemon=True).start()


def _trainer_with(callback):
    class WithOutage(SmoLoRA):
        def _build_trainer(self, *args, **kwargs):
            trainer = super()._build_trainer(*args, **kwargs)
            trainer.add_callback(callback)
            return trainer

    return WithOutage


@pytest.fixture
def server_box(tmp_path, monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    # Fail fast per request while the server is down; the outbox does the retrying.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    box = {"backend": backend, "artifacts": tmp_path / "artifacts"}
    box["server"] = start_mlflow_server(backend, box["artifacts"], tmp_path / "server.log")
    box["start"] = lambda: start_mlflow_server(backend, box["artifacts"], tmp_path / "server2.log",
                                               port=box["server"].port)
    yield box
    box["server"].stop()
    mlflow.set_tracking_uri(None)


def test_outage_mid_training_then_recovery_loses_nothing(tmp_path, server_box, monkeypatch):
    monkeypatch.setenv("SMOLORA_TRACKING_RETRY_SECONDS", "240")
    url = server_box["server"].url
    outage = _Outage(server_box, stop_at=3, restart_at=5, restart=server_box["start"])
    cfg = SmoloraConfig(**TINY, tracking_uri=url, output_dir=str(tmp_path / "out"))
    started = time.monotonic()
    result = _trainer_with(outage)(config=cfg).train()
    assert result.global_step == 12 and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    # The training loop never waited on the dead server: no step took long (the slowest holds an eval).
    gaps = [b - a for a, b in zip(outage.step_ends, outage.step_ends[1:], strict=False)]
    assert max(gaps) < 15, gaps
    assert time.monotonic() - started < 300

    client = mlflow.MlflowClient(url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == list(range(1, 13))
    assert [m.step for m in client.get_metric_history(result.run_id, "eval_loss")] == [6, 12]
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"adapter", "README.md", "plots", "generations.json"} <= names
    assert not (tmp_path / "out" / OUTBOX_FILE).exists()


def test_server_that_never_returns_leaves_an_outbox_that_sync_uploads(tmp_path, server_box, monkeypatch):
    monkeypatch.setenv("SMOLORA_TRACKING_RETRY_SECONDS", "3")
    url = server_box["server"].url
    outage = _Outage(server_box, stop_at=4, restart_at=None, restart=None)
    out = tmp_path / "out"
    cfg = SmoloraConfig(**TINY, tracking_uri=url, output_dir=str(out))
    result = _trainer_with(outage)(config=cfg).train()  # does not raise: training succeeded
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / OUTBOX_FILE).is_file()
    assert mlflow.active_run() is None

    server_box["server"] = server_box["start"]()
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
    proc = subprocess.run([sys.executable, "-m", "smolora_mlflow", "sync", str(out)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / OUTBOX_FILE).exists()
    client = mlflow.MlflowClient(url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == list(range(1, 13))
    assert {"adapter", "README.md", "plots"} <= {a.path for a in client.list_artifacts(result.run_id)}
