"""`smolora sweep`: Optuna trials as nested runs under one parent, the best registered and promoted."""

from __future__ import annotations

import mlflow
import pytest

from smolora_mlflow import compare
from smolora_mlflow import constants as C
from smolora_mlflow.cli import main
from smolora_mlflow.config import ConfigError
from smolora_mlflow.workflow.sweep import parse_space


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")


def test_search_space_is_parsed_and_every_problem_reported():
    space = parse_space({"lora_r": "choice:4|8", "learning_rate": "log:1e-4..1e-2", "lora_dropout": "float:0..0.1"})
    assert space == {"lora_r": ("choice", [4, 8]), "learning_rate": ("log", (1e-4, 1e-2)),
                     "lora_dropout": ("float", (0.0, 0.1))}
    with pytest.raises(ConfigError) as e:
        parse_space({"lora_rank": "choice:4", "learning_rate": "log:0..1", "output_dir": "choice:a"})
    assert len(e.value.problems) == 3 and "lora_rank" in e.value.problems[0]
    # Fields every trial sets itself cannot be searched (they used to crash cfg.replace with a TypeError).
    with pytest.raises(ConfigError, match="run_name.*not a searchable") as e:
        parse_space({"run_name": "choice:a|b", "run_tags": "choice:x"})
    assert len(e.value.problems) == 2


def test_sweep_runs_nested_trials_and_registers_the_best(tracking_uri, tmp_path, capsys):
    argv = ["sweep", "--max_steps", "3", "--max_samples", "40", "--max_length", "32", "--eval_fraction", "0.2",
            "--lora_dropout", "0", "--sample_prompts", "The food was", "--sample_max_new_tokens", "2",
            "--sweep_trials", "3", "--sweep_space", "lora_r=choice:2|4,learning_rate=log:1e-3..2e-2",
            "--experiment_name", "sw", "--registered_model_name", "sw", "--output_dir", str(tmp_path / "out"),
            "--pip_requirements", "torch,transformers,mlflow", "--promote"]
    assert main(argv) == 0
    assert "sweep: done" in capsys.readouterr().out
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sw").experiment_id
    (parent,) = client.search_runs([exp], f"tags.`{C.TAG_STEP}` = 'sweep'")
    pid = parent.info.run_id
    assert parent.data.params["sweep_space.lora_r"] == "choice:2|4" and parent.data.params["sweep_direction"] == "min"
    trials = client.search_runs([exp], f"tags.`{C.TAG_SWEEP_RUN_ID}` = '{pid}'")
    assert len(trials) == 3
    assert all(t.data.tags["mlflow.parentRunId"] == pid and t.info.status == "FINISHED" for t in trials)
    values = {t.info.run_id: t.data.metrics["eval_loss"] for t in trials}
    best = min(values, key=values.get)
    assert parent.data.tags[C.TAG_SWEEP_BEST_RUN_ID] == best
    assert [m.step for m in client.get_metric_history(pid, "eval_loss")] == [0, 1, 2]
    assert client.get_run(pid).data.metrics[C.METRIC_SWEEP_BEST] == pytest.approx(values[best])

    table = compare.sweep_trials(pid)
    assert table["run_id"].iloc[0] == best and table["best"].tolist() == [True, False, False]
    assert set(table["lora_r"]) <= {2, 4} and table["eval_loss"].is_monotonic_increasing

    mv = client.get_model_version("sw", "1")
    assert mv.run_id == best and float(mv.tags[C.METRIC_TAG_PREFIX + "eval_loss"]) == pytest.approx(values[best])
    assert mv.current_stage == "Production"
