"""Data-parallel training on CPU with two processes (accelerate, gloo): one MLflow run, one adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def test_two_process_training_logs_one_run_and_agrees_on_the_adapter(tmp_path, tracking_uri, demo_model_dir):
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_train import adapter_digest

    out = tmp_path / "ddp"
    env = {**os.environ, "SMOLORA_PROGRESS": "0", "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == ["2", "2"]
    assert ranks[0]["run_id"] and ranks[1]["run_id"] is None  # only the main process talks to MLflow
    assert ranks[0]["digest"] == ranks[1]["digest"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter_digest(saved) == ranks[0]["digest"]

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == ranks[0]["run_id"]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == list(range(1, 7))
