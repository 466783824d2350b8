"""`smolora sweep --backend ray`: Ray Tune trials in parallel worker processes, with the Optuna backend's record."""

from __future__ import annotations

import mlflow
import pytest

from smolora_mlflow import constants as C
from smolora_mlflow.cli import main

ray = pytest.importorskip("ray", reason="Ray Tune is an optional extra: pip install -e '.[ray]' (dev has it)")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


@pytest.mark.slow
def test_ray_sweep_runs_trials_in_parallel_workers_and_registers_the_best(tracking_uri, tmp_path, capsys):
    """Local Ray, 2 workers, 4 tiny trials: one FINISHED parent, 4 FINISHED nested trial runs of which some ran
    at the same time, the parent's record as with Optuna, the best trial registered and promoted."""
    argv = ["sweep", "--backend", "ray", "--sweep_workers", "2", "--sweep_trial_cpus", "1",
            "--max_steps", "2", "--max_samples", "24", "--max_length", "32", "--eval_fraction", "0.25",
            "--lora_dropout", "0", "--sample_prompts", "The food was", "--sample_max_new_tokens", "2",
            "--sweep_trials", "4", "--sweep_space", "lora_r=choice:2|4,learning_rate=log:1e-3..2e-2",
            "--experiment_name", "ray-sw", "--registered_model_name", "ray-sw", "--output_dir", str(tmp_path / "out"),
            "--pip_requirements", "torch,transformers,mlflow", "--promote"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert "sweep: done" in capsys.readouterr().out
    assert not ray.is_initialized()  # the local instance it started is stopped again
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("ray-sw").experiment_id
    (parent,) = client.search_runs([exp], f"tags.`{C.TAG_STEP}` = 'sweep'")
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep_backend"] == "ray" and parent.data.params["sweep_workers"] == "2"
    assert parent.data.params["sweep_space.lora_r"] == "choice:2|4" and parent.data.params["sweep_direction"] == "min"
    trials = client.search_runs([exp], f"tags.`{C.TAG_SWEEP_RUN_ID}` = '{pid}'")
    assert len(trials) == 4
    assert all(t.data.tags["mlflow.parentRunId"] == pid and t.info.status == "FINISHED" for t in trials)
    # numbered 0..3 like Optuna's trials, each once (Tune's random hex trial ids once gave two trials one number)
    assert sorted(int(t.data.tags[C.TAG_SWEEP_TRIAL]) for t in trials) == [0, 1, 2, 3] == sorted(
        m.step for m in client.get_metric_history(pid, "eval_loss"))
    assert sorted(t.data.tags["mlflow.runName"] for t in trials) == [f"trial-{n}" for n in range(4)]
    spans = [(t.info.start_time, t.info.end_time) for t in trials]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans  # parallel
    values = {t.info.run_id: t.data.metrics["eval_loss"] for t in trials}
    best = min(values, key=values.get)
    assert parent.data.tags[C.TAG_SWEEP_BEST_RUN_ID] == best
    assert client.get_run(pid).data.metrics[C.METRIC_SWEEP_BEST] == pytest.approx(values[best])
    mv = client.get_model_version("ray-sw", "1")
    assert mv.run_id == best and mv.current_stage == "Production"
    assert mlflow.pyfunc.load_model("models:/ray-sw@production").predict(
        {"prompt": ["The food was"]}, params={"max_new_tokens": 2}) is not None
