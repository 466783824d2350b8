"""The MLproject: every entry point's command parses with the CLI's parser, the environment files agree, a bad
`-P` fails before any work, and the real `mlflow run` runs the whole lifecycle on the demo."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smolora_mlflow.cli import CONFIG_COMMANDS, build_config, parse_args

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"model_uri": "0123456789abcdef0123456789abcdef"}  # for parameters without a default


def _project():
    from mlflow.projects._project_spec import load_project

    return load_project(str(ROOT))


def _argv(entry_point: str, params: dict[str, str] | None = None) -> list[str]:
    """The command `mlflow run` would execute for ``entry_point``, minus `python -m smolora_mlflow`."""
    ep = _project().get_entry_point(entry_point)
    values = {k: PLACEHOLDERS[k] for k, p in ep.parameters.items() if p.default is None}
    command = ep.compute_command({**values, **(params or {})}, storage_dir=None)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "smolora_mlflow"], command
    return argv[3:]


def test_project_declares_the_entry_points_and_conda_env():
    project = _project()
    assert project.name == "smolora-mlflow"
    from mlflow.projects import env_type

    assert project.env_type == env_type.CONDA and Path(project.env_config_path).name == "conda.yaml"
    assert set(project._entry_points) == {"main", "train", "evaluate", "register", "promote", "sweep"}


@pytest.mark.parametrize("entry_point", ["main", "train", "evaluate", "register", "promote", "sweep"])
def test_each_entry_point_command_parses(entry_point, monkeypatch):
    monkeypatch.chdir(ROOT)  # `mlflow run` runs the command in the project folder
    args = parse_args(_argv(entry_point))
    expected = {"main": "run"}.get(entry_point, entry_point)
    assert args.command == expected
    if args.command in CONFIG_COMMANDS:
        cfg = build_config(args)
        if args.config:  # the default recipe: the offline demo
            assert (cfg.base_model, cfg.dataset) == ("smolora:demo", "smolora:reviews")


def test_undeclared_params_become_config_options(monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = _argv("main", {"lora_r": "4", "max_steps": "3", "lora_target_modules": "q_proj,v_proj",
                          "promote": "true", "min_delta": "0.5"})
    args = parse_args(argv)
    cfg = build_config(args)
    assert (cfg.lora_r, cfg.max_steps, cfg.lora_target_modules) == (4, 3, ["q_proj", "v_proj"])
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert (args.promote, args.min_delta) == ("true", 0.5)
    assert (cfg.learning_rate, cfg.output_dir) == (recipe["learning_rate"], recipe["output_dir"])  # from the recipe


def test_environment_files_agree_with_pyproject():
    from mlflow.utils.environment import _PythonEnv

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    python_env = _PythonEnv.from_yaml(str(ROOT / "python_env.yaml"))
    assert sorted(conda_pip) == sorted(python_env.dependencies) == sorted(deps)
    # what MLflow builds from conda.yaml for --env-manager virtualenv/uv
    converted = _PythonEnv.from_conda_yaml(str(ROOT / "conda.yaml"))
    assert sorted(converted.dependencies) == sorted(deps) and converted.python.startswith("3.11")
    assert python_env.python == "3.11"


def _mlflow_run(tmp_path: Path, params: dict[str, str], entry_point: str = "main", timeout: int = 600):
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "SMOLORA_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return res, time.perf_counter() - start, uri


@pytest.mark.slow
@pytest.mark.parametrize(("param", "expected"), [
    ("lora_r=abc", ["lora_r", "'abc'", "an integer"]),
    ("nope=1", ["--nope", "'1'", "not a config field"]),
])
def test_bad_param_fails_before_any_work(tmp_path, smolora_cache, param, expected):
    import mlflow

    key, value = param.split("=")
    res, elapsed, uri = _mlflow_run(tmp_path, {key: value, "output_dir": str(tmp_path / "out")}, timeout=300)
    assert res.returncode != 0
    for text in expected:
        assert text in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr.split("=== Running command")[-1]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"  # only the run `mlflow run` made
    # The entry point's command ran for seconds (a tiny demo training takes minutes): it loaded nothing.
    assert (runs[0].info.end_time - runs[0].info.start_time) / 1000 < 30
    assert elapsed < 120, elapsed
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mlflow_run_main_trains_evaluates_registers_and_promotes(tmp_path, smolora_cache):
    import mlflow

    params = {"max_steps": 4, "max_samples": 64, "max_length": 32, "per_device_train_batch_size": 4,
              "eval_steps": 0, "save_steps": 0, "sample_max_new_tokens": 4, "promote": "true",
              "output_dir": tmp_path / "out", "pip_requirements": "torch,transformers,safetensors,tokenizers"}
    res, _, uri = _mlflow_run(tmp_path, {k: str(v) for k, v in params.items()})
    assert res.returncode == 0, res.stderr[-5000:]
    assert "smolora run: done" in res.stdout
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.project.entryPoint"] == "main"
    assert parent.data.params["max_steps"] == "4" and "eval_loss" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags.get("smolora.step", "train") for r in children) == ["evaluate", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    mv = client.get_model_version("smolora-demo", "1")
    assert mv.current_stage == "Production" and mv.run_id == parent.data.tags["smolora.train_run_id"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/smolora-demo@production")
        out = model.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 4})
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert isinstance(out["generated_text"][0], str) and out["generated_text"][0]
