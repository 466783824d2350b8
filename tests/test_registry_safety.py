"""Registry safety (issue 22): a name acts only on itself, an operation writes all or nothing, bad numbers exit 2.

Real SQLite stores (a pre-migrated copy per test). Versions point at an empty folder: these tests are about
the registry's records, not the models' files. Failures are injected by a real MlflowClient whose Nth write
raises, over the real store: everything else (reads, the undo's writes) is MLflow's own.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from smolora_mlflow import registry as R
from smolora_mlflow.cli.main import main
from smolora_mlflow.cli.parser import parse_args

DECOY = "smolora-demo"
ATTACK = "smolora-demo' AND name != '"  # the issue's name: with the filter built by hand it matched smolora-demo
NAMES = [
    ATTACK,
    'x" OR name != "',
    "bob's-model",
    'both \' and " quotes',  # no filter string can spell it: looked up version by version
    "back\\slash\\",
    "100%_x",
    "naïve-模型 🚀",
    "a@b",
    "$(touch pwned);`id`",
]
METRIC = "smolora.metric.eval_loss"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("registry-safety") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # migrations once per module
    return path


@pytest.fixture
def store(tracking_uri, template_db, tmp_path) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    (tmp_path / "model").mkdir()
    return tracking_uri


def _source() -> str:
    return (Path.cwd() / "model").as_uri()


def _versions(name: str, *eval_losses: float) -> None:
    for loss in eval_losses:
        R.register(_source(), name, tags={METRIC: repr(loss)})


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _state() -> dict:
    """Everything an operation may write: per model its aliases and, per version, stage, tags, description."""
    client = MlflowClient()
    out = {}
    for model in client.search_registered_models():
        versions = R.core.all_versions(client, model.name)
        out[model.name] = (dict(model.aliases), model.description,
                           {v.version: (v.current_stage, dict(v.tags), v.description) for v in versions})
    return out


def _decoy() -> dict:
    """smolora-demo with v1 then v2 in Production: a rollback would give Production back to v1."""
    _versions(DECOY, 0.9, 0.8)
    R.transition(DECOY, 1, "Production")
    R.transition(DECOY, 2, "Production")
    return _state()[DECOY]


# ---------------------------------------------------------------------------------------------------
# 1. a name acts only on itself


def test_the_issues_attack_moves_nothing_of_the_other_model(store):
    decoy = _decoy()
    _versions(ATTACK, 0.5)
    code, out, _ = _cli("versions", ATTACK)
    assert code == 0 and len(out.strip().splitlines()) == 2  # the header and its own version 1
    code, _, err = _cli("rollback", ATTACK)
    assert code == 2 and "no previous Production version" in err  # its own (empty) history
    assert _state()[DECOY] == decoy
    assert str(R.resolve(DECOY, "production").version) == "2"


@pytest.mark.parametrize("name", NAMES)
def test_every_command_works_on_any_name_mlflow_stores(store, name):
    decoy = _decoy()
    _versions(name, 0.9, 0.8)
    assert [v.name for v in R.core.all_versions(MlflowClient(), name)] == [name, name]

    assert _cli("transition", name, "1", "Production", "--reason", "first")[0] == 0
    code, out, err = _cli("promote", name, "2")
    assert code == 0 and "promoted to Production" in out, err
    code, out, err = _cli("rollback", name, "--reason", "v2 regressed")
    assert code == 0 and "Production is now version 1" in out, err
    code, out, err = _cli("versions", name, "--history", "true")
    assert code == 0, err
    assert len(out.split("\n\n")[0].splitlines()) == 3  # the header and its own two versions
    assert R.versions(name)[["version", "stage"]].values.tolist() == [[1, "Production"], [2, "Archived"]]
    assert R.history(name)[["version", "to"]].values.tolist() == [
        [1, "Production"], [1, "Archived"], [2, "Production"], [2, "Archived"], [1, "Production"]]

    R.set_alias(name, "champion", 2)
    assert str(R.resolve(name, "champion").version) == "2"
    R.delete_alias(name, "champion")
    assert "champion" not in MlflowClient().get_registered_model(name).aliases

    # `smolora serve NAME` pins the same version MLflow's models:/ URI names
    from smolora_mlflow.cli.commands import serve_uri
    from smolora_mlflow.models import manifest

    uri = serve_uri(parse_args(["serve", name, "--alias", "production"]))  # NAME@ALIAS is a shorthand
    assert manifest.resolve(uri).uri == f"models:/{name}/1"
    assert _state()[DECOY] == decoy
    assert not Path("pwned").exists()


# ---------------------------------------------------------------------------------------------------
# 2. all of an operation's writes, or none


_WRITES = {"transition_model_version_stage", "set_model_version_tag", "delete_model_version_tag",
           "set_registered_model_alias", "delete_registered_model_alias", "create_registered_model",
           "create_model_version"}


class FailingClient(MlflowClient):
    """The real client over the real store, except that its `fail_at`-th write raises (once)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at, self.writes = fail_at, 0

    def __getattribute__(self, attr):
        method = super().__getattribute__(attr)
        if attr not in _WRITES:
            return method

        def write(*args, **kwargs):
            self.writes += 1
            if self.writes == self.fail_at:
                raise MlflowException(f"injected failure of write {self.writes} ({attr})")
            return method(*args, **kwargs)

        return write


def _each_failure_leaves_the_store_as_it_was(operation) -> int:
    """Fail write 1, 2, ... of ``operation(client)`` until it needs no more; returns how many it makes."""
    before = _state()
    for n in range(1, 100):
        client = FailingClient(n)
        try:
            operation(client)
        except MlflowException as e:
            assert "injected failure" in str(e)
            assert _state() == before, f"write {n} failed and the store changed"
            continue
        return n - 1
    raise AssertionError("the operation never finished")


def test_transition_promote_rollback_write_everything_or_nothing(store):
    _versions("m", 0.9, 0.8, 0.7)
    R.transition("m", 1, "Production")
    R.transition("m", 2, "Staging")
    # v2 Staging -> Production: stage (v1 archived with it), two history tags, both aliases
    assert _each_failure_leaves_the_store_as_it_was(
        lambda c: R.transition("m", 2, "Production", client=c)) == 5
    # v3 beats v2: the transition's four writes and nine decision tags
    assert _each_failure_leaves_the_store_as_it_was(lambda c: R.promote("m", 3, client=c)) == 13
    assert MlflowClient().get_model_version("m", "3").current_stage == "Production"
    assert _each_failure_leaves_the_store_as_it_was(lambda c: R.rollback("m", client=c)) == 4
    assert str(R.resolve("m", "production").version) == "2"  # the holder before v3


def test_register_and_set_alias_write_everything_or_nothing(store):
    # the model, the version with its tags, then its semver reason and semver tags and its semver alias
    assert _each_failure_leaves_the_store_as_it_was(
        lambda c: R.register(_source(), "fresh", tags={"team": "nlp"}, client=c)) == 5
    (mv,) = R.core.all_versions(MlflowClient(), "fresh")
    assert mv.tags["team"] == "nlp"
    assert _each_failure_leaves_the_store_as_it_was(
        lambda c: R.set_alias("fresh", "champion", mv.version, client=c)) == 1


def test_everything_is_checked_before_the_first_write(store):
    _versions("m", 0.9, 0.8)
    R.transition("m", 1, "Production")
    before = _state()
    with pytest.raises(MlflowException, match="`reason` must be text of at most 5000"):
        R.transition("m", 2, "Production", reason="x" * 6000)
    with pytest.raises(MlflowException, match="Version tag 'big'"):
        R.register(_source(), "m", tags={"big": "x" * 100_001})
    assert _state() == before


# ---------------------------------------------------------------------------------------------------
# 8. numbers a store cannot hold, and a gate no gain passes


HUGE = "99999999999999999999999"


@pytest.mark.parametrize(("argv", "message"), [
    (["transition", "m", HUGE, "Staging"], f"Model 'm' has no version {HUGE}; its versions are: 1."),
    (["promote", "m", HUGE], f"Model 'm' has no version {HUGE}; its versions are: 1."),
    (["transition", "m", "2147483648", "Staging"], "Model 'm' has no version 2147483648; its versions are: 1."),
    (["predict", f"models:/m/{HUGE}", "hi"], f"Version {HUGE} in 'models:/m/{HUGE}' is out of range"),
    (["serve", "m", "--version", HUGE], "is out of range: versions are 1 to 2147483647"),
])
def test_a_huge_version_number_exits_2_with_a_message(store, argv, message):
    _versions("m", 0.9)
    code, _, err = _cli(*argv)
    assert code == 2, err
    assert message in err and "Python int" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_min_delta_must_be_finite(store, value, capsys):
    for command in (["promote", "m", "1"], ["run", "--registered_model_name", "m", "--promote"]):
        assert main([*command, f"--min_delta={value}"]) == 2
        assert f"--min_delta: must be a finite number >= 0, got '{value}'" in capsys.readouterr().err
    _versions("m", 0.9)
    with pytest.raises(MlflowException, match="`min_delta` must be a finite number"):
        R.promote("m", 1, min_delta=float(value))
