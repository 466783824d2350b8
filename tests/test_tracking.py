"""Tracking: every training run is a complete, browsable MLflow record, read back through MlflowClient.

The core record (params, counts, metrics, inputs, tags, artifacts, state) is checked on one shared run,
once against a SQLite store and once against a real ``mlflow server`` with proxied artifacts. The other
tests each train a few steps into one module-wide SQLite store and look only at their own run.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from servers import launch_mlflow_server
from transformers import TrainerCallback

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow import constants as C
from smolora_mlflow.config import field_names
from smolora_mlflow.constants import ARTIFACT_ERROR, TAG_ERROR

SMALL = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 32, "max_samples": 64,
         "logging_steps": 1, "sample_max_new_tokens": 4}
PROMPTS = [f"The dish number {i} was" for i in range(40)]  # 1,000+ characters as one param
# TrainingArguments fields that transformers' stock MLflowCallback would log, and we must not.
STOCK_ONLY = {"adam_beta1", "adam_epsilon", "optim", "logging_strategy", "save_strategy", "report_to",
              "dataloader_num_workers", "per_device_eval_batch_size", "lr_scheduler_kwargs", "bf16"}


@pytest.fixture(scope="module", autouse=True)
def _module_env(smolora_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOLORA_PROGRESS", "0")
        mp.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        # Another module's mlflow.set_experiment leaves its experiment active and exported; not ours.
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        yield


# ----------------------------------------------------------------------------------------------------
# stores


@pytest.fixture(scope="module", autouse=True)
def _server(request, tmp_path_factory):
    """Starts the server at the top of the module when a selected test will use it."""
    wanted = any(item.module is request.module and getattr(item, "callspec", None) is not None
                 and item.callspec.params.get("backend") == "server" for item in request.session.items)
    if not wanted:
        yield None
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    # Launched now, awaited by the first test that needs it: its start takes many seconds on a busy box.
    server = launch_mlflow_server(f"sqlite:///{root / 'db'}", root / "art", root / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the whole module (each test reads back only its own run)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def use_store(store, monkeypatch, tmp_path) -> MlflowClient:
    """The module store as this test's MLFLOW_TRACKING_URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(store)
    yield MlflowClient(store)
    mlflow.set_tracking_uri(None)


def _cfg(out: Path, **over) -> SmoloraConfig:
    return SmoloraConfig(**{**SMALL, "output_dir": str(out), **over})


# ----------------------------------------------------------------------------------------------------
# the core record, on SQLite and on a real tracking server


def _git_repo(path: Path) -> str:
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def backend(request, store, _server) -> str:
    return _server.wait("/health", timeout=240) if request.param == "server" else store


@pytest.fixture(scope="module")
def core(backend, tmp_path_factory):
    """One run with eval, sample generations and a 40-prompt param; the URI comes from the config while
    MLFLOW_TRACKING_URI points at a decoy store that must stay untouched."""
    work = tmp_path_factory.mktemp("core")
    commit = _git_repo(work)
    decoy = work / "decoy.db"
    cfg = _cfg(work / "out", max_steps=4, eval_fraction=0.25, eval_steps=2, sample_prompts=PROMPTS,
               run_name="core-run", run_tags={"team": "nlp"}, experiment_name="smolora-tests",
               tracking_uri=backend)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}")
        mp.chdir(work)
        result = SmoLoRA(config=cfg).train()
        mlflow.set_tracking_uri(None)
    client = MlflowClient(backend)
    return {"cfg": cfg, "result": result, "client": client, "run": client.get_run(result.run_id),
            "commit": commit, "decoy": decoy, "work": work}


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_params_are_the_resolved_config_and_nothing_else(core):
    params = core["run"].data.params
    expected = {"lora_r": "8", "lora_alpha": "16.0", "lora_dropout": "0.05", "lora_target_modules": "q_proj,v_proj",
                "max_steps": "4", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
                "max_length": "32", "seed": "42", "base_model": "smolora:demo", "dataset": "smolora:reviews",
                "eval_steps": "2", "effective_batch_size": "4", "dataset_format": "text"}
    assert {k: params.get(k) for k in expected} == expected
    assert float(params["learning_rate"]) == 2e-4
    assert set(field_names()) - {"run_tags", "tracking_uri"} <= set(params)  # nothing dropped
    assert not STOCK_ONLY & set(params)  # transformers' MLflowCallback did not run
    assert len(params) <= len(field_names()) + 10


def test_long_param_is_shortened_visibly_and_kept_whole(core):
    client, run_id = core["client"], core["result"].run_id
    shown = core["run"].data.params["sample_prompts"]
    assert len(shown) <= 500 and shown.endswith("full value in params/sample_prompts.txt]")
    whole = Path(client.download_artifacts(run_id, "params/sample_prompts.txt")).read_text()
    assert whole.split(",") == PROMPTS


def test_trainable_counts_equal_peft_count(core, demo_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_dir),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    run, client, run_id = core["run"], core["client"], core["result"].run_id
    assert run.data.params["trainable_params"] == str(trainable)
    assert run.data.params["total_params"] == str(total)
    assert _history(client, run_id, "trainable_params") == [(0, trainable)]
    assert _history(client, run_id, "total_params") == [(0, total)]
    assert run.data.metrics["trainable_percent"] == pytest.approx(100 * trainable / total, abs=1e-4)
    adapter = Path(client.download_artifacts(run_id, "adapter/adapter_model.safetensors"))
    assert run.data.metrics["adapter_size_bytes"] == adapter.stat().st_size
    assert run.data.tags[C.TAG_ADAPTER_SIZE] == str(adapter.stat().st_size)


def test_metrics_one_value_per_optimizer_step(core):
    client, run_id = core["client"], core["result"].run_id
    loss = _history(client, run_id, "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for _, v in loss)
    for key in ("learning_rate", "grad_norm", "epoch", "tokens_per_second", "samples_per_second", "peak_rss_mb"):
        points = _history(client, run_id, key)
        assert [s for s, _ in points] == [1, 2, 3, 4], key
        assert all(math.isfinite(v) and v > 0 for _, v in points), key
    epochs = [v for _, v in _history(client, run_id, "epoch")]
    assert epochs == sorted(epochs) and len(set(epochs)) == 4
    evals, ppl = _history(client, run_id, "eval_loss"), _history(client, run_id, "eval_perplexity")
    assert [s for s, _ in evals] == [s for s, _ in ppl] == [2, 4]
    assert [p for _, p in ppl] == pytest.approx([math.exp(v) for _, v in evals], rel=1e-6)
    assert [s for s, _ in _history(client, run_id, "train_loss")] == [4]
    assert [s for s, _ in _history(client, run_id, "train_runtime")] == [4]


def test_dataset_inputs(core):
    inputs = {i.tags[0].value: i.dataset for i in core["run"].inputs.dataset_inputs}
    params = core["run"].data.params
    assert set(inputs) == {"training", "evaluation"}
    for context, rows, name in (("training", params["num_train_rows"], "smolora-reviews-train"),
                                ("evaluation", params["num_eval_rows"], "smolora-reviews-eval")):
        ds = inputs[context]
        assert ds.name == name and len(ds.digest) >= 8
        assert "reviews.jsonl" in json.loads(ds.source)["uri"]
        assert "text" in ds.schema
        assert json.loads(ds.profile)["num_rows"] == int(rows)
    assert int(params["num_train_rows"]) + int(params["num_eval_rows"]) == 64


def test_lineage_tags(core, demo_model_dir):
    from smolora_mlflow.data import prepare_data
    from smolora_mlflow.models.verified import weights_sha256

    tags = core["run"].data.tags
    assert tags[C.TAG_BASE_MODEL] == "smolora:demo"
    assert tags[C.TAG_BASE_MODEL_SHA256] == weights_sha256(demo_model_dir)
    assert tags[C.TAG_DATASET] == "smolora:reviews"
    assert tags[C.TAG_DATASET_FINGERPRINT] == prepare_data(core["cfg"]).fingerprint
    assert tags[C.TAG_DEVICE] == "cpu"
    assert tags[C.TAG_GIT_COMMIT] == core["commit"]
    for dist in ("torch", "transformers", "peft", "trl", "mlflow"):
        assert tags[C.TAG_VERSION_PREFIX + dist] == importlib.metadata.version(dist)
    assert tags["team"] == "nlp"


def test_artifacts_are_present_and_loadable(core, demo_model_dir):
    from peft import PeftModel
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client, run_id = core["client"], core["result"].run_id
    adapter = Path(client.download_artifacts(run_id, C.ARTIFACT_ADAPTER))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).is_file(), name
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_dir), adapter)
    saved = load_file(core["result"].adapter_dir / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    assert all(any(p.equal(t) for t in saved.values()) for p in loaded.values())
    assert AutoTokenizer.from_pretrained(adapter).pad_token is not None

    table = json.loads(Path(client.download_artifacts(run_id, C.ARTIFACT_GENERATIONS)).read_text())
    steps = [row[table["columns"].index("step")] for row in table["data"]]
    assert {"step", "prompt", "generated_text"} <= set(table["columns"])
    assert sorted(set(steps)) == [2, 4] and len(steps) == 2 * len(PROMPTS)

    with Image.open(client.download_artifacts(run_id, C.ARTIFACT_LOSS_CURVE)) as png:
        assert png.format == "PNG" and png.size[0] >= 320
    config = SmoloraConfig.from_yaml(client.download_artifacts(run_id, C.ARTIFACT_CONFIG))
    assert config == core["cfg"]
    card = Path(client.download_artifacts(run_id, C.ARTIFACT_MODEL_CARD)).read_text()
    assert run_id in card and "smolora:demo" in card


def test_run_state_name_and_description(core):
    run = core["run"]
    assert run.info.status == "FINISHED" and run.info.end_time
    assert run.info.run_name == "core-run"
    assert "LoRA fine-tune of `smolora:demo`" in run.data.tags[C.TAG_NOTE]
    assert core["client"].get_experiment(run.info.experiment_id).name == "smolora-tests"
    assert not core["decoy"].exists()  # config tracking_uri beat MLFLOW_TRACKING_URI


# ----------------------------------------------------------------------------------------------------
# resume, failure, no tracking, nesting, `mlflow run`


def test_resume_continues_the_same_run_without_duplicate_steps(use_store, tmp_path):
    out = tmp_path / "out"
    first = SmoLoRA(config=_cfg(out, max_steps=4, save_steps=2)).train()
    second = SmoLoRA(config=_cfg(out, max_steps=6, save_steps=2, resume_from_checkpoint="latest")).train()
    third = SmoLoRA(config=_cfg(out, max_steps=8, save_steps=2, resume_from_checkpoint=first.run_id)).train()
    run_id = first.run_id
    assert second.run_id == third.run_id == run_id
    for key in ("loss", "learning_rate", "epoch", "tokens_per_second"):
        assert [s for s, _ in _history(use_store, run_id, key)] == list(range(1, 9)), key
    assert [s for s, _ in _history(use_store, run_id, "trainable_params")] == [0]
    run = use_store.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["max_steps"] == "4"  # a param is never rewritten; changes sit beside it
    assert params["resumed_at_step_4.max_steps"] == "6"
    assert params["resumed_at_step_4.resume_from_checkpoint"] == "latest"
    assert params["resumed_at_step_6.max_steps"] == "8"
    assert (out / "checkpoint-8" / C.RUN_ID_FILE).read_text().strip() == run_id
    assert SmoloraConfig.from_yaml(use_store.download_artifacts(run_id, C.ARTIFACT_CONFIG)).max_steps == 8


class _RaiseAt(TrainerCallback):
    def __init__(self, exc: BaseException, step: int):
        self.exc, self.step = exc, step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}) and state.global_step == self.step:
            raise self.exc


class _Failing(SmoLoRA):
    """Raises from inside the training loop at step 2, after that step's metrics were logged."""

    exc: BaseException = RuntimeError("boom")

    def _build_trainer(self, *args, **kwargs):
        trainer = super()._build_trainer(*args, **kwargs)
        trainer.add_callback(_RaiseAt(self.exc, 2))
        return trainer


@pytest.mark.parametrize(("exc", "status", "reason"), [
    (RuntimeError("bad batch mid-way"), "FAILED", "RuntimeError: bad batch mid-way"),
    (KeyboardInterrupt(), "KILLED", "interrupted (KeyboardInterrupt)"),
])
def test_a_run_that_raises_ends_failed_and_keeps_what_it_logged(use_store, tmp_path, exc, status, reason):
    lora = _Failing(config=_cfg(tmp_path / "out", max_steps=4, run_name=f"fails-{status}"))
    lora.exc = exc
    with pytest.raises(type(exc)):
        lora.train()
    assert mlflow.active_run() is None
    (run,) = use_store.search_runs(use_store.get_experiment_by_name("smolora").experiment_id,
                                   f"tags.mlflow.runName = 'fails-{status}'")
    assert run.info.status == status
    assert run.data.tags[TAG_ERROR] == reason
    assert reason in run.data.tags[C.TAG_NOTE]
    assert [s for s, _ in _history(use_store, run.info.run_id, "loss")] == [1, 2]
    assert run.data.params["lora_r"] == "8"
    trace = Path(use_store.download_artifacts(run.info.run_id, ARTIFACT_ERROR)).read_text()
    assert "raise self.exc" in trace and type(exc).__name__ in trace


def _count_runs(uri: str) -> int:
    client = MlflowClient(uri)
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@pytest.mark.parametrize("how", ["tracking_false", "rank_1"])
def test_no_run_when_tracking_is_off_or_not_main_process(use_store, store, tmp_path, monkeypatch, how):
    before = _count_runs(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'untouched.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'untouched.db'}")
    if how == "rank_1":
        monkeypatch.setenv("RANK", "1")
    result = SmoLoRA(config=_cfg(tmp_path / "out", max_steps=1, tracking=how != "tracking_false")).train()
    assert result.run_id is None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "untouched.db").exists() and not (tmp_path / "mlruns").exists()  # nothing at all
    assert _count_runs(store) == before


def test_nested_under_an_active_parent_run(use_store, tmp_path):
    exp = use_store.create_experiment("parents")
    with mlflow.start_run(experiment_id=exp, run_name="parent") as parent:
        result = SmoLoRA(config=_cfg(tmp_path / "out")).train()
        assert mlflow.active_run().info.run_id == parent.info.run_id
    child = use_store.get_run(result.run_id)
    assert result.run_id != parent.info.run_id
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.experiment_id == exp and child.info.status == "FINISHED"
    assert use_store.get_run(parent.info.run_id).info.status == "FINISHED"


def test_attaches_to_the_run_mlflow_run_made_without_param_collisions(use_store, tmp_path, monkeypatch):
    """`mlflow run -P learning_rate=2e-4` logs the user's spelling first; ours ("0.0002") must not collide."""
    exp = use_store.create_experiment("projects")
    run_id = use_store.create_run(exp).info.run_id
    use_store.log_param(run_id, "learning_rate", "2e-4")
    use_store.log_param(run_id, "lora_target_modules", '["q_proj", "v_proj"]')
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    result = SmoLoRA(config=_cfg(tmp_path / "out", learning_rate=2e-4)).train()
    assert result.run_id == run_id
    assert len(use_store.search_runs([exp])) == 1
    run = use_store.get_run(run_id)
    params = run.data.params
    assert params["learning_rate"] == "2e-4" and "resolved.learning_rate" not in params
    assert params["lora_target_modules"] == '["q_proj", "v_proj"]'
    assert params["resolved.lora_target_modules"] == "q_proj,v_proj"
    assert set(field_names()) - {"run_tags", "tracking_uri"} <= set(params)
    assert [s for s, _ in _history(use_store, run_id, "loss")] == [1, 2]  # the async batches arrived
    assert run.info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------------
# record pieces, without training


def test_list_params_stay_lossless_and_uri_credentials_stay_out():
    from types import SimpleNamespace

    from smolora_mlflow.tracking.record import config_yaml, flat_params

    data = SimpleNamespace(format="text", num_train=10, num_eval=0)
    prompts = ["Hello, world", "plain"]
    params, _ = flat_params(SmoloraConfig(sample_prompts=prompts, tracking_uri="https://u:pw@host/x"), data)
    assert json.loads(params["sample_prompts"]) == prompts  # a comma inside an item: JSON, not a lossy join
    assert "tracking_uri" not in params
    text = config_yaml(SmoloraConfig(tracking_uri="https://u:pw@host:5000/x"))
    assert "pw" not in text and "https://***@host:5000/x" in text


def test_metric_buffer_skips_held_steps_and_drops_non_finite_values(tracking_uri):
    from smolora_mlflow.tracking.callback import MetricBuffer

    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("buffer")).info.run_id
    buffer = MetricBuffer(client, run_id, max_points=2, skip_through_step=3)
    buffer.add({"loss": 1.0, "lr": 0.1}, 3)  # the resumed run has step 3 already
    buffer.add({"loss": 0.9, "nan": float("nan")}, 4)
    buffer.add({"loss": 0.8, "lr": 0.1}, 5)  # max_points reached: one batch, sent in the background
    assert buffer.close(timeout=60) == []
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(4, 0.9), (5, 0.8)]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [5]
    assert client.get_metric_history(run_id, "nan") == []
    assert buffer.history["loss"] == [(4, 0.9), (5, 0.8)]
    client.set_terminated(run_id)
