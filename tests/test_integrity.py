"""The integrity gate (models/integrity.py): every load path goes through it once, and what it refuses.

Real parts only: models saved and logged by the flavor into a per-test SQLite store and registry, tampered in
the artifact store the way an attacker with write access to it only could, loaded through every public load
path, and refused by `smolora serve`'s real launcher process.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import yaml
from conftest import free_port
from mlflow.exceptions import MlflowException

from smolora_mlflow import flavor
from smolora_mlflow import registry as R
from smolora_mlflow.models import integrity, manifest

PIP = ["torch", "transformers", "safetensors", "peft"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, demo_model_dir) -> Path:
    """A merged smolora model saved once; tests work on copies."""
    path = tmp_path_factory.mktemp("integrity") / "saved"
    flavor.save_model(path, demo_model_dir, pip_requirements=PIP)
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(saved, dst, symlinks=True)
    return dst


def _edit_mlmodel(root: Path, edit) -> None:
    doc = yaml.safe_load((root / "MLmodel").read_text())
    edit(doc)
    (root / "MLmodel").write_text(yaml.safe_dump(doc))


def _artifact_dir(info) -> Path:
    return Path(unquote(urlparse(mlflow.get_logged_model(info.model_id).artifact_location).path))


def _adapter(out: Path, base_dir: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    with quiet_upstream_deprecations():
        get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg).save_pretrained(out)
    return out


def test_every_load_path_goes_through_the_gate_exactly_once(tracking_uri, demo_model_dir, tmp_path):
    from smolora_mlflow.evaluation.loading import load_for_inference
    from smolora_mlflow.flavor import adapter_set
    from smolora_mlflow.serving.launcher import server_environment

    with mlflow.start_run():
        info = flavor.log_model("model", demo_model_dir, pip_requirements=PIP, registered_model_name="m")
        flavor.log_model("adapter", mode="adapter", adapter_dir=_adapter(tmp_path / "ad", demo_model_dir),
                         base_model=str(demo_model_dir), pip_requirements=PIP, registered_model_name="ad")
    local = str(_artifact_dir(info))
    set_dir = tmp_path / "set"
    paths = {  # load path -> (what it does, the gate runs it must cause)
        "flavor.load_model": (lambda: flavor.load_model("models:/m/1", device="cpu"), ["models:/m/1"]),
        "flavor._load_pyfunc": (lambda: mlflow.pyfunc.load_model(local), [local]),
        "registry.load": (lambda: R.load("m", "1"), ["models:/m/1"]),
        "evaluation": (lambda: load_for_inference("models:/m/1", device="cpu"), ["models:/m/1"]),
        "serve launcher": (lambda: server_environment("models:/m/1"), ["models:/m/1"]),
        "adapter-set fetch (save)": (lambda: adapter_set.save_adapter_set(set_dir, {"a": "models:/ad/1"},
                                                                          pip_requirements=PIP), ["models:/ad/1"]),
        "adapter set (load)": (lambda: mlflow.pyfunc.load_model(str(set_dir), model_config={"refresh_seconds": 0}),
                               [str(set_dir), "models:/ad/1"]),
    }
    for name, (load, want) in paths.items():
        with integrity.observe() as seen:
            result = load()
        assert seen == want, name
        if name == "serve launcher":  # and the server it would start unpickles nothing
            assert result["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
            assert result[integrity.ENV_DIGEST] == mlflow.MlflowClient().get_model_version("m", "1").tags[
                manifest.TAG]
    # What one gate run checked, by name, in order.
    assert integrity.open_verified("models:/m/1").checks == [
        "mlmodel", "loader", "digest", "hash-list", "links", "unlisted", "code", "files"]


class _Planted:
    """Unpickling it writes a marker file: the code an attacker plants in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('planted code ran')",)


def _point_loader_at_a_pickle(root: Path, marker: Path) -> None:
    """The issue's attack: python_function's loader -> a pickle; the smolora block (and its digest) untouched."""
    (root / "python_model.pkl").write_bytes(pickle.dumps(_Planted(marker)))

    def edit(doc):
        pyfunc = doc["flavors"]["python_function"]
        pyfunc.pop("data")  # MLflow hands that loader the model's root
        pyfunc.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl",
                      cloudpickle_version="3.1.1")
    _edit_mlmodel(root, edit)


def test_a_loader_pointed_at_a_pickle_is_refused_by_smolora_serve_and_the_pickle_never_runs(
        tracking_uri, demo_model_dir, tmp_path, monkeypatch):
    with mlflow.start_run():
        info = flavor.log_model("model", demo_model_dir, pip_requirements=PIP, registered_model_name="victim")
    # A model of format 1 keeps its old digest, which never covered python_function: the loader check refuses.
    _edit_mlmodel(_artifact_dir(info), lambda d: d["flavors"]["smolora"].pop("format_version"))
    mlflow.MlflowClient().set_model_version_tag("victim", "1", manifest.TAG, manifest.digest(
        yaml.safe_load((_artifact_dir(info) / "MLmodel").read_text())["flavors"]))
    marker = tmp_path / "pwned"
    _point_loader_at_a_pickle(_artifact_dir(info), marker)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run([sys.executable, "-m", "smolora_mlflow.serving", "models:/victim/1", "--port",
                           str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "MLmodel key `flavors.python_function.loader_module` is 'mlflow.pyfunc.model'" in proc.stderr
    assert not marker.exists()
    # Every other load path refuses it too, before MLflow imports that loader.
    with pytest.raises(MlflowException, match="flavors.python_function.loader_module"):
        R.load("victim", "1")
    assert not marker.exists()
    # The attack is real: MLflow's own loader (pickles allowed, its default), on the same folder, runs it.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with pytest.raises(Exception):  # noqa: B017 - the pickle builds None, not a model: what matters is the marker
        mlflow.pyfunc.load_model(str(_artifact_dir(info)))
    assert marker.read_text() == "planted code ran"


def test_the_digest_covers_the_python_function_block_and_the_shipped_code(tracking_uri, demo_model_dir):
    with mlflow.start_run():
        info = flavor.log_model("model", demo_model_dir, pip_requirements=PIP, registered_model_name="m")
    root = _artifact_dir(info)
    _edit_mlmodel(root, lambda d: d["flavors"]["python_function"]["env"].update(virtualenv="other_env.yaml"))
    with pytest.raises(MlflowException, match="registered model 'm' version 1 has digest"):
        integrity.open_verified("models:/m/1")
    # A code file changed and rehashed in the MLmodel: the code hashes are part of the digest.
    _edit_mlmodel(root, lambda d: d["flavors"]["python_function"]["env"].update(virtualenv="python_env.yaml"))
    integrity.open_verified("models:/m/1")
    code = root / "code" / "smolora_mlflow" / "constants.py"
    code.write_text(code.read_text() + "\nimport os  # planted\n")
    _edit_mlmodel(root, lambda d: d["flavors"]["smolora"]["code_sha256"].update(
        {"smolora_mlflow/constants.py": hashlib.sha256(code.read_bytes()).hexdigest()}))
    with pytest.raises(MlflowException, match="registered model 'm' version 1 has digest"):
        flavor.load_model("models:/m/1")


def test_code_folder_files_are_checked_in_a_plain_folder(saved, tmp_path):
    root = _copy(saved, tmp_path)
    planted = root / "code" / "transformers" / "__init__.py"  # first on sys.path once MLflow adds `code`
    planted.parent.mkdir()
    planted.write_text("raise SystemExit('planted')\n")
    with pytest.raises(MlflowException, match=r"files its manifest \(MLmodel `smolora.code_sha256`\) does not "
                                              r"list: \['transformers/__init__.py'\]"):
        integrity.open_verified(root)
    shutil.rmtree(planted.parent)
    code = root / "code" / "smolora_mlflow" / "constants.py"
    code.write_text(code.read_text() + "\n# edited\n")
    with pytest.raises(MlflowException, match=r"Model file `.*smolora_mlflow/constants.py` does not match"):
        mlflow.pyfunc.load_model(str(root))
    # Python's own bytecode caches are not the model's files: a fresh process may write them.
    shutil.copy(saved / "code" / "smolora_mlflow" / "constants.py", code)
    (root / "code" / "smolora_mlflow" / "__pycache__").mkdir()
    (root / "code" / "smolora_mlflow" / "__pycache__" / "constants.cpython-311.pyc").write_bytes(b"cache")
    assert integrity.open_verified(root).checks[-2:] == ["code", "files"]


def _link_outside(root: Path, tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("{{ 'the content of a file outside the model folder' }}")
    template = root / "chat_template.jinja"
    template.unlink()
    template.symlink_to(secret)
    return secret


def test_a_symlink_leaving_the_folder_is_refused_at_save(demo_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(demo_model_dir, src)
    _link_outside(src, tmp_path)
    with pytest.raises(MlflowException, match=r"`chat_template.jinja` is a symbolic link to `.*secret.txt`, "
                                              "outside the folder") as e:
        flavor.save_model(tmp_path / "out", src, pip_requirements=PIP)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and not (tmp_path / "out").exists()
    adapter = _adapter(tmp_path / "ad", demo_model_dir)
    (tmp_path / "weights.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(MlflowException, match="`adapter_model.safetensors` is a symbolic link"):
        flavor.save_model(tmp_path / "out2", mode="adapter", adapter_dir=adapter, base_model=str(demo_model_dir),
                          pip_requirements=PIP)


def test_a_symlink_leaving_the_folder_is_refused_at_load(saved, tmp_path):
    """The issue's case: chat_template.jinja -> a file outside, MLmodel rehashed, no model_id to follow."""
    root = _copy(saved, tmp_path)
    secret = _link_outside(root / "model", tmp_path)
    _edit_mlmodel(root, lambda d: (d.pop("model_id", None), d["flavors"]["smolora"]["file_sha256"].update(
        {"chat_template.jinja": hashlib.sha256(secret.read_bytes()).hexdigest()})))
    for load in (lambda: flavor.load_model(str(root)), lambda: mlflow.pyfunc.load_model(str(root))):
        with pytest.raises(MlflowException, match=r"`model/chat_template.jinja` is a symbolic link to "
                                                  r"`.*secret.txt`, outside the folder") as e:
            load()
        assert e.value.error_code == "INVALID_STATE"
    # A link that stays inside the folder is no escape.
    (root / "model" / "chat_template.jinja").unlink()
    shutil.copy(saved / "model" / "chat_template.jinja", root / "model" / "template.real")
    (root / "model" / "chat_template.jinja").symlink_to("template.real")
    _edit_mlmodel(root, lambda d: d["flavors"]["smolora"]["file_sha256"].update(
        {"chat_template.jinja": hashlib.sha256((root / "model" / "template.real").read_bytes()).hexdigest(),
         "template.real": hashlib.sha256((root / "model" / "template.real").read_bytes()).hexdigest()}))
    assert "links" in integrity.open_verified(root).checks


@pytest.mark.parametrize("hashes", [None, {}], ids=["missing", "empty"])
def test_an_empty_or_missing_hash_list_is_refused(saved, tmp_path, hashes):
    root = _copy(saved, tmp_path)
    (root / "model" / "added_tokens.json").write_text('{"<planted>": 99}')  # what the hash list would catch

    def edit(doc):
        block = doc["flavors"]["smolora"]
        block.pop("file_sha256") if hashes is None else block.update(file_sha256=hashes)
    _edit_mlmodel(root, edit)
    for load in (lambda: flavor.load_model(str(root)), lambda: mlflow.pyfunc.load_model(str(root))):
        with pytest.raises(MlflowException, match=rf"MLmodel key `flavors.smolora.file_sha256` is {hashes}, but "
                                                  "every smolora model records"):
            load()
