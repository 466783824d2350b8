"""Checkpoints as MLflow 3 LoggedModels: linked to their step's metrics, ranked, registrable and loadable."""

from __future__ import annotations

import mlflow
import pytest

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow import constants as C
from tests.conftest import TINY_TRAINING


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")


def test_kept_checkpoints_are_logged_models_linked_to_their_step(tracking_uri, tmp_path):
    cfg = SmoloraConfig(**{**TINY_TRAINING, "max_steps": 6}, eval_fraction=0.25, eval_steps=2, save_steps=2,
                        save_total_limit=1, output_dir=str(tmp_path / "out"), experiment_name="ckpt")
    lora = SmoLoRA(config=cfg)
    run_id = lora.train().run_id
    client = mlflow.MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    by_step = {int(m.tags[C.TAG_CHECKPOINT_STEP]): m for m in models}
    evals = {m.step: m.value for m in client.get_metric_history(run_id, C.METRIC_EVAL_LOSS)}
    best_step = min((s for s in (2, 4, 6)), key=lambda s: (evals[s], -s))
    # Kept: the top save_total_limit (1) on eval_loss, and the latest; the others were deleted.
    assert set(by_step) == {best_step, 6}
    assert lora.checkpoint_roles == {"best": by_step[best_step].model_id, "latest": by_step[6].model_id}
    for step, m in by_step.items():
        assert m.name == f"checkpoint-{step}"
        linked = {x.key: (x.value, x.step) for x in m.metrics}
        assert linked[C.METRIC_EVAL_LOSS] == (evals[step], step)
        assert linked[C.METRIC_LOSS][1] == step
    assert "best" in by_step[best_step].tags[C.TAG_CHECKPOINT_ROLE]
    assert "latest" in by_step[6].tags[C.TAG_CHECKPOINT_ROLE]
    assert by_step[best_step].tags[C.TAG_CHECKPOINT_RANK] == "1"
    # Linking added no second row to the run's own history.
    losses = [m.step for m in client.get_metric_history(run_id, C.METRIC_LOSS)]
    assert losses == sorted(set(losses)) and len(losses) == 6

    # The best one is the first when ordering by eval_loss, and registers and loads like any model.
    first = mlflow.search_logged_models(experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "metrics.eval_loss", "ascending": True}],
                                        output_format="list")[0]
    assert first.model_id == lora.checkpoint_roles["best"]
    mv = mlflow.register_model(f"models:/{first.model_id}", "ckpt-best")
    out = mlflow.pyfunc.load_model(f"models:/ckpt-best/{mv.version}").predict({"prompt": ["The food was"]},
                                                                              params={"max_new_tokens": 3})
    assert len(out) == 1 and isinstance(out["generated_text"][0], str)


def test_checkpoint_models_never_fail_a_finished_training(tracking_uri, tmp_path, caplog):
    """Ranking against a run the store cannot find (as with an unreachable server) is a warning, and while the
    tracking server is not taking writes no checkpoint is uploaded at all (the upload would hold the loop)."""
    import logging

    from smolora_mlflow.train.checkpoint_models import CheckpointModels

    cfg = SmoloraConfig(**TINY_TRAINING, save_steps=2, output_dir=str(tmp_path / "out"), experiment_name="ckpt",
                        checkpoint_models=False)
    lora = SmoLoRA(config=cfg)
    run_id = lora.train().run_id
    ckpt = next((tmp_path / "out").glob("checkpoint-*"))
    with caplog.at_level(logging.WARNING, logger="smolora_mlflow.train.checkpoint_models"):
        assert CheckpointModels(lora, lambda: "0" * 32).finish(2) == {}
        assert CheckpointModels(lora, lambda: run_id, reachable=lambda: False).log(ckpt, 2) is None
    assert "Could not rank the checkpoint models" in caplog.text and "is not logged as a LoggedModel" in caplog.text
    client = mlflow.MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    assert client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'") == []
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
