"""Semantic versions of registered versions (registry/semver.py) on a real SQLite registry.

Models are tiny pyfunc models that answer with their label, so a prediction tells which version loaded.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smolora_mlflow import constants as C
from smolora_mlflow import registry as R
from smolora_mlflow.cli import main
from smolora_mlflow.registry import semver as S

NAME = "reviews-lora"
BASE = {C.TAG_BASE_MODEL: "smolora:demo", C.TAG_BASE_MODEL_SHA256: "ab" * 32, C.TAG_TOKENIZER_SHA256: "cd" * 32,
        C.TAG_PROMPT_FORMAT: "plain", C.TAG_DATASET_FINGERPRINT: "fp-1"}
PARAMS = {"base_model": "smolora:demo", "lora_r": 8, "learning_rate": 2e-4, "output_dir": "outputs/a",
          "run_name": "a", "dataset": "smolora:reviews"}


class LabelModel(mlflow.pyfunc.PythonModel):
    def __init__(self, label: str):
        self.label = label

    def predict(self, model_input: list[str], params=None) -> list[str]:
        return [self.label for _ in model_input]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("semver-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tracking_uri, template_db, tmp_path, monkeypatch) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    experiment_id = MlflowClient().create_experiment("semver", artifact_location=str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return tracking_uri


def train_run(label: str, tags: dict | None = None, **params) -> str:
    """A run that looks like a smolora training run (recipe tags and params) with a LabelModel."""
    with mlflow.start_run() as run:
        mlflow.set_tags({**BASE, **(tags or {})})
        mlflow.log_params({**PARAMS, "run_name": label, "output_dir": f"outputs/{label}", **params})
        mlflow.pyfunc.log_model(name="model", python_model=LabelModel(label), pip_requirements=["mlflow"])
    return run.info.run_id


def semvers() -> dict[str, str]:
    client = MlflowClient()
    top = max(int(mv.version) for mv in client.get_registered_model(NAME).latest_versions)
    return {str(n): client.get_model_version(NAME, str(n)).tags.get(S.TAG_SEMVER) for n in range(1, top + 1)}


def test_semver_follows_what_changed_and_names_it(store):
    steps = [("first", {}, {}), ("rerun", {}, {}), ("lr", {}, {"learning_rate": 1e-3}),
             ("data", {C.TAG_DATASET_FINGERPRINT: "fp-2"}, {"learning_rate": 1e-3}),
             ("base", {C.TAG_BASE_MODEL_SHA256: "ef" * 32, C.TAG_DATASET_FINGERPRINT: "fp-2"}, {"learning_rate": 1e-3}),
             ("tok", {C.TAG_BASE_MODEL_SHA256: "ef" * 32, C.TAG_DATASET_FINGERPRINT: "fp-2",
                      C.TAG_TOKENIZER_SHA256: "00" * 32}, {"learning_rate": 1e-3}),
             ("fmt", {C.TAG_BASE_MODEL_SHA256: "ef" * 32, C.TAG_DATASET_FINGERPRINT: "fp-2",
                      C.TAG_TOKENIZER_SHA256: "00" * 32, C.TAG_PROMPT_FORMAT: "chat"}, {"learning_rate": 1e-3})]
    mvs = [R.register(train_run(label, tags, **params), NAME) for label, tags, params in steps]
    got = [(mv.tags[S.TAG_SEMVER], mv.tags[S.TAG_SEMVER_REASON].split(":")[0]) for mv in mvs]
    assert got == [("1.0.0", "first version"), ("1.0.1", "PATCH"), ("1.1.0", "MINOR"), ("1.2.0", "MINOR"),
                   ("2.0.0", "MAJOR"), ("3.0.0", "MAJOR"), ("4.0.0", "MAJOR")]
    reasons = [mv.tags[S.TAG_SEMVER_REASON] for mv in mvs]
    assert "learning_rate 0.0002 -> 0.001" in reasons[2] and "since version 2, 1.0.1" in reasons[2]
    assert C.TAG_DATASET_FINGERPRINT in reasons[3] and "learning_rate" not in reasons[3]
    assert C.TAG_BASE_MODEL_SHA256 in reasons[4] and C.TAG_TOKENIZER_SHA256 in reasons[5]
    assert C.TAG_PROMPT_FORMAT in reasons[6] and "plain -> chat" in reasons[6]
    # the output folder and run name differ in every run: not part of the recipe
    assert all("output_dir" not in r and "run_name" not in r for r in reasons)

    model = MlflowClient().get_registered_model(NAME)
    assert {a: str(v) for a, v in model.aliases.items()} == {
        "v1-0-0": "1", "v1-0-1": "2", "v1-1-0": "3", "v1-2-0": "4", "v2-0-0": "5", "v3-0-0": "6", "v4-0-0": "7"}
    assert str(R.resolve(NAME, "1.2.0").version) == "4"
    assert list(R.load(NAME, "1.1.0").predict(["x"])) == ["lr"]
    assert list(mlflow.pyfunc.load_model("models:/reviews-lora@v1-2-0").predict(["x"])) == ["data"]
    table = R.versions(NAME)
    assert list(table["semver"]) == ["1.0.0", "1.0.1", "1.1.0", "1.2.0", "2.0.0", "3.0.0", "4.0.0"]
    with pytest.raises(MlflowException, match="no version with semver 1.3.0; the highest is 4.0.0"):
        R.resolve(NAME, "1.3.0")


def test_override_must_be_greater_and_a_failed_one_writes_nothing(store):
    run = train_run("a")
    assert R.register(run, NAME, semver="2.5.0").tags[S.TAG_SEMVER] == "2.5.0"
    before = semvers()
    for bad, message in (("2.5.0", "not greater than 2.5.0"), ("1.9.9", "not greater than 2.5.0"),
                         ("2.5", "must be MAJOR.MINOR.PATCH")):
        with pytest.raises(MlflowException, match=message) as e:
            R.register(run, NAME, semver=bad)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"
        assert semvers() == before
    mv = R.register(train_run("b", learning_rate=1e-3), NAME)
    assert (str(mv.version), mv.tags[S.TAG_SEMVER]) == ("2", "2.6.0")
    assert R.register(run, NAME, semver="3.0.0").tags[S.TAG_SEMVER_REASON] == "set by --semver (override)"
    assert semvers() == {"1": "2.5.0", "2": "2.6.0", "3": "3.0.0"}


def test_concurrent_registrations_get_distinct_increasing_semvers(store):
    """Threads released together register the same name: MLflow numbers the versions, and every semver is
    what a one-at-a-time registration in that number order would have given."""
    runs = [train_run(f"t{i}", learning_rate=1e-3 if i % 3 == 0 else 2e-4) for i in range(6)]
    client = MlflowClient()
    client.create_registered_model(NAME)
    go, errors = threading.Barrier(len(runs)), []

    def worker(run_id: str) -> None:
        go.wait()
        try:
            R.register(run_id, NAME, client=MlflowClient())
        except Exception as e:  # reported below with the others
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    got = semvers()
    assert len(got) == 6 and len(set(got.values())) == 6
    # the same derivation done serially from the recorded recipes
    recipes = [S._recipe_of_version(client.get_model_version(NAME, str(n))) for n in range(1, 7)]
    expected, current = [], S.FIRST
    for n, recipe in enumerate(recipes):
        current = current if n == 0 else S.bump(current, recipes[n - 1], recipe)[0]
        expected.append(S.text(current))
    assert list(got.values()) == expected
    aliases = {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {S.alias(s): n for n, s in got.items()}


def test_cli_register_versions_transition_promote_and_serve_take_semvers(store, capsys):
    run = train_run("a")
    with mlflow.start_run(run_id=run):
        mlflow.log_metric(C.METRIC_EVAL_LOSS, 1.0)
    assert main(["register", run, "--name", NAME]) == 0
    assert main(["register", run, "--name", NAME, "--semver", "1.2.0"]) == 0
    out = capsys.readouterr().out
    assert "semver 1.0.0: first version" in out and f"models:/{NAME}@v1-2-0" in out
    assert main(["versions", NAME]) == 0
    table = capsys.readouterr().out
    assert "semver" in table.splitlines()[0] and "1.2.0" in table and "v1-2-0" not in table  # not twice
    with pytest.raises(MlflowException, match="names a semantic version"):
        R.set_alias(NAME, "v9-0-0", 1)
    assert main(["transition", NAME, "1.0.0", "Staging"]) == 0
    assert "version 1 is now in Staging" in capsys.readouterr().out
    assert main(["promote", NAME, "1.2.0"]) == 0
    assert "version 2: promoted to Production" in capsys.readouterr().out
    assert main(["register", run, "--name", NAME, "--semver", "1.1.0"]) == 2
    assert "not greater than 1.2.0" in capsys.readouterr().err
    for args in ([f"{NAME}@1.2.0"], [NAME, "--version", "1.2.0"]):
        assert main(["serve", *args, "--dry_run"]) == 0
        assert f"models:/{NAME}@v1-2-0" in capsys.readouterr().out
    assert list(mlflow.pyfunc.load_model(f"models:/{NAME}@v1-2-0").predict(["x"])) == ["a"]


def test_recipe_leaves_out_operational_params_and_records_the_tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    from smolora_mlflow.tracking.record import prompt_tags

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    tags = prompt_tags("plain", tok)
    assert len(tags[C.TAG_TOKENIZER_SHA256]) == 64 and tags == prompt_tags("plain", tok)
    run = type("Run", (), {"data": type("Data", (), {"params": {**{k: str(v) for k, v in PARAMS.items()},
                                                                 "sweep_trials": "4", "method": "dpo"},
                                                     "tags": {**BASE, **tags}})()})()
    recipe = S.recipe(run)
    assert recipe["major"][C.TAG_TOKENIZER_SHA256] == tags[C.TAG_TOKENIZER_SHA256]
    assert recipe["major"]["param.base_model"] == "smolora:demo"
    assert set(recipe["minor"]) == {"lora_r", "learning_rate", "method", C.TAG_DATASET_FINGERPRINT}
