"""Task evaluation (answers scored for the base and the fine-tuned model), chat-template prompts in training,
evaluation and serving, and promotion gated on a task metric: on a real SQLite store, with the demo model."""

from __future__ import annotations

import json

import mlflow
import pytest

from smolora_mlflow import SmoloraConfig
from smolora_mlflow import constants as C
from smolora_mlflow.evaluation import tasks
from tests.conftest import TINY_TRAINING

PAIRS = [("How was the pizza?", "delicious"), ("How was the waiter?", "friendly"),
         ("How was the soup?", "cold"), ("How was the price?", "fair")]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")


def test_rule_based_scores():
    out = tasks.score_answers(["Delicious!", "it was friendly", "warm"], ["delicious", "friendly", "cold"],
                              r"\b{answer}\b")
    assert out["metrics"][C.METRIC_EXACT_MATCH] == pytest.approx(1 / 3)
    assert out["metrics"][C.METRIC_CONTAINS_ANSWER] == pytest.approx(2 / 3)
    assert out["metrics"][C.METRIC_REGEX_MATCH] == pytest.approx(2 / 3)
    assert out["metrics"][C.METRIC_ANSWER_LENGTH] == pytest.approx((10 + 15 + 4) / 3)
    assert C.METRIC_REGEX_MATCH not in tasks.score_answers(["a"], ["a"], None)["metrics"]
    with pytest.raises(ValueError, match="task_eval"):
        tasks.task_rows([{"text": "x"}], "text", 10)


def test_prompt_format_resolution(demo_model_dir):
    from transformers import AutoTokenizer

    from smolora_mlflow.models.generation import resolve_prompt_format

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    assert resolve_prompt_format("auto", tok, "smolora:demo") == "plain"
    assert resolve_prompt_format("auto", tok, "HuggingFaceTB/SmolLM2-135M-Instruct") == "chat"
    assert resolve_prompt_format("chat", tok, "smolora:demo") == "chat"
    tok.chat_template = None
    assert resolve_prompt_format("auto", tok, "x/SmolLM2-135M-Instruct") == "plain"
    with pytest.raises(ValueError, match="`prompt_format` is 'chat'"):
        resolve_prompt_format("chat", tok, "smolora:demo")


def _qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": q, "completion": " " + a} for q, a in PAIRS] * 8
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_task_eval_gates_promotion_and_chat_template_is_used_everywhere(tracking_uri, tmp_path, demo_model_dir):
    from smolora_mlflow import registry
    from smolora_mlflow.workflow import run_pipeline

    data = _qa_file(tmp_path)
    cfg = SmoloraConfig(**{**TINY_TRAINING, "max_steps": 40, "max_samples": None, "learning_rate": 0.01,
                           "lora_target_modules": ["all-linear"]},
                        dataset=str(data), prompt_format="chat", task_eval=True, task_answer_regex=r"{answer}",
                        task_max_new_tokens=6, task_max_rows=12, output_dir=str(tmp_path / "out"),
                        registered_model_name="qa")
    result = run_pipeline(cfg, promote=True, eval_dataset=str(data), promote_options={"metric": "exact_match"},
                          log_model_options={"pip_requirements": ["torch", "transformers", "mlflow"]})
    client = mlflow.MlflowClient()

    # Training rendered the rows with the chat template, and says so.
    train = client.get_run(result.train_run_id)
    assert train.data.params["prompt_format"] == "chat"
    assert train.data.tags[C.TAG_PROMPT_FORMAT] == "chat"
    template = mlflow.artifacts.load_text(f"runs:/{result.train_run_id}/{C.ARTIFACT_CHAT_TEMPLATE}")
    import hashlib

    assert train.data.tags[C.TAG_CHAT_TEMPLATE_SHA256] == hashlib.sha256(template.encode()).hexdigest()

    # The evaluation scored both models on the same prompts; the fine-tune learned the answers, the base did not.
    ev = client.get_run(result.eval_run_id).data
    assert ev.tags[C.TAG_PROMPT_FORMAT] == "chat"
    m = ev.metrics
    for key in C.TASK_METRICS:
        assert key in m and C.BASE_PREFIX + key in m
    assert m[C.METRIC_EXACT_MATCH] >= 0.75 > m[C.BASE_PREFIX + C.METRIC_EXACT_MATCH]
    assert m[C.METRIC_CONTAINS_ANSWER] >= m[C.METRIC_EXACT_MATCH]
    # mlflow.genai.evaluate ran the same rule-based scorers, offline, and agrees.
    assert m[f"{C.METRIC_EXACT_MATCH}/mean"] == pytest.approx(m[C.METRIC_EXACT_MATCH])
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{result.eval_run_id}/{C.ARTIFACT_TASK_EVAL}"))
    assert {"prompt", "expected", "answer", "base_answer", "exact_match", "base_exact_match"} <= set(table["columns"])
    assert len(table["data"]) == 12  # task_max_rows

    # The metrics are on the logged model too, and on the registered version; promotion gated on exact_match.
    model_id = result.model_uri.removeprefix("models:/")
    linked = {x.key: x.value for x in client.get_logged_model(model_id).metrics}
    assert linked[C.METRIC_EXACT_MATCH] == pytest.approx(m[C.METRIC_EXACT_MATCH])
    mv = client.get_model_version("qa", result.registered_version)
    assert float(mv.tags[C.METRIC_TAG_PREFIX + C.METRIC_EXACT_MATCH]) == pytest.approx(m[C.METRIC_EXACT_MATCH])
    assert result.promoted and result.promotion.metric == C.METRIC_EXACT_MATCH

    # A worse version on exact_match is rejected: higher is better is inferred from the metric.
    worse = registry.register(result.model_uri, "qa", tags={C.METRIC_TAG_PREFIX + C.METRIC_EXACT_MATCH: "0.0"})
    decision = registry.promote("qa", worse.version, metric=C.METRIC_EXACT_MATCH)
    assert not decision.promoted and "higher is better" in decision.reason

    # Serving renders a plain prompt with the chat template, exactly as the evaluation did.
    served = mlflow.pyfunc.load_model(f"models:/qa/{result.registered_version}")
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    out = served.predict({"prompt": [row["prompt"]]}, params={"max_new_tokens": 6})
    assert out["generated_text"][0] == row["answer"]

    # `smolora predict` renders it the same way (the model records its prompt format); --prompt_format overrides.
    import contextlib
    import io

    from smolora_mlflow.cli import main

    def predict(*extra: str) -> str:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["predict", f"models:/qa/{result.registered_version}", row["prompt"],
                         "--max_new_tokens", "6", *extra]) == 0
        return buf.getvalue().rstrip("\n")

    assert predict() == row["answer"]
    rendered = json.loads(predict("--prompt_format", "chat", "--jsonl"))["prompt"]
    assert rendered != row["prompt"] and row["prompt"].strip() in rendered  # the chat template wrapped it
    assert json.loads(predict("--prompt_format", "plain", "--jsonl"))["prompt"] == row["prompt"]
