"""The README's demo command, as `make demo` runs it: offline, on the built-in model and dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_demo_command_trains_evaluates_logs_and_registers(tmp_path, tracking_uri, smolora_cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMOLORA_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "smolora_mlflow", "run", "--config", str(REPO / "configs" / "demo.yaml"),
           "--output_dir", str(tmp_path / "outputs")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "registered      smolora-demo version 1" in proc.stderr + proc.stdout

    client = mlflow.MlflowClient()
    version = client.get_model_version("smolora-demo", "1")
    train_run = client.get_run(version.run_id)
    assert train_run.info.status == "FINISHED"
    losses = [m.value for m in client.get_metric_history(version.run_id, "loss")]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3  # it learned
    model = mlflow.pyfunc.load_model("models:/smolora-demo/1")
    out = model.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 8})
    assert isinstance(out["generated_text"][0], str)
