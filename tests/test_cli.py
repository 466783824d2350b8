"""The `smolora` command line: every command end to end on the demo model, --help, errors and exit codes.

Two tiny trainings (`smolora run` and `smolora train`) fill one template MLflow store per module; each test
copies it into its own `tracking_uri` store, so registry commands never see another test's changes. Most
commands run in-process through `main(argv)`; a few run as real subprocesses (`python -m smolora_mlflow`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from servers import launch_server

from smolora_mlflow.cli import build_config, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
PIP = "torch,transformers,safetensors,tokenizers"
TINY = ["--max_steps", "4", "--max_samples", "64", "--max_length", "32", "--per_device_train_batch_size", "4",
        "--eval_steps", "0", "--save_steps", "0", "--sample_max_new_tokens", "4", "--pip_requirements", PIP]
COMMANDS = ["run", "train", "evaluate", "register", "transition", "promote", "rollback", "versions", "predict",
            "serve"]
PROMPTS = ["The food was", "Our waiter"]


@dataclass
class Template:
    db: Path
    pipeline_out: str
    train_out: str
    parent_run_id: str
    train_run_id: str  # the pipeline's training run
    eval_run_id: str
    cmd_train_run_id: str  # the run of `smolora train`
    merged_dir: Path


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _field(summary: str, key: str) -> str:
    line = next(ln for ln in summary.splitlines() if ln.strip().startswith(key))
    return line.strip()[len(key):].split()[0]


@pytest.fixture(scope="module")
def template(tmp_path_factory, smolora_cache) -> Template:
    """`smolora run --promote` (registers and promotes version 1) and `smolora train` (version 2)."""
    import mlflow

    root = tmp_path_factory.mktemp("cli-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "SMOLORA_PROGRESS": "0"}.items():
            mp.setenv(key, value)
        mp.chdir(root)
        mp.setenv("MLFLOW_EXPERIMENT_ID", "")  # so that whatever MLflow exports here is undone afterwards
        mp.delenv("MLFLOW_EXPERIMENT_ID")
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            code, run_out, run_err = _run_main(["run", "--config", DEMO, *TINY, "--promote",
                                                "--output_dir", str(root / "pipeline")])
            assert code == 0, run_err
            code, train_out, train_err = _run_main(["train", "--config", DEMO, *TINY, "--max_steps", "6",
                                                    "--output_dir", str(root / "train")])
            assert code == 0, train_err
            assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # nothing exported to later runs and subprocesses
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
    return Template(root / "mlflow.db", run_out, train_out, _field(run_out, "parent run"),
                    _field(run_out, "training run"), _field(run_out, "evaluation run"),
                    _field(train_out, "training run"), root / "pipeline" / "final_merged")


@pytest.fixture
def store(template, tracking_uri, tmp_path, monkeypatch) -> Template:
    """A private copy of the template store for this test."""
    shutil.copy(template.db, tmp_path / "mlflow.db")
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    return template


# ----------------------------------------------------------------------------------------------------
# help and import cost (subprocesses: what a user's shell sees)


def test_help_is_instant_and_imports_nothing_heavy():
    """Instant by construction, not by a stopwatch: neither the import nor any command's --help loads a heavy
    library (torch, transformers, mlflow... take seconds to import)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    heavy = "('torch', 'transformers', 'mlflow', 'peft', 'trl', 'pandas', 'datasets')"
    probe = ("import contextlib, io, sys, smolora_mlflow.cli as cli\n"
             f"print([m for m in {heavy} if m in sys.modules])\n"
             f"for command in [[], *([c] for c in {list(COMMANDS)!r})]:\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "        try:\n"
             "            code = cli.main([*command, '--help'])\n"
             "        except SystemExit as e:\n"
             "            code = e.code\n"
             "    assert code == 0 and 'usage: smolora' in out.getvalue(), (command, code)\n"
             f"print([m for m in {heavy} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]"], out.stdout
    res = subprocess.run([sys.executable, "-m", "smolora_mlflow", "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert res.returncode == 0 and "usage: smolora" in res.stdout, res.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"usage: smolora {command}" in text
    if command in ("run", "train", "evaluate"):
        # one option per config field, with the field's help text and type
        assert "--lora_r INT" in text and "LoRA rank, 1..1024." in text
        assert "--device {auto,cpu,cuda,mps}" in text


# ----------------------------------------------------------------------------------------------------
# config options and their errors (nothing runs)


def test_config_precedence_and_spellings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora_r: 4\nlearning_rate: 0.01\nmax_steps: 7\n")
    args = parse_args(["train", "--config", str(recipe), "--set", "learning_rate=0.02", "--set", "max_steps=9",
                       "--max-steps", "11", "--lora_target_modules", "q_proj,v_proj", "--packing"])
    cfg = build_config(args)
    assert (cfg.lora_r, cfg.learning_rate, cfg.max_steps) == (4, 0.02, 11)  # recipe < --set < --field
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.packing is True
    assert build_config(parse_args(["train", "--packing", "false", "--max_samples", "none"])).max_samples is None


@pytest.mark.parametrize(("argv", "expected"), [
    (["train", "--lora_r", "abc"], ["lora_r", "'abc'", "an integer"]),
    (["train", "--lora_r", "0"], ["lora_r", "1..1024", "0"]),
    (["run", "--nope", "1"], ["--nope", "'1'", "not a config field"]),
    (["run", "--lora_r", "abc", "--nope", "1"], ["lora_r", "'abc'", "--nope"]),  # every problem at once
    (["train", "--lora_rr", "4"], ["lora_rr", "Did you mean `lora_r`"]),
    (["run", "--set", "learning_rate=fast"], ["learning_rate", "'fast'", "a number"]),
    (["run", "--dataset_format", "xml"], ["dataset_format", "'xml'", "one of"]),
    (["run", "--promote", "maybe"], ["promote", "'maybe'", "true or false"]),
    (["run", "--config", "missing.yaml"], ["missing.yaml", "does not exist"]),
    (["promote", "m", "1", "--nope", "2"], ["--nope", "'2'"]),
])
def test_bad_options_fail_fast_with_one_line(argv, expected, tracking_uri, tmp_path, capsys, monkeypatch):
    import datasets
    import transformers

    def tripwire(*args, **kwargs):  # "fast" means before any model or dataset is read, whatever the machine's load
        raise AssertionError("a model or dataset was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tripwire)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tripwire)
    monkeypatch.setattr(datasets, "load_dataset", tripwire)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "mlflow.db").exists()  # MLflow was never touched


def test_run_refuses_promote_without_a_registered_name(tracking_uri, capsys):
    assert main(["run", "--promote", "--registered_model_name", "none"]) == 2
    assert "registered_model_name" in capsys.readouterr().err


def test_bad_option_in_a_real_process_exits_2_without_traceback():
    res = subprocess.run([sys.executable, "-m", "smolora_mlflow", "train", "--lora_r", "abc"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    assert res.stderr.strip() == ("smolora train: error: invalid config: `lora_r` must be an integer, got 'abc'.")


# ----------------------------------------------------------------------------------------------------
# workflow helpers


def test_log_trained_model_merges_again_when_the_merge_is_older_than_the_adapter(tmp_path):
    from smolora_mlflow.train.publish import _ensure_merged, log_trained_model

    class FakeLoRA:
        adapter_dir, merged_dir, saves = tmp_path / "adapter", tmp_path / "final_merged", 0

        def save(self):
            self.saves += 1
            return self.merged_dir

    lora = FakeLoRA()
    with pytest.raises(RuntimeError, match="call train"):
        log_trained_model(lora)
    lora.adapter_dir.mkdir()
    (lora.adapter_dir / "adapter_model.safetensors").write_bytes(b"new")
    assert _ensure_merged(lora) == lora.merged_dir and lora.saves == 1  # nothing merged yet
    lora.merged_dir.mkdir()
    (lora.merged_dir / "config.json").write_text("{}")
    weights = lora.merged_dir / "model.safetensors"
    weights.write_bytes(b"old")
    os.utime(weights, (1, 1))  # a merge from an earlier training in the same output_dir
    _ensure_merged(lora)
    assert lora.saves == 2
    os.utime(weights)  # merged after the adapter was written: reused
    _ensure_merged(lora)
    assert lora.saves == 2


# ----------------------------------------------------------------------------------------------------
# run and train


def test_run_pipeline_nests_steps_and_registers(store):
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(store.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{store.parent_run_id}'")
    assert {r.info.run_id for r in children} == {store.train_run_id, store.eval_run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.tags["smolora.train_run_id"] == store.train_run_id
    evaluated = client.get_run(store.eval_run_id).data.metrics
    assert parent.data.metrics["eval_loss"] == pytest.approx(evaluated["eval_loss"])
    mv = client.get_model_version("smolora-demo", "1")
    assert mv.run_id == store.train_run_id and mv.current_stage == "Production"
    assert float(mv.tags["smolora.metric.eval_loss"]) == pytest.approx(parent.data.metrics["eval_loss"])
    assert "smolora run: done" in store.pipeline_out
    assert "smolora-demo version 1" in store.pipeline_out and "promoted to Production" in store.pipeline_out


def test_train_logs_and_registers_the_model(store):
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(store.cmd_train_run_id)
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == "6"
    mv = client.get_model_version("smolora-demo", "2")
    assert mv.run_id == store.cmd_train_run_id and mv.current_stage == "None"
    assert "models:/m-" in _field(store.train_out, "model URI")
    flavor = mlflow.models.get_model_info("models:/smolora-demo/2").flavors["smolora"]
    assert flavor["training_run_id"] == store.cmd_train_run_id and flavor["mode"] == "merged"


# ----------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_a_registered_model_reproduces_the_pipeline_evaluation(store):
    import mlflow

    code, out, err = _run_main(["evaluate", "models:/smolora-demo/1"])
    assert code == 0, err
    run = mlflow.MlflowClient().get_run(_field(out, "evaluation run"))
    pipeline_eval = mlflow.MlflowClient().get_run(store.eval_run_id)
    # The training run's config gives the same held-out split, so the numbers match.
    assert run.data.metrics["eval_loss"] == pytest.approx(pipeline_eval.data.metrics["eval_loss"], rel=1e-5)
    assert run.data.metrics["eval_perplexity"] == pytest.approx(2.718281828 ** run.data.metrics["eval_loss"])
    assert run.data.tags["smolora.eval_split"].startswith("held-out 6 rows")
    assert "generations.json" in {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert out.count("  > ") == 3  # the sample generations


def test_evaluate_a_run_on_a_given_dataset(store, tmp_path):
    rows = [{"prompt": "The food was", "completion": " great."}, {"prompt": "Our waiter", "completion": " smiled."}]
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, out, err = _run_main(["evaluate", store.cmd_train_run_id, "--eval_dataset", str(data),
                                "--sample_prompts", "Hello"])
    assert code == 0, err
    assert "all 2 rows of eval" in out and out.count("  > ") == 1


# ----------------------------------------------------------------------------------------------------
# registry commands


def test_register_from_a_pipeline_run_id(store):
    code, out, err = _run_main(["register", store.parent_run_id, "--name", "reviews"])
    assert code == 0, err
    assert out.startswith("Registered reviews version 1")


def test_transition_promote_rollback_and_versions(store):
    code, out, _ = _run_main(["transition", "smolora-demo", "2", "staging", "--reason", "try it"])
    assert code == 0 and "version 2 is now in Staging (aliases: staging, v1-1-0)" in out
    code, out, _ = _run_main(["promote", "smolora-demo", "--min_delta", "1000"])  # `latest` is version 2
    assert code == 0 and "version 2: not promoted to Production" in out
    code, out, _ = _run_main(["promote", "smolora-demo", "2", "--min_delta", "1000", "--force", "--reason",
                              "manual check passed"])
    assert code == 0 and "promoted to Production: forced: manual check passed" in out
    code, out, _ = _run_main(["rollback", "smolora-demo", "--reason", "bad answers"])
    assert code == 0 and out.strip() == "smolora-demo: Production is now version 1"
    code, out, _ = _run_main(["versions", "smolora-demo", "--history"])
    assert code == 0
    table, history = out.split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["version", "semver", "stage"]
    assert lines[1].split()[:3] == ["1", "1.0.0", "Production"]
    assert lines[2].split()[:3] == ["2", "1.1.0", "Archived"]
    assert "bad answers" in history and "try it" in history


@pytest.mark.parametrize(("argv", "message"), [
    (["versions", "nope"], "Registered model 'nope' does not exist"),
    (["transition", "smolora-demo", "1", "Production"], "Illegal transition"),
    (["transition", "smolora-demo", "1", "Live"], "Unknown stage 'Live'"),
    (["promote", "smolora-demo", "2", "--force"], "requires a `reason`"),
    (["rollback", "smolora-demo"], "no previous Production version"),
])
def test_registry_errors_exit_2_with_the_reason(store, argv, message):
    code, out, err = _run_main(argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--debug", "versions", "nope"], ["versions", "nope", "--debug"]])
def test_debug_shows_the_traceback(store, argv):
    code, _, err = _run_main(argv)
    assert code == 2 and "Traceback" in err and "smolora versions: error:" in err


def test_summary_links_runs_to_the_ui_of_an_http_tracking_server(monkeypatch):
    import mlflow

    from smolora_mlflow.cli import commands as _commands

    class Client:
        def get_run(self, run_id):
            return type("Run", (), {"info": type("Info", (), {"experiment_id": "7"})})()

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow.example:5000/")
    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    assert _commands._ui_link("abc") == ("http://mlflow.example:5000/#/experiments/7/runs/abc"
                                         "?workflowType=machine_learning")  # opens the training view
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "sqlite:///x.db")
    assert _commands._ui_link("abc") == ""


# ----------------------------------------------------------------------------------------------------
# predict


def test_predict_gives_the_same_text_for_every_way_of_naming_the_model(store):
    outputs = []
    for ref in ("models:/smolora-demo/1", "models:/smolora-demo@production", store.parent_run_id,
                store.train_run_id, str(store.merged_dir)):
        code, out, err = _run_main(["predict", ref, *PROMPTS, "--max_new_tokens", "6"])
        assert code == 0, err
        outputs.append(out)
    assert len(set(outputs)) == 1 and len(outputs[0].splitlines()) == 2


def test_predict_reads_files_and_stdin(store, tmp_path, monkeypatch):
    uri = "models:/smolora-demo/1"
    _, expected, _ = _run_main(["predict", uri, *PROMPTS, "--max_new_tokens", "6", "--jsonl"])
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    for source in (["-f", str(tmp_path / "p.txt")], ["-f", str(tmp_path / "p.jsonl")], ["-"], []):
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
        code, out, err = _run_main(["predict", uri, *source, "--max_new_tokens", "6", "--jsonl"])
        assert code == 0, err
        assert out == expected, source
    rows = [json.loads(line) for line in expected.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    code, out, _ = _run_main(["predict", uri, PROMPTS[0], "--max_new_tokens", "6", "--full_text"])
    assert out.strip() == (PROMPTS[0] + rows[0]["completion"]).strip()
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))
    code, out, err = _run_main(["predict", uri, "-f", str(tmp_path / "chat.jsonl"), "--max_new_tokens", "3",
                                "--jsonl"])
    assert code == 0, err
    assert json.loads(out)["prompt"] == "<|user|>Hi</s><|assistant|>"


@pytest.mark.parametrize(("argv", "stdin", "message"), [
    (["predict", "models:/smolora-demo/1"], "", "no prompts given"),
    (["predict", "models:/smolora-demo/1", "-f", "missing.txt"], "", "prompt file `missing.txt` does not exist"),
    (["predict", "does/not/exist", "hi"], "", "no model at 'does/not/exist'"),
    (["predict", "models:/smolora-demo/1", "hi", "--max_new_tokens", "many"], "", "invalid int value: 'many'"),
])
def test_predict_errors(store, monkeypatch, argv, stdin, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, _, err = _run_main(argv)
    assert code == 2
    assert message in err


@pytest.mark.slow
def test_predict_in_a_real_process_reads_stdin(store, tracking_uri):
    _, expected, _ = _run_main(["predict", "models:/smolora-demo/1", *PROMPTS, "--max_new_tokens", "6"])
    res = subprocess.run([sys.executable, "-m", "smolora_mlflow", "predict", "models:/smolora-demo/1",
                          "--max_new_tokens", "6"], input="\n".join(PROMPTS), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected


# ----------------------------------------------------------------------------------------------------
# serve


@pytest.mark.parametrize(("argv", "uri"), [
    (["serve", "reviews"], "models:/reviews@production"),
    (["serve", "reviews", "--alias", "champion"], "models:/reviews@champion"),
    (["serve", "reviews", "--stage", "Staging"], "models:/reviews/Staging"),
    (["serve", "reviews", "--version", "3"], "models:/reviews/3"),
    (["serve", "runs:/abc/model"], "runs:/abc/model"),
    (["serve", "0123456789abcdef0123456789abcdef"], "runs:/0123456789abcdef0123456789abcdef/model"),
    (["serve", "m-0123abcd"], "models:/m-0123abcd"),
])
def test_serve_builds_the_guarded_server_command(argv, uri, capsys):
    assert main([*argv, "-p", "5123", "--dry_run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:] == ["-m", "smolora_mlflow.serving", uri, "--host", "127.0.0.1", "--port", "5123"]
    assert main([*argv, "-p", "5123", "--env_manager", "uv", "--dry_run"]) == 0  # other envs: mlflow's own
    cmd = capsys.readouterr().out.split()
    assert cmd[1:5] == ["-m", "mlflow", "models", "serve"]
    assert cmd[5:] == ["-m", uri, "--env-manager", "uv", "-h", "127.0.0.1", "-p", "5123"]


def test_serve_api_key_is_checked_and_never_on_the_command_line(capsys, monkeypatch):
    monkeypatch.delenv("SMOLORA_SERVE_API_KEY", raising=False)
    assert main(["serve", "reviews", "--api-key", "k3y-Secret-1", "--dry_run"]) == 0
    assert "k3y-Secret-1" not in capsys.readouterr().out
    for argv, message in [(["--api_key", ""], "--api_key is set but empty"),
                          (["--api_key", "two words"], "printable ASCII without spaces"),
                          (["--api_key", "k3y-Secret-1", "--env_manager", "uv"], "needs the local server")]:
        assert main(["serve", "reviews", *argv, "--dry_run"]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("SMOLORA_SERVE_API_KEY", "")  # a templated, unset variable: fail closed
    assert main(["serve", "reviews", "--dry_run"]) == 2
    assert "SMOLORA_SERVE_API_KEY is set but empty" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_starts_a_server_that_answers(store, tmp_path):
    import requests

    port = free_port()
    client_store = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if k in os.environ}
    server = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", "smolora-demo", "-p", str(port)],
                           port, tmp_path / "serve.log", env={**client_store, "PYTHONPATH": str(ROOT)})
    try:
        server.wait("/ping", timeout=240)
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                              json={"inputs": ["The food was"], "params": {"max_new_tokens": 4}})
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["predictions"][0]["generated_text"], str)
    finally:
        server.stop()
