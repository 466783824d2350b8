"""SmoloraConfig: defaults < YAML < overrides, typed coercion, every problem reported at once."""

from __future__ import annotations

import pytest

from smolora_mlflow.config import (
    DEMO_DATASET,
    DEMO_MODEL,
    ConfigError,
    SmoloraConfig,
    coerce,
    field_help,
    field_names,
    parse_overrides,
    redact,
)


def test_defaults_run_the_offline_demo():
    cfg = SmoloraConfig()
    assert cfg.base_model == DEMO_MODEL and cfg.dataset == DEMO_DATASET
    assert cfg.uses_demo_model
    assert cfg.trust_remote_code is False


def test_every_field_has_help():
    assert all(field_help(name) for name in field_names())


def test_yaml_then_overrides_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora_r: 4\nlearning_rate: 0.001\nlora_target_modules: [q_proj]\n")
    cfg = SmoloraConfig.from_yaml(recipe, {"lora_r": 16})
    assert cfg.lora_r == 16  # override beats YAML
    assert cfg.learning_rate == 0.001  # YAML beats default
    assert cfg.lora_target_modules == ["q_proj"]
    assert cfg.max_length == SmoloraConfig().max_length  # default kept


def test_demo_recipe_is_valid():
    from pathlib import Path

    cfg = SmoloraConfig.from_yaml(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert cfg.max_steps > 0 and cfg.eval_fraction > 0


def test_all_problems_reported_at_once_with_field_value_and_range():
    with pytest.raises(ConfigError) as info:
        SmoloraConfig(lora_r=0, lora_dropout=1.5, learning_rate=-1.0, eval_fraction=0.7, max_length="long")
    problems = info.value.problems
    assert len(problems) == 5
    text = str(info.value)
    assert "`lora_r` must be an integer in 1..1024, got 0." in text
    assert "`lora_dropout` must be a number in [0, 1), got 1.5." in text
    assert "`learning_rate` must be a number in (0, 1], got -1.0." in text
    assert "`eval_fraction` must be a number in [0, 0.5), got 0.7." in text
    assert "`max_length` must be an integer, got 'long'." in text


def test_literal_choices_are_enforced():
    with pytest.raises(ConfigError, match=r"`device` must be one of 'auto', 'cpu', 'cuda', 'mps', got 'tpu'"):
        SmoloraConfig(device="tpu")


def test_unknown_key_suggests_the_close_field(tmp_path):
    with pytest.raises(ConfigError, match=r"`lora_rank` is not a config field. Did you mean `lora_r`\?"):
        SmoloraConfig.from_dict({"lora_rank": 8})
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        SmoloraConfig.from_yaml(bad)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SmoloraConfig.from_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        SmoloraConfig.from_yaml(listy)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora_r: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SmoloraConfig.from_yaml(broken)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("learning_rate", "2e-4", 2e-4),
        ("lora_r", "16", 16),
        ("max_steps", "10.0", 10),
        ("dedupe", "true", True),
        ("dedupe", "0", False),
        ("max_samples", "none", None),
        ("lora_target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
        ("lora_target_modules", '["q_proj"]', ["q_proj"]),
        ("run_tags", "team=nlp,owner=me", {"team": "nlp", "owner": "me"}),
        ("run_name", "my run", "my run"),
    ],
)
def test_coerce_command_line_strings(name, raw, expected):
    assert coerce(name, raw) == expected


def test_parse_overrides_reports_every_bad_value():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["lora_r=abc", "nope=1", "learning_rate"])
    text = str(info.value)
    assert "`lora_r` must be an integer, got 'abc'." in text
    assert "`nope` is not a config field." in text
    assert "override 'learning_rate' must look like key=value." in text


def test_replace_validates():
    cfg = SmoloraConfig()
    assert cfg.replace(lora_r=4).lora_r == 4
    with pytest.raises(ConfigError, match="lora_r"):
        cfg.replace(lora_r=-1)


def test_secrets_are_redacted_but_token_counts_are_not():
    cfg = SmoloraConfig(run_tags={"hf_token": "hf_abc", "team": "nlp"})
    out = redact(cfg.to_dict())
    assert out["run_tags"] == {"hf_token": "***", "team": "nlp"}
    assert out["sample_max_new_tokens"] == cfg.sample_max_new_tokens
    assert "hf_abc" not in cfg.to_yaml()


def test_passwords_in_urls_are_masked():
    cfg = SmoloraConfig(tracking_uri="http://alice:s3cr3t@mlflow.internal:5000", run_tags={"db_password": "pw"})
    text = cfg.to_yaml()
    assert "s3cr3t" not in text and "http://alice:***@mlflow.internal:5000" in text
    assert "pw" not in redact({"db_password": "pw"}).values()
    assert redact({"u": "postgresql+psycopg2://u:p@db/x"}) == {"u": "postgresql+psycopg2://u:***@db/x"}
