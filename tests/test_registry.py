"""Registry: lineage on register, stages mirrored to aliases, gated promotion, rollback, history.

Real SQLite stores (the `tracking_uri` fixture) and, marked slow, a real `mlflow server`. Models are
tiny pyfunc models that answer with their label, so a prediction tells which version was loaded.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from servers import start_mlflow_server

from smolora_mlflow import constants as C
from smolora_mlflow import registry as R

NAME = "reviews-lora"
SHA = "ab" * 32


class LabelModel(mlflow.pyfunc.PythonModel):
    """Answers every prompt with its label, so predictions identify the version."""

    def __init__(self, label: str):
        self.label = label

    def predict(self, model_input: list[str], params=None) -> list[str]:
        return [f"{self.label}:{x}" for x in model_input]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow database: migrations cost seconds per fresh database."""
    path = tmp_path_factory.mktemp("registry-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tracking_uri, template_db, tmp_path, monkeypatch) -> str:
    """`tracking_uri`, pre-migrated, with an experiment whose artifacts live under this test's tmp_path."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    experiment_id = MlflowClient().create_experiment("registry", artifact_location=str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return tracking_uri


def train_run(label: str, eval_loss: float, *, card: str | None = None, **metrics: float):
    """A run that looks like a smolora training run and logs a LabelModel; returns (run_id, info)."""
    with mlflow.start_run() as run:
        mlflow.set_tags({
            C.TAG_BASE_MODEL: "smolora:demo", C.TAG_BASE_MODEL_SHA256: SHA, C.TAG_DATASET: "smolora:reviews",
            C.TAG_DATASET_FINGERPRINT: f"fp-{label}", C.TAG_VERSION_PREFIX + "torch": "2.13",
            "unrelated": "not copied",
        })
        mlflow.log_params({"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                           "lora_target_modules": "q_proj,v_proj", "learning_rate": 2e-4})
        for step, loss in enumerate([2.0, 1.5, 1.25]):
            mlflow.log_metric(C.METRIC_LOSS, loss, step=step)
        mlflow.log_metrics({C.METRIC_TRAIN_LOSS: 1.5, C.METRIC_EVAL_LOSS: eval_loss,
                            C.METRIC_EVAL_PERPLEXITY: math.exp(eval_loss), **metrics})
        info = mlflow.pyfunc.log_model(name="model", python_model=LabelModel(label), pip_requirements=["mlflow"])
    if card is not None:
        d = Path(f"card-{label}")
        d.mkdir()
        (d / "README.md").write_text(card, encoding="utf-8")
        MlflowClient().log_model_artifacts(info.model_id, str(d))
    return run.info.run_id, info


def registered(*eval_losses: float, **metrics: float) -> list[str]:
    """Register one version per eval loss (labels v1, v2, ...); return their version numbers."""
    return [str(R.register(train_run(f"v{i}", loss, **metrics)[0], NAME).version)
            for i, loss in enumerate(eval_losses, 1)]


def stages() -> dict[str, str]:
    return {str(mv.version): mv.current_stage for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}


def aliases() -> dict[str, str]:
    """The aliases but the semver ones (``v1-0-0``, tests/test_semver.py checks those)."""
    return {k: str(v) for k, v in MlflowClient().get_registered_model(NAME).aliases.items()
            if not re.fullmatch(r"v\d+-\d+-\d+", k)}


def predict(uri: str) -> list[str]:
    return list(mlflow.pyfunc.load_model(uri).predict(["hi"]))


def assert_stage_uris_agree(stage: str) -> None:
    """`models:/name/Stage` and `models:/name@stage` load the same version."""
    assert predict(f"models:/{NAME}/{stage}") == predict(f"models:/{NAME}@{stage.lower()}")


def snapshot() -> tuple:
    client = MlflowClient()
    mvs = sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda mv: int(mv.version))
    return [(str(mv.version), mv.current_stage, mv.description, dict(mv.tags)) for mv in mvs], aliases()


def hist() -> list[tuple[int, str, str]]:
    return list(R.history(NAME)[["version", "from", "to"]].itertuples(index=False, name=None))


# ---------------------------------------------------------------------------------------------------
# register


def test_register_three_versions_with_lineage(store):
    card = "---\nlicense: apache-2.0\n---\n# reviews-lora v1\n\nA LoRA adapter for review replies.\n"
    run1, _ = train_run("v1", 0.9, card=card)
    run2, info2 = train_run("v2", 0.8)
    run3, info3 = train_run("v3", 0.7)
    mv1 = R.register(run1, NAME, tags={"team": "nlp"})  # a bare run id
    mv2 = R.register(f"runs:/{run2}/model", NAME)
    mv3 = R.register(info3.model_uri, NAME, description="Hand-written note")  # models:/m-...
    assert [str(mv.version) for mv in (mv1, mv2, mv3)] == ["1", "2", "3"]
    assert MlflowClient().get_registered_model(NAME).description.startswith("LoRA fine-tunes")
    assert (mv2.run_id, mv2.source, mv3.run_id) == (run2, info2.model_uri, run3)
    assert mv2.tags[R.TAG_MODEL_ID] == info2.model_id

    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert tags[R.TAG_RUN_ID] == run1 and tags["team"] == "nlp"
    assert tags[C.TAG_BASE_MODEL] == "smolora:demo" and tags[C.TAG_BASE_MODEL_SHA256] == SHA
    assert tags[C.TAG_DATASET_FINGERPRINT] == "fp-v1" and tags[C.TAG_VERSION_PREFIX + "torch"] == "2.13"
    assert "unrelated" not in tags and "smolora.param.learning_rate" not in tags
    assert {k: tags[R.PARAM_TAG_PREFIX + k] for k in R.LINEAGE_PARAMS} == {
        "lora_r": "8", "lora_alpha": "16", "lora_dropout": "0.05", "lora_target_modules": "q_proj,v_proj"}
    metrics = {k: float(tags[R.METRIC_TAG_PREFIX + k]) for k in R.KEY_METRICS}
    assert metrics == pytest.approx({"train_loss": 1.5, "eval_loss": 0.9, "eval_perplexity": math.exp(0.9),
                                     "loss": 1.25})  # `loss` is the last logged value

    assert MlflowClient().get_model_version(NAME, "1").description.startswith("# reviews-lora v1")
    summary = MlflowClient().get_model_version(NAME, "2").description
    assert "smolora:demo" in summary and "smolora:reviews" in summary and "r=8" in summary and run2 in summary
    assert MlflowClient().get_model_version(NAME, "3").description == "Hand-written note"
    assert predict(f"models:/{NAME}/3") == ["v3:hi"]

    copy = R.register(f"models:/{NAME}/1", "reviews-lora-copy")
    assert (copy.source, copy.run_id, copy.tags[R.TAG_MODEL_ID]) == (mv1.source, run1, mv1.tags[R.TAG_MODEL_ID])
    assert copy.description.startswith("# reviews-lora v1")  # the card travels with the model


def test_register_a_version_mlflow_registered_itself(store):
    """MLflow's own registration keeps no smolora.model_id tag; the logged model is found from the source."""
    card = "# reviews-lora by MLflow\n\nRegistered with mlflow.register_model.\n"
    run_id, info = train_run("v1", 0.9, card=card)
    mlflow.register_model(info.model_uri, "registered-by-mlflow")
    copy = R.register("models:/registered-by-mlflow/1", NAME)
    assert (copy.source, copy.run_id, copy.tags[R.TAG_MODEL_ID]) == (info.model_uri, run_id, info.model_id)
    assert copy.description.startswith("# reviews-lora by MLflow")


def test_register_rejects_unknown_sources(store):
    with pytest.raises(MlflowException, match="expected runs:/"):
        R.register("not-a-model", NAME)
    with pytest.raises(MlflowException, match="does not exist") as e:
        R.register("0" * 32, NAME)
    assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    run_id, _ = train_run("v1", 0.9)
    with pytest.raises(MlflowException, match="no logged model named 'other'.*model"):
        R.register(f"runs:/{run_id}/other", NAME)


# ---------------------------------------------------------------------------------------------------
# transitions


def test_walk_through_every_stage_moves_the_alias(store):
    v1, v2 = registered(0.9, 0.8)
    steps = [("Staging", {"staging": v1}), ("Production", {"production": v1}), ("Archived", {}),
             ("production", {"production": v1})]  # stage names are case-insensitive
    for stage, expected_aliases in steps:
        mv = R.transition(NAME, v1, stage, reason=f"to {stage}", user="ci")
        assert mv.current_stage == stage.capitalize() and stages()[v1] == stage.capitalize()
        assert aliases() == expected_aliases
    assert_stage_uris_agree("Production")
    assert predict(f"models:/{NAME}@production") == ["v1:hi"]

    R.transition(NAME, v2, "Staging")
    R.transition(NAME, v2, None)  # Staging -> None is allowed and drops the alias
    assert stages()[v2] == "None" and aliases() == {"production": v1}


def test_archive_existing_archives_previous_holder_and_records_it(store):
    v1, v2, v3 = registered(0.9, 0.8, 0.7)
    R.transition(NAME, v1, "Production")
    R.transition(NAME, v2, "Production")
    assert stages() == {v1: "Archived", v2: "Production", v3: "None"} and aliases() == {"production": v2}
    assert hist() == [(1, "None", "Production"), (1, "Production", "Archived"), (2, "None", "Production")]
    assert R.history(NAME)["reason"][1] == "replaced by version 2"
    assert_stage_uris_agree("Production")

    # Without archiving, two versions share the stage; the alias follows the one MLflow's stage URI
    # resolves to (the highest), whatever the order of the moves.
    R.transition(NAME, v3, "Production", archive_existing=False)
    R.transition(NAME, v1, "Production", archive_existing=False)
    assert stages() == {v1: "Production", v2: "Production", v3: "Production"}
    assert aliases() == {"production": v3}
    assert_stage_uris_agree("Production")
    R.transition(NAME, v3, "Archived")
    assert aliases() == {"production": v2}
    assert_stage_uris_agree("Production")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("1", "None"), "INVALID_PARAMETER_VALUE", "from Production to None.*Staging, Archived"),
        (("1", "Production"), "INVALID_PARAMETER_VALUE", "already there"),
        (("2", "Prod"), "INVALID_PARAMETER_VALUE", "'Prod'.*None, Staging, Production, Archived"),
        (("99", "Staging"), "RESOURCE_DOES_NOT_EXIST", "no version 99.*1, 2"),
        (("x1", "Staging"), "INVALID_PARAMETER_VALUE", "'x1'"),
    ],
)
def test_bad_transitions_raise_and_change_nothing(store, args, code, message):
    registered(0.9, 0.8)
    R.transition(NAME, "1", "Production")
    before = snapshot()
    with pytest.raises(MlflowException, match=message) as e:
        R.transition(NAME, *args)
    assert e.value.error_code == code
    assert snapshot() == before


def test_unknown_model_is_a_clear_error(store):
    registered(0.9)
    for call in (lambda: R.transition("nope", 1, "Staging"), lambda: R.promote("nope", 1),
                 lambda: R.rollback("nope"), lambda: R.versions("nope"), lambda: R.history("nope")):
        with pytest.raises(MlflowException, match=f"'nope' does not exist; known models: {NAME}") as e:
            call()
        assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_archived_cannot_go_back_to_none(store):
    (v1,) = registered(0.9)
    R.transition(NAME, v1, "Archived")
    with pytest.raises(MlflowException, match="from Archived to None.*Staging, Production"):
        R.transition(NAME, v1, "None")
    assert stages() == {v1: "Archived"}


# ---------------------------------------------------------------------------------------------------
# promotion, rollback, history


def promotion_tags(version: str) -> dict[str, str]:
    tags = MlflowClient().get_model_version(NAME, version).tags
    return {k.removeprefix(R.PROMOTION_TAG_PREFIX): v for k, v in tags.items()
            if k.startswith(R.PROMOTION_TAG_PREFIX)}


def test_gated_promotion_refuses_worse_and_accepts_better(store):
    v1, v2, v3, v4 = registered(0.9, 1.2, 0.7, 0.69)
    first = R.promote(NAME, v1)
    assert first.promoted and first.incumbent_version is None and first.candidate_value == 0.9
    assert promotion_tags(v1)["decision"] == "promoted" and promotion_tags(v1)["incumbent_version"] == "none"

    worse = R.promote(NAME, v2)
    assert not worse.promoted and (worse.incumbent_version, worse.incumbent_value) == (v1, 0.9)
    assert "does not beat" in worse.reason
    tags = promotion_tags(v2)
    assert (tags["decision"], tags["metric"], tags["stage"]) == ("rejected", "eval_loss", "Production")
    assert (float(tags["candidate_value"]), tags["incumbent_version"], float(tags["incumbent_value"])) == (
        1.2, v1, 0.9)
    assert stages() == {v1: "Production", v2: "None", v3: "None", v4: "None"}

    better = R.promote(NAME, v3, reason="lower eval loss")
    assert better.promoted and better.incumbent_version == v1 and "beats" in better.reason
    assert stages()[v3] == "Production" and stages()[v1] == "Archived" and aliases() == {"production": v3}
    assert promotion_tags(v3)["decision"] == "promoted"

    assert not R.promote(NAME, v4, min_delta=0.05).promoted  # 0.69 vs 0.7 is within min_delta
    assert R.promote(NAME, v4, to="staging").promoted  # nobody holds Staging
    assert aliases() == {"production": v3, "staging": v4}


def test_promotion_reads_run_metrics_and_honours_direction(store):
    v1, v2 = registered(0.9, 0.8, accuracy=0.5)
    MlflowClient().log_metric(MlflowClient().get_model_version(NAME, v2).run_id, "accuracy", 0.75)
    assert R.promote(NAME, v1, metric="accuracy", higher_is_better=True).promoted
    decision = R.promote(NAME, v2, metric="accuracy", higher_is_better=True)
    assert decision.promoted and decision.candidate_value == 0.75 and decision.incumbent_value == 0.5


def test_force_requires_reason_and_missing_metric_is_an_error(store):
    v1, v2 = registered(0.5, 0.9)
    R.promote(NAME, v1)
    before = snapshot()
    with pytest.raises(MlflowException, match="requires a `reason`"):
        R.promote(NAME, v2, force=True)
    with pytest.raises(MlflowException, match="no metric 'bleu'"):
        R.promote(NAME, v2, metric="bleu")
    with pytest.raises(MlflowException, match="Staging or Production"):
        R.promote(NAME, v2, to="Archived")
    assert snapshot() == before

    decision = R.promote(NAME, v2, force=True, reason="hotfix for a tokenizer bug")
    assert decision.promoted and decision.forced and "hotfix" in decision.reason
    assert promotion_tags(v2)["decision"] == "forced" and stages()[v2] == "Production"
    assert R.history(NAME).iloc[-1]["reason"] == "hotfix for a tokenizer bug"


def test_rollback_restores_previous_production(store):
    v1, v2 = registered(0.9, 0.8)
    with pytest.raises(MlflowException, match="no previous Production version"):
        R.rollback(NAME)
    R.transition(NAME, v1, "Production")
    with pytest.raises(MlflowException, match=r"no previous Production version.*: 1\)"):
        R.rollback(NAME)
    R.promote(NAME, v2)
    assert predict(f"models:/{NAME}@production") == ["v2:hi"]

    restored = R.rollback(NAME, reason="v2 is rude")
    assert str(restored.version) == v1 and stages() == {v1: "Production", v2: "Archived"}
    assert aliases() == {"production": v1}
    assert_stage_uris_agree("Production")
    assert predict(f"models:/{NAME}/Production") == ["v1:hi"]
    assert str(R.rollback(NAME).version) == v2  # rolling back a rollback rolls forward


def test_history_lists_every_transition_in_order(store):
    v1, v2 = registered(0.9, 0.8)
    R.transition(NAME, v1, "Staging", reason="smoke tests", user="alice")
    R.transition(NAME, v1, "Production", user="bob")
    R.transition(NAME, v2, "Staging")
    R.promote(NAME, v2)
    R.rollback(NAME)
    df = R.history(NAME)
    assert list(df.columns) == ["version", "from", "to", "at", "reason", "user"]
    assert hist() == [
        (1, "None", "Staging"), (1, "Staging", "Production"), (2, "None", "Staging"),
        (1, "Production", "Archived"), (2, "Staging", "Production"),
        (2, "Production", "Archived"), (1, "Archived", "Production"),
    ]
    assert df["at"].is_monotonic_increasing and str(df["at"].dt.tz) == "UTC"
    assert (df["reason"][0], df["user"][0], df["user"][1]) == ("smoke tests", "alice", "bob")
    assert df["reason"].iloc[-1] == "rollback from version 2 to 1"
    raw = [json.loads(v) for k, v in MlflowClient().get_model_version(NAME, v1).tags.items()
           if k.startswith(R.TRANSITION_TAG_PREFIX)]
    assert len(raw) == 4 and all(set(r) == {"from", "to", "at", "reason", "user"} for r in raw)


# ---------------------------------------------------------------------------------------------------
# aliases, loading, listing


def test_aliases_and_load(store):
    v1, v2 = registered(0.9, 0.8)
    R.transition(NAME, v1, "Production")
    R.set_alias(NAME, "champion", v2)
    assert aliases() == {"production": v1, "champion": v2}
    for key, label in [("Production", "v1"), ("production", "v1"), ("champion", "v2"), (2, "v2"),
                       ("1", "v1"), ("latest", "v2")]:
        assert list(R.load(NAME, key).predict(["hi"])) == [f"{label}:hi"], key
    assert list(R.load(NAME).predict(["hi"])) == ["v1:hi"]
    with pytest.raises(MlflowException, match="moved by transition"):
        R.set_alias(NAME, "Production", v2)
    with pytest.raises(MlflowException, match="nothing at 'Staging'.*champion"):
        R.load(NAME, "Staging")
    R.delete_alias(NAME, "champion")
    assert aliases() == {"production": v1}
    with pytest.raises(MlflowException, match="no alias 'champion'") as e:
        R.delete_alias(NAME, "champion")
    assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException, match="nothing at 'champion'"):
        R.load(NAME, "champion")


def test_versions_table(store):
    v1, v2 = registered(0.9, 0.8)
    R.promote(NAME, v1)
    R.promote(NAME, v2)
    R.set_alias(NAME, "champion", v2)
    df = R.versions(NAME)
    assert list(df["version"]) == [1, 2] and list(df["stage"]) == ["Archived", "Production"]
    assert list(df["aliases"]) == ["", "champion,production"]
    assert list(df["eval_loss"]) == [0.9, 0.8] and list(df["promotion"]) == ["promoted", "promoted"]
    assert df["created"].dt.tz is not None and df["description"][0].startswith("LoRA fine-tune of")
    text = R.format_versions(df)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split()[:4] == ["version", "semver", "stage", "aliases"]
    assert list(df["semver"]) == ["1.0.0", "1.1.0"]  # the dataset fingerprints differ (tests/test_semver.py)
    assert "champion,production" in lines[2] and "0.8" in lines[2]
    assert R.format_versions(df.iloc[0:0]) == "(no versions)"


def test_no_deprecation_warning_reaches_the_user(store):
    run_id, _ = train_run("v1", 0.9)
    run2, _ = train_run("v2", 0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v1 = str(R.register(run_id, NAME).version)
        v2 = str(R.register(run2, NAME).version)
        R.transition(NAME, v1, "Staging")
        R.transition(NAME, v1, "Production")
        R.promote(NAME, v2)
        R.rollback(NAME)
        R.versions(NAME)
        R.history(NAME)
        assert list(R.load(NAME, "Production").predict(["hi"])) == ["v1:hi"]


# ---------------------------------------------------------------------------------------------------
# concurrency


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from smolora_mlflow import registry
    run_id, name, ready, go = sys.argv[1:5]
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    version = registry.register(run_id, name).version
    for i in range(3):
        registry.transition(name, version, "Staging", reason=f"up {i}", archive_existing=False)
        registry.transition(name, version, "None", reason=f"down {i}")
    print(version)
""")


def test_concurrent_registration_and_transitions_lose_nothing(store, tmp_path):
    """Two processes released together each register a version, then move it up and down."""
    runs = [train_run(f"v{i}", 0.9)[0] for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, run_id, NAME, str(tmp_path / f"ready-{run_id}"),
                               str(tmp_path / "go")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run_id in runs]
    deadline = time.time() + 180
    while not all((tmp_path / f"ready-{r}").exists() for r in runs) and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out.strip())
    assert sorted(outs) == ["1", "2"]

    by_run = {mv.run_id: mv for mv in MlflowClient().search_model_versions(f"name='{NAME}'")}
    assert sorted(by_run) == sorted(runs) and all(by_run[r].tags[R.TAG_RUN_ID] == r for r in runs)
    df = R.history(NAME)
    for v in (1, 2):
        assert list(df[df["version"] == v]["reason"]) == [f"{d} {i}" for i in range(3) for d in ("up", "down")]
    assert stages() == {"1": "None", "2": "None"} and aliases() == {}


# ---------------------------------------------------------------------------------------------------
# the real thing: a tracking server, and the smolora flavor


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` on a free port with a SQLite store; its process group is always killed."""
    server = start_mlflow_server(f"sqlite:///{tmp_path / 's.db'}", tmp_path / "artifacts", tmp_path / "server.log",
                                 timeout=120)
    try:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            monkeypatch.setenv(var, server.url)
        monkeypatch.chdir(tmp_path)
        mlflow.set_tracking_uri(server.url)
        mlflow.set_registry_uri(server.url)
        yield server.url
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        server.stop()


def test_core_scenario_against_a_tracking_server(mlflow_server):
    run1, _ = train_run("v1", 0.9, card="# served card\n")
    run2, _ = train_run("v2", 1.1)
    run3, _ = train_run("v3", 0.7)
    v1, v2, v3 = (str(R.register(r, NAME).version) for r in (run1, run2, run3))
    assert (v1, v2, v3) == ("1", "2", "3")
    assert MlflowClient().get_model_version(NAME, v1).description == "# served card"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.transition(NAME, v1, "Staging")
        assert R.promote(NAME, v1).promoted
        assert not R.promote(NAME, v2).promoted
        assert R.promote(NAME, v3).promoted
    assert stages() == {v1: "Archived", v2: "None", v3: "Production"} and aliases() == {"production": v3}
    assert predict(f"models:/{NAME}/Production") == predict(f"models:/{NAME}@production") == ["v3:hi"]
    assert str(R.rollback(NAME).version) == v1
    assert_stage_uris_agree("Production")
    assert hist()[-2:] == [(3, "Production", "Archived"), (1, "Archived", "Production")]
    with pytest.raises(MlflowException, match="from Production to None") as e:
        R.transition(NAME, v1, "None")
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_smolora_flavor_stage_and_alias_uris_predict_the_same(store, demo_model_dir):
    flavor = pytest.importorskip("smolora_mlflow.flavor")
    if not hasattr(flavor, "log_model"):
        pytest.skip("smolora_mlflow.flavor.log_model is not written yet")
    with mlflow.start_run() as run:
        mlflow.set_tag(C.TAG_BASE_MODEL, "smolora:demo")
        flavor.log_model(name="model", model_dir=str(demo_model_dir), pip_requirements=["mlflow"])
    mv = R.register(run.info.run_id, NAME)
    R.transition(NAME, mv.version, "Production")
    by_stage = mlflow.pyfunc.load_model(f"models:/{NAME}/Production")
    by_alias = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    prompts = ["The product was", "Delivery took"]
    columns = by_stage.metadata.get_input_schema().input_names() if by_stage.metadata.signature else []
    data = pd.DataFrame({columns[0]: prompts}) if columns and columns[0] else prompts
    first, second = by_stage.predict(data), by_alias.predict(data)
    assert json.dumps(first, default=str, sort_keys=True) == json.dumps(second, default=str, sort_keys=True)
