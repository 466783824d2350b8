"""Published MLflow advisories (issue 22, item 10): no shell between a user's model name and a process, and no
artifact path that climbs out of its run or model.

CVE-2026-0596 was a command injection through a model URI: `smolora serve` runs its server (and `mlflow models
serve`) from an argv list and `os.execve`, never a shell. The test runs the real command in a real process with
names and URIs full of shell syntax and checks that nothing ran.
"""

from __future__ import annotations

import shlex

import pytest
from mlflow.exceptions import MlflowException

from smolora_mlflow.cli.main import main

RUN = "0123456789abcdef0123456789abcdef"
INJECTIONS = [
    "demo$(touch pwned1)`touch pwned2`;touch pwned3",  # a registered model name
    f"runs:/{RUN}/model;touch pwned4 `touch pwned5` $(touch pwned6)",  # a URI
]


def test_serve_never_hands_a_name_or_uri_to_a_shell(tracking_uri, tmp_path, capfd):
    for model in INJECTIONS:  # `smolora serve` in this process, its server process for real
        assert main(["serve", model, "-p", "1"]) in (1, 2)
        err = capfd.readouterr().err
        assert "Traceback" not in err and "smolora serve: " in err, err[-2000:]
        assert model.split("@")[0].split("/")[-1].split(";")[0] in err  # the error names the model
    assert not list(tmp_path.glob("pwned*"))


@pytest.mark.parametrize("model", INJECTIONS)
def test_every_serve_command_is_argv_with_the_name_intact(model, capsys):
    for env_manager in ("local", "virtualenv"):
        assert main(["serve", model, "--env_manager", env_manager, "--dry_run"]) == 0
        argv = shlex.split(capsys.readouterr().out.strip())
        assert model in argv or f"{model}@production" in " ".join(argv)
        assert not {"sh", "bash", "-c"} & set(argv)


@pytest.mark.parametrize("uri", [
    f"runs:/{RUN}/model/../../../secrets",
    f"runs:/{RUN}/../{RUN[::-1]}/model",
    "mlflow-artifacts:/1/%2e%2e/%2E%2E/model",
    f"runs:/{RUN}/model\\..\\..\\x",
])
def test_artifact_paths_that_climb_out_are_refused_naming_the_path(tracking_uri, tmp_path, uri, capsys):
    from smolora_mlflow import flavor, registry
    from smolora_mlflow.models import integrity, manifest

    for load in (manifest.resolve, integrity.open_verified, flavor.load_model,
                 lambda u: registry.register(u, "m")):
        with pytest.raises(MlflowException, match="contains '..'") as e:
            load(uri)
        assert repr(uri) in e.value.message and e.value.error_code == "INVALID_PARAMETER_VALUE"
    for argv in (["serve", uri, "--dry_run"], ["register", uri, "--name", "m"], ["predict", uri, "hi"]):
        assert main(argv) == 2
        assert "contains '..'" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was asked anything
