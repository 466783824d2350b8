"""Faults caused for real: a training process killed with SIGKILL resumes in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from smolora_mlflow.train.checkpoints import MARKER_FILE, read_run_id

pytestmark = pytest.mark.slow

ARGS = ["--max_steps", "12", "--save_steps", "3", "--max_length", "32", "--per_device_train_batch_size", "4",
        "--max_samples", "64", "--lora_dropout", "0", "--eval_fraction", "0", "--log_model", "false",
        "--registered_model_name", "none", "--experiment_name", "crash"]


def _train(out, env, *extra, **kw):
    cmd = [sys.executable, "-m", "smolora_mlflow", "train", *ARGS, "--output_dir", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _wait_for_checkpoint(out, step: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (out / f"checkpoint-{step}" / MARKER_FILE).is_file():
        assert proc.poll() is None, f"training ended before checkpoint-{step}: {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} after {timeout}s"
        time.sleep(0.05)


def test_sigkill_then_resume_continues_the_same_run(tmp_path, tracking_uri, smolora_cache):
    env = {**os.environ, "SMOLORA_PROGRESS": "0", "MLFLOW_TRACKING_URI": tracking_uri}
    # The reference: the same training, never interrupted.
    ref = _train(tmp_path / "ref", env)
    assert ref.wait(timeout=400) == 0, ref.stdout.read()[-3000:]

    out = tmp_path / "crashed"
    victim = _train(out, env)
    _wait_for_checkpoint(out, 6, victim)
    os.killpg(victim.pid, signal.SIGKILL)  # no chance to clean up, flush or end the run
    victim.wait(timeout=60)
    run_id = read_run_id(out / "checkpoint-6")
    assert run_id and mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"

    resumed = _train(out, env, "--resume", run_id)
    output = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, output[-3000:]

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 13)), steps  # every step once, none twice
    assert len(client.search_runs([run.info.experiment_id])) == 2  # the reference and this one: no third

    # the summary metric (registry tags, `smolora versions`) covers all 12 steps, not the 6 resumed ones
    ref_run = next(r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run_id)
    assert run.data.metrics["train_loss"] == pytest.approx(ref_run.data.metrics["train_loss"], rel=1e-5)

    want = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
