"""System metrics through MLflow's own monitor (``mlflow.start_run(log_system_metrics=True)``)."""

from __future__ import annotations

import mlflow
import pytest

from smolora_mlflow import SmoLoRA, SmoloraConfig
from tests.conftest import TINY_TRAINING


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    yield
    mlflow.set_system_metrics_sampling_interval(None)


def test_training_run_logs_cpu_and_memory(tracking_uri, tmp_path):
    cfg = SmoloraConfig(**{**TINY_TRAINING, "max_steps": 12}, system_metrics=True, system_metrics_interval=0.2,
                        output_dir=str(tmp_path / "out"))
    run_id = SmoLoRA(config=cfg).train().run_id
    client = mlflow.MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 1
    # The sampling interval applied to that run only; MLflow's process-wide setting is as it was.
    import os

    assert "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ
    # Off by default: a second run has no system metrics.
    plain = SmoLoRA(config=cfg.replace(system_metrics=False, output_dir=str(tmp_path / "b"))).train().run_id
    assert not [k for k in client.get_run(plain).data.metrics if k.startswith("system/")]
