"""The MLflow UI shows this project's runs as training runs: experiment kinds, and a real browser on a real server.

MLflow 3.17's UI opens an experiment in its GenAI view ("Evaluation runs", traces) unless told otherwise;
experiments the project creates or writes into are tagged ``mlflow.experimentKind=custom_model_development``
and the links it prints ask for the training view. The browser test needs the Debian ``chromium`` package
(installed by ``.ci/run``) and the ``playwright`` Python package, which drives it (no browser download).
"""

from __future__ import annotations

import os
import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from smolora_mlflow.tracking.experiments import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    experiment_id_for,
    run_ui_url,
)
from smolora_mlflow.workflow.runs import step_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def kind(experiment_id: str) -> str | None:
    return MlflowClient().get_experiment(experiment_id).tags.get(TAG_EXPERIMENT_KIND)


def test_experiments_created_or_written_into_are_tagged_for_model_development(tracking_uri, monkeypatch):
    client = MlflowClient()
    created = experiment_id_for("fresh")
    assert kind(created) == EXPERIMENT_KIND
    old = client.create_experiment("made-before")  # untagged, e.g. by an older smolora-mlflow
    assert kind(old) is None and experiment_id_for("made-before") == old and kind(old) == EXPERIMENT_KIND
    genai = client.create_experiment("agents", tags={TAG_EXPERIMENT_KIND: "genai_development"})
    assert experiment_id_for("agents") == genai and kind(genai) == "genai_development"  # a user's choice stays
    chosen = client.create_experiment("chosen-by-env")  # what `mlflow run --experiment-name` picks
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen)
    from smolora_mlflow.config import SmoloraConfig

    with step_run(SmoloraConfig(), "step", "evaluate") as run_id:
        pass
    assert client.get_run(run_id).info.experiment_id == chosen and kind(chosen) == EXPERIMENT_KIND


def _chromium_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return "Debian package `chromium` is not installed (.ci/run installs it: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the `playwright` Python package is not installed (pip install -e '.[dev]')"
    return None


@pytest.mark.slow
def test_run_page_opens_in_the_training_view_with_params_and_a_metric_chart(tmp_path, monkeypatch,
                                                                                demo_model_dir):
    """A real demo training run, a real `mlflow server` on its store, the run page in headless Chromium."""
    if why := _chromium_missing():  # CI installs both (.ci/run) and says so: there a missing browser fails
        (pytest.fail if os.environ.get("CI") or os.environ.get("SMOLORA_REQUIRE_BROWSER") else pytest.skip)(why)
    from conftest import TINY_TRAINING
    from playwright.sync_api import sync_playwright
    from servers import launch_mlflow_server

    from smolora_mlflow.train import SmoLoRA

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    MlflowClient(uri).search_experiments()  # the tables, before the server and the training both open the file
    server = launch_mlflow_server(uri, tmp_path / "artifacts", tmp_path / "server.log")  # starts while we train
    try:
        lora = SmoLoRA(**dict(TINY_TRAINING, base_model="smolora:demo", dataset="smolora:reviews", tracking_uri=uri,
                              experiment_name="smolora-ui", output_dir=str(tmp_path / "out"), eval_fraction=0.0,
                              checkpoint_models=False))
        lora.train()
        run = MlflowClient(uri).get_run(lora.run_id)
        mlflow.set_tracking_uri(None)
        assert MlflowClient(uri).get_experiment(run.info.experiment_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
        server.wait("/health", 180)
        with sync_playwright() as p:  # a fresh profile: no remembered GenAI / Model training choice
            browser = p.chromium.launch_persistent_context(str(tmp_path / "chromium"), executable_path=CHROMIUM,
                                                           headless=True, args=CHROMIUM_ARGS,
                                                           viewport={"width": 1400, "height": 1000})
            try:
                page = browser.new_page()
                page.goto(run_ui_url(server.url, run.info.experiment_id, run.info.run_id))
                page.get_by_text("lora_r", exact=True).first.wait_for(timeout=90_000)
                body = page.inner_text("body")
                assert "Evaluation runs" not in body and "Judges" not in body  # not the GenAI view
                assert "Parameters" in body and "Metrics" in body and "smolora-ui" in body
                assert "learning_rate" in body and run.data.params["learning_rate"] in body
                page.get_by_role("tab", name="Model metrics").click()
                chart = page.locator(".js-plotly-plot, canvas, svg.main-svg").first
                chart.wait_for(timeout=60_000)
                page.get_by_text("loss", exact=True).first.wait_for(timeout=30_000)
                page.screenshot(path=str(tmp_path / "run-metrics.png"))
            finally:
                browser.close()
    finally:
        server.stop()
