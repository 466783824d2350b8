"""compare: every helper on three real tiny runs that differ only in LoRA rank."""

from __future__ import annotations

import math
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smolora_mlflow import compare

RANKS = (2, 4, 8)
STEPS = 6
EXPERIMENT = "compare-tests"
PROMPTS = ["The food was", "Our waiter"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, smolora_cache):
    """Three finished runs (lora_r 2, 4, 8) in a private store; the r=4 run has a registered version."""
    from smolora_mlflow import SmoLoRA, SmoloraConfig

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    base = SmoloraConfig(max_steps=STEPS, max_length=32, max_samples=64, per_device_train_batch_size=4,
                         learning_rate=0.005, lora_dropout=0.0, lora_target_modules=["all-linear"],
                         eval_fraction=0.2, eval_steps=3, sample_prompts=PROMPTS, sample_max_new_tokens=4,
                         experiment_name=EXPERIMENT, tracking_uri=uri)
    run_ids = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOLORA_PROGRESS", "0")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        for r in RANKS:
            result = SmoLoRA(config=base.replace(lora_r=r, output_dir=str(root / f"r{r}"))).train()
            run_ids[r] = result.run_id
        client.create_registered_model("cmp-model")
        source = client.get_run(run_ids[4]).info.artifact_uri + "/adapter"
        client.create_model_version("cmp-model", source, run_id=run_ids[4])
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "client": client, "run_ids": run_ids, "root": root}


@pytest.fixture
def client(sweep):
    return sweep["client"]


@pytest.fixture
def ids(sweep):
    return [sweep["run_ids"][r] for r in RANKS]


def test_runs_frame_has_one_row_per_run_with_params_and_metrics(client, sweep):
    df = compare.runs_frame(EXPERIMENT, client=client)
    assert len(df) == 3 and set(df["run_id"]) == set(sweep["run_ids"].values())
    assert set(df["lora_r"]) == set(RANKS) and pd.api.types.is_integer_dtype(df["lora_r"])
    for col in ("run_name", "status", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
                "max_steps", "final_loss", "best_loss", "final_eval_loss", "best_eval_loss",
                "final_eval_perplexity", "trainable_percent", "adapter_size_bytes", "duration_s",
                "registered_version"):
        assert col in df.columns, col
    assert (df["status"] == "FINISHED").all() and (df["max_steps"] == STEPS).all()
    by_r = df.sort_values("lora_r")
    assert by_r["trainable_percent"].is_monotonic_increasing and by_r["trainable_percent"].is_unique
    assert by_r["adapter_size_bytes"].is_monotonic_increasing and by_r["trainable_params"].is_unique
    assert (df["best_loss"] <= df["final_loss"]).all() and (df["duration_s"] > 0).all()
    assert df["final_eval_perplexity"].tolist() == pytest.approx([math.exp(v) for v in df["final_eval_loss"]])
    registered = dict(zip(df["lora_r"], df["registered_version"], strict=True))
    assert registered == {2: "", 4: "cmp-model/1", 8: ""}
    assert df["start_time"].is_monotonic_increasing  # oldest first by default


def test_runs_frame_filter_params_and_tracking_uri(sweep):
    df = compare.runs_frame(EXPERIMENT, "params.lora_r = '4'", params=["lora_r", "seed"], with_best=False,
                            tracking_uri=sweep["uri"])
    assert df["lora_r"].tolist() == [4] and "seed" in df and "best_loss" not in df and "max_steps" not in df
    assert compare.runs_frame(EXPERIMENT, "params.lora_r = '99'", client=sweep["client"]).empty


def test_metric_history_is_long_format_with_every_step(client, ids, sweep):
    df = compare.metric_history(ids, "loss", client=client)
    assert list(df.columns) == ["run_id", "run_name", "step", "value", "timestamp"]
    for rid in ids:
        assert df.loc[df["run_id"] == rid, "step"].tolist() == list(range(1, STEPS + 1))
    evals = compare.metric_history(ids[0], "eval_loss", client=client)
    assert evals["step"].tolist() == [3, STEPS] and str(evals["timestamp"].dt.tz) == "UTC"


def test_param_diff_keeps_only_what_differs(client, ids):
    diff = compare.param_diff(ids, client=client)
    assert list(diff.columns) == ["lora_r"]  # output_dir differs too, but it is bookkeeping
    assert diff.index.tolist() == ids and diff["lora_r"].tolist() == list(RANKS)
    assert "output_dir" in compare.param_diff(ids, ignore=(), client=client).columns
    assert compare.run_labels(ids, client=client) == {rid: f"lora_r={r}" for rid, r in zip(ids, RANKS, strict=True)}


def test_generations_side_by_side(client, ids):
    df = compare.generations(ids, client=client)
    assert df.index.name == "prompt" and df.index.tolist() == PROMPTS
    assert list(df.columns) == [f"lora_r={r}" for r in RANKS]
    assert df.attrs["steps"] == dict.fromkeys(df.columns, STEPS)
    assert df.notna().all().all() and all(isinstance(v, str) for v in df.to_numpy().ravel())
    assert compare.generations(ids, step=3, client=client).attrs["steps"] == dict.fromkeys(df.columns, 3)
    with pytest.raises(MlflowException, match=r"no generations at step 4.*\[3, 6\]"):
        compare.generations(ids, step=4, client=client)


def test_plot_loss_curves_draws_one_labelled_line_per_run(client, ids):
    fig = compare.plot_loss_curves(ids, client=client)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 3 and all(len(line.get_xdata()) == STEPS for line in ax.get_lines())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"lora_r={r}" for r in RANKS]
    fig.savefig(__import__("io").BytesIO(), format="png")  # renders without pyplot
    # Onto a caller's axes, another metric.
    other = Figure()
    target = other.add_subplot()
    assert compare.plot_loss_curves(ids, key="eval_loss", ax=target, client=client) is other
    assert len(target.get_lines()) == 3 and target.get_ylabel() == "eval_loss"


def test_plot_loss_vs_trainable(client, ids, sweep):
    fig = compare.plot_loss_vs_trainable(ids, metric="eval_loss", client=client)
    (ax,) = fig.axes
    (points,) = ax.get_lines()
    trainable = [client.get_run(rid).data.metrics["trainable_params"] for rid in ids]
    assert list(points.get_xdata()) == trainable
    assert [t.get_text() for t in ax.texts] == [f"lora_r={r}" for r in RANKS]


def test_best_run_picks_the_lowest_final_metric(client, ids, sweep):
    table = compare.runs_frame(EXPERIMENT, client=client, with_best=False)
    best = compare.best_run(EXPERIMENT, client=client)
    assert best["run_id"] == table.loc[table["final_eval_loss"].idxmin(), "run_id"] == best.name
    worst = compare.best_run(EXPERIMENT, "eval_loss", higher_is_better=True, client=client)
    assert worst["run_id"] == table.loc[table["final_eval_loss"].idxmax(), "run_id"]
    only = compare.best_run(EXPERIMENT, filter="params.lora_r = '2'", tracking_uri=sweep["uri"])
    assert only["run_id"] == sweep["run_ids"][2] and only["lora_r"] == 2


def test_clear_errors(client, ids):
    with pytest.raises(MlflowException, match=r"Experiment 'compare-test' does not exist.*'compare-tests'"):
        compare.runs_frame("compare-test", client=client)
    with pytest.raises(MlflowException, match=r"Run id\(s\) 'f00' do not exist"):
        compare.plot_loss_curves([ids[0], "f00"], client=client)
    with pytest.raises(MlflowException, match=r"logged metric 'eval_los'\. Did you mean 'eval_loss'"):
        compare.metric_history(ids, "eval_los", client=client)
    with pytest.raises(MlflowException, match=r"metric 'acc'"):
        compare.best_run(EXPERIMENT, "acc", client=client)
    with pytest.raises(MlflowException, match=r"never logged metric .eval_los."):
        compare.plot_loss_vs_trainable(ids, metric="eval_los", client=client)
    with pytest.raises(MlflowException, match="empty"):
        compare.param_diff([], client=client)
    bare = client.create_experiment("compare-bare")
    run = client.create_run(bare)
    with pytest.raises(MlflowException, match="No FINISHED run"):
        compare.best_run("compare-bare", client=client)
    client.set_terminated(run.info.run_id)
    with pytest.raises(MlflowException, match="has no generations.json.*eval_fraction"):
        compare.generations(run.info.run_id, client=client)
    assert compare.runs_frame(bare, client=client)["run_id"].tolist() == [run.info.run_id]  # id works too


def test_import_is_light():
    code = ("import sys, smolora_mlflow.compare; heavy = {'torch', 'transformers', 'peft', 'trl', 'matplotlib'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
