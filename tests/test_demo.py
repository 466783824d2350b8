"""The README's demo command, as `make demo` runs it: offline, on the built-in model and dataset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


BAR_START = re.compile(r"^(?P<desc>[^\r\n|]*?)\s*(?<![\d.])0%\|")  # a tqdm bar's first frame: "desc:   0%|"


def noise(output: str) -> list[str]:
    """What the demo should not print: warnings, and any progress bar shown more than once (checkpoint logging,
    weight loading and saving, evaluations inside training each used to add their own)."""
    frames = [f.strip() for f in re.split(r"[\r\n]+", output) if f.strip()]
    warnings = [f for f in frames if "WARNING" in f or "Warning:" in f]
    starts = Counter(m["desc"].strip() for f in frames if (m := BAR_START.match(f)))
    return warnings + [f"progress bar {desc or '(training)'!r} shown {n} times" for desc, n in starts.items()
                       if n > 1 or desc in ("Loading weights:", "Writing model shards:")]


def test_demo_command_trains_evaluates_logs_and_registers(tmp_path, tracking_uri, smolora_cache):
    """`make demo` with its progress bars on, as a user sees it: its steps, the training and evaluation bars,
    the summary, and nothing else (no MLflow warning about torch's +cpu label, no bar per checkpoint)."""
    env = {k: v for k, v in os.environ.items() if k != "SMOLORA_PROGRESS"}
    cmd = [sys.executable, "-m", "smolora_mlflow", "run", "--config", str(REPO / "configs" / "demo.yaml"),
           "--output_dir", str(tmp_path / "outputs")]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "registered      smolora-demo version 1" in proc.stderr + proc.stdout
    assert noise(proc.stdout + proc.stderr) == [], proc.stderr[-6000:]
    steps = [line for line in proc.stderr.splitlines() if line.startswith("==> [")]
    assert [s.split("]")[0] for s in steps] == ["==> [1", "==> [2", "==> [3", "==> [4"]
    assert "100%|" in proc.stderr and "evaluating: 100%|" in proc.stderr  # the bars on the long work stay

    client = mlflow.MlflowClient()
    version = client.get_model_version("smolora-demo", "1")
    train_run = client.get_run(version.run_id)
    assert train_run.info.status == "FINISHED"
    losses = [m.value for m in client.get_metric_history(version.run_id, "loss")]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3  # it learned
    model = mlflow.pyfunc.load_model("models:/smolora-demo/1")
    out = model.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 8})
    assert isinstance(out["generated_text"][0], str)
