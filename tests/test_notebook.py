"""notebooks/compare_runs.ipynb: stored clean, and runs top to bottom on a real kernel against a private store."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"
KERNEL = "smolora-test"


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_stored_without_outputs_and_defines_nothing():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    for source in _code(nb):
        python = "\n".join(line for line in source.splitlines() if not line.startswith("%"))
        defined = [n for n in ast.walk(ast.parse(python))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defined, f"the notebook defines logic: {source[:80]}"
    text = "\n".join(_code(nb))
    for needed in ("%matplotlib inline", "SMOLORA_NB_STEPS", "MLFLOW_TRACKING_URI", "compare.runs_frame",
                   "compare.plot_loss_curves", "compare.plot_loss_vs_trainable", "compare.generations",
                   "compare.best_run", "registry.versions", "registry.promote", "method in (\"sft\", \"dpo\")",
                   "rewards/accuracies"):
        assert needed in text, needed


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernel spec for this very interpreter, so the notebook imports the package under test."""
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    install(kernel_name=KERNEL, display_name=KERNEL, prefix=str(prefix))
    spec = (prefix / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json").read_text()
    assert sys.executable in spec or Path(sys.executable).name in spec
    return KERNEL


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, kernel_name, smolora_cache):
    from nbclient import NotebookClient

    workdir = tmp_path / "nb"
    workdir.mkdir()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "SMOLORA_NB_STEPS": "4",
           "SMOLORA_NB_RANKS": "2,4,8", "SMOLORA_NB_MAX_SAMPLES": "48", "SMOLORA_NB_EXPERIMENT": "nb-test",
           "SMOLORA_NB_SWEEP_TRIALS": "2",
           "SMOLORA_NB_MODEL_NAME": "nb-model", "SMOLORA_PROGRESS": "0", "SMOLORA_CACHE": str(smolora_cache),
           "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PYTHONPATH": os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")])}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on the first error

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    headers = ("<th>lora_r</th>", "<th>lora_alpha</th>", "<th>learning_rate</th>", "<th>final_eval_loss</th>",
               "<th>trainable_percent</th>", "<th>adapter_size_bytes</th>", "<th>registered_version</th>")
    assert any(all(h in table for h in headers) for table in html), "the runs table is missing"
    assert any("<th>lora_r=2</th>" in table and "<th>lora_r=8</th>" in table for table in html), "generations"
    assert any("<th>aliases</th>" in table and "Production" in table for table in html), "registry versions"
    assert any("<th>params.method</th>" in table and "dpo" in table and "eval_rewards/accuracies" in table
               for table in html), "the SFT-vs-DPO table"
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 4  # each figure shown once

    # What the notebook did is in the store it was pointed at, and its files stayed in its folder.
    from smolora_mlflow import compare, registry

    runs = compare.runs_frame("nb-test", tracking_uri=uri, with_best=False)
    assert sorted(runs["lora_r"]) == [2, 4, 8] and (runs["max_steps"] == 4).all()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = registry.versions("nb-model", client=client)
    assert versions["stage"].tolist() == ["Production"] and versions["aliases"].tolist() == ["production"]
    best = runs.loc[runs["final_eval_loss"].idxmin()]
    assert versions["run_id"].tolist() == [best["run_id"]] and best["registered_version"] == "nb-model/1 (Production)"
    assert (workdir / "mlruns").is_dir() and (workdir / "outputs" / "compare" / "r8" / "adapter").is_dir()

    # The Optuna sweep: one parent run in its own experiment, its trials nested under it, read back best first.
    assert any("<th>trial</th>" in table and "<th>best</th>" in table for table in html), "the sweep's trials"
    sweep_exp = client.get_experiment_by_name("nb-test-optuna")
    parents = client.search_runs([sweep_exp.experiment_id], "tags.`smolora.step` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = compare.sweep_trials(parents[0].info.run_id, tracking_uri=uri)
    assert len(trials) == 2 and trials["best"].tolist() == [True, False]
    assert (trials["status"] == "FINISHED").all()
