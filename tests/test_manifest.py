"""The manifest digest: kept on the run, the LoggedModel and the registered version, out of the artifact
store's reach, and checked when a model is loaded by models:/ or runs:/ URI (real SQLite stores)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smolora_mlflow import flavor
from smolora_mlflow import registry as R
from smolora_mlflow.models import manifest

PIP = ["torch", "transformers", "safetensors"]
NAME = "reviews"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def logged(tracking_uri, demo_model_dir):
    with mlflow.start_run() as run:
        info = flavor.log_model("model", demo_model_dir, pip_requirements=PIP, registered_model_name=NAME)
    return run.info.run_id, info


def _artifact_dir(info) -> Path:
    return Path(unquote(urlparse(mlflow.get_logged_model(info.model_id).artifact_location).path))


def _tamper(model_dir: Path, *, drop_hashes: bool = False) -> None:
    """What someone with write access to the artifact store only can do: new weights, hashes to match."""
    weights = model_dir / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # zero the last 16 floats of the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    block = mlmodel["flavors"]["smolora"]
    if drop_hashes:
        block.pop("file_sha256")
    else:
        block["file_sha256"]["model.safetensors"] = hashlib.sha256(bytes(data)).hexdigest()
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def test_digest_is_recorded_on_the_run_the_logged_model_and_the_version(logged):
    run_id, info = logged
    client = MlflowClient()
    want = manifest.digest(info.flavors)
    assert client.get_run(run_id).data.tags[manifest.run_tag("model")] == want
    assert client.get_logged_model(info.model_id).tags[manifest.TAG] == want
    assert client.get_model_version(NAME, "1").tags[manifest.TAG] == want
    # registry.register copies it onto a new version, whichever way the model is named
    for source in (f"runs:/{run_id}/model", info.model_uri):
        mv = R.register(source, "copies")
        assert mv.tags[manifest.TAG] == want


@pytest.mark.parametrize("drop_hashes", [False, True], ids=["hashes-rewritten", "hashes-removed"])
def test_rewritten_weights_and_hashes_are_refused_naming_the_version(logged, tmp_path, drop_hashes):
    run_id, info = logged
    R.set_alias(NAME, "champion", 1)
    _tamper(_artifact_dir(info), drop_hashes=drop_hashes)
    # Loaded as a plain folder, it is compared with the LoggedModel its MLmodel names.
    with pytest.raises(MlflowException, match=f"logged model {info.model_id} has digest"):
        flavor.load_model(str(_artifact_dir(info)), device="cpu")
    refusals = {
        f"models:/{NAME}/1": f"registered model '{NAME}' version 1",
        f"models:/{NAME}@champion": f"registered model '{NAME}' version 1",
        f"runs:/{run_id}/model": f"run {run_id}",
        info.model_uri: f"logged model {info.model_id}",
    }
    for i, (uri, who) in enumerate(refusals.items()):
        (tmp_path / f"dl-{i}").mkdir()
        with pytest.raises(MlflowException, match=f"manifest .* of {re.escape(who)}.* has digest") as err:
            flavor.load_model(uri, dst_path=str(tmp_path / f"dl-{i}"))
        assert err.value.error_code == "INVALID_STATE"
    with pytest.raises(MlflowException, match=f"registered model '{NAME}' version 1"):
        R.load(NAME, "champion")
    # mlflow.pyfunc.load_model hands the flavor a folder; it follows the MLmodel's model_id to the record.
    with pytest.raises(MlflowException, match=f"logged model {info.model_id}"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")


def test_models_logged_before_the_digest_load_with_a_warning(logged, caplog):
    run_id, info = logged
    client = MlflowClient()
    client.delete_tag(run_id, manifest.run_tag("model"))
    client.delete_logged_model_tag(info.model_id, manifest.TAG)
    client.delete_model_version_tag(NAME, "1", manifest.TAG)
    with caplog.at_level(logging.WARNING, logger="smolora_mlflow.models.manifest"):
        model, _ = flavor.load_model(f"models:/{NAME}/1", device="cpu")
        R.load(NAME, "1")
    assert model is not None
    assert f"registered model '{NAME}' version 1 has no manifest digest on record" in caplog.text
    assert R.register(f"runs:/{run_id}/model", "later").tags.get(manifest.TAG) is None


@pytest.mark.slow
def test_smolora_serve_refuses_a_tampered_version_before_serving(logged, tracking_uri):
    _, info = logged
    _tamper(_artifact_dir(info))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run([sys.executable, "-m", "smolora_mlflow", "serve", NAME, "--version", "1", "-p", "1"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"of registered model '{NAME}' version 1 has digest" in proc.stderr
    assert "Uvicorn running" not in proc.stderr
