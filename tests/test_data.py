"""Loading, validating, normalising and splitting datasets; MLflow dataset inputs."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from smolora_mlflow.config import DEMO_DATASET, SmoloraConfig
from smolora_mlflow.data import (
    DataError,
    PreparedData,
    load_raw,
    mlflow_dataset,
    prepare_data,
)
from smolora_mlflow.models.demo import demo_texts

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Rate dish {i}"},
            {"role": "assistant", "content": f"Dish {i} is fine."},
        ],
        "id": i,
    }
    for i in range(4)
]
PAIRS = [{"question": f"Q{i}?", "answer": f"A{i}.", "source": "faq"} for i in range(5)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(**changes) -> SmoloraConfig:
    return SmoloraConfig(**changes)


def rows(ds: datasets.Dataset | None) -> list[dict]:
    assert ds is not None
    return ds.to_list()


# ----------------------------------------------------------------------------------------------------
# sources


def test_demo_dataset_is_the_bundled_corpus():
    data = prepare_data(cfg())
    assert isinstance(data, PreparedData)
    assert (data.format, data.source, data.name) == ("text", DEMO_DATASET, "smolora-reviews")
    assert data.train.column_names == ["text"]
    assert data.train["text"][:] == demo_texts()
    assert (data.num_train, data.num_eval, data.eval) == (400, 0, None)
    assert len(data.fingerprint) == 64


def test_jsonl_keeps_only_the_text_column(tmp_path):
    path = write_jsonl(
        tmp_path / "reviews.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    )
    data = prepare_data(cfg(dataset=str(path)))
    assert rows(data.train) == [{"text": "good"}, {"text": "bad"}]
    assert (data.source, data.name) == (str(path.resolve()), "reviews")


def test_json_list_columns_and_json_lines(tmp_path):
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps(PAIRS), encoding="utf-8")
    data = prepare_data(cfg(dataset=str(listed), prompt_field="question", completion_field="answer"))
    assert data.format == "prompt_completion"
    assert rows(data.train)[0] == {"prompt": "Q0?", "completion": "A0."}

    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"text": ["x", "y"], "n": [1, 2]}), encoding="utf-8")
    assert load_raw(str(columns)).to_list() == [{"text": "x", "n": 1}, {"text": "y", "n": 2}]

    lines = write_jsonl(tmp_path / "lines.json", [{"text": "x"}, {"text": "y"}])
    assert load_raw(str(lines))["text"][:] == ["x", "y"]


def test_csv_with_custom_text_field_and_bom(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text('\ufeffbody,score\n"hello, world",3\nsecond,4\n', encoding="utf-8")
    data = prepare_data(cfg(dataset=str(path), text_field="body"))
    assert rows(data.train) == [{"text": "hello, world"}, {"text": "second"}]


def test_parquet_chat_is_auto_detected(tmp_path):
    path = tmp_path / "chats.parquet"
    pd.DataFrame(CHATS).to_parquet(path)
    data = prepare_data(cfg(dataset=str(path)))
    assert data.format == "chat"
    assert data.train.column_names == ["messages"]
    assert rows(data.train)[1]["messages"] == CHATS[1]["messages"]


def test_txt_file_one_stripped_example_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("  first line  \n\n   \nsecond line\n", encoding="utf-8")
    data = prepare_data(cfg(dataset=str(path)))
    assert data.train["text"][:] == ["first line", "second line"]
    assert data.name == "corpus"


def test_folder_of_txt_files_is_read_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("from b\n", encoding="utf-8")
    (folder / "a.txt").write_text("from a 1\nfrom a 2\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored\n", encoding="utf-8")
    data = prepare_data(cfg(dataset=str(folder)))
    assert data.train["text"][:] == ["from a 1", "from a 2", "from b"]
    assert (data.source, data.name) == (str(folder.resolve()), "corpus")


@pytest.mark.parametrize(
    "obj",
    [
        datasets.Dataset.from_dict({"text": ["a", "b"], "extra": [1, 2]}),
        pd.DataFrame({"text": ["a", None, "b"]}),
        ["a", "  ", "b"],
        [{"text": "a"}, {"text": "b"}],
    ],
    ids=["Dataset", "DataFrame", "list-of-str", "list-of-dict"],
)
def test_in_memory_objects_override_cfg_dataset(obj):
    data = prepare_data(cfg(dataset="does/not-matter"), obj)
    assert rows(data.train) == [{"text": "a"}, {"text": "b"}]
    assert (data.source, data.name) == ("<in-memory>", "in-memory")


# ----------------------------------------------------------------------------------------------------
# formats


def test_chat_from_list_drops_extra_keys_and_columns():
    chats = [{"messages": [{**m, "name": "x"} for m in c["messages"]], "id": c["id"]} for c in CHATS]
    data = prepare_data(cfg(), chats)
    assert data.format == "chat"
    assert rows(data.train)[0] == {"messages": CHATS[0]["messages"]}


def test_chat_stored_as_json_text_in_a_csv(tmp_path):
    path = tmp_path / "chats.csv"
    pd.DataFrame({"conv": [json.dumps(c["messages"]) for c in CHATS]}).to_csv(path, index=False)
    data = prepare_data(cfg(dataset=str(path), messages_field="conv"))
    assert data.format == "chat"
    assert data.train[3]["messages"] == CHATS[3]["messages"]


def test_explicit_format_wins_over_auto_detection():
    both = [{"text": "plain", "prompt": "p", "completion": "c"}]
    assert prepare_data(cfg(), both).format == "prompt_completion"
    data = prepare_data(cfg(dataset_format="text"), both)
    assert rows(data.train) == [{"text": "plain"}]


def test_empty_rows_are_dropped_per_format():
    pairs = [
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "completion": " "},
        {"prompt": "", "completion": "c"},
    ]
    assert prepare_data(cfg(), pairs).num_train == 1
    chats = [{"messages": []}, {"messages": [{"role": "user", "content": " "}]}, CHATS[0]]
    assert prepare_data(cfg(), chats).num_train == 1


# ----------------------------------------------------------------------------------------------------
# chunking, dedupe, max_samples, split, fingerprint


def test_chunk_words_splits_lines_into_word_chunks(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("one two three four five\nsix\n", encoding="utf-8")
    data = prepare_data(cfg(dataset=str(path), chunk_words=2))
    assert data.train["text"][:] == ["one two", "three four", "five", "six"]
    chunked = load_raw([{"text": "a b c", "label": 1}], chunk_words=2)
    assert chunked.to_list() == [{"text": "a b", "label": 1}, {"text": "c", "label": 1}]


def test_dedupe_keeps_first_occurrence_in_order():
    texts = ["b", "a", "b", "c", "a"]
    assert prepare_data(cfg(dedupe=True), texts).train["text"][:] == ["b", "a", "c"]
    assert prepare_data(cfg(), texts).num_train == 5
    # on normalised columns: rows differing only in a dropped column are duplicates
    pairs = [{"prompt": "p", "completion": "c", "id": i} for i in range(3)]
    assert prepare_data(cfg(dedupe=True), pairs).num_train == 1
    assert load_raw(pairs, dedupe=True).num_rows == 3  # load_raw compares whole rows
    assert load_raw(["x", "x"], dedupe=True)["text"][:] == ["x"]


def test_eval_split_sizes_and_determinism():
    data = prepare_data(cfg(eval_fraction=0.1))
    assert (data.num_train, data.num_eval) == (360, 40)
    assert sorted(data.train["text"][:] + data.eval["text"][:]) == sorted(demo_texts())
    again = prepare_data(cfg(eval_fraction=0.1))
    assert again.eval["text"][:] == data.eval["text"][:]
    assert again.fingerprint == data.fingerprint
    other = prepare_data(cfg(eval_fraction=0.1, seed=7))
    assert other.eval["text"][:] != data.eval["text"][:]
    assert other.fingerprint != data.fingerprint


def test_at_least_one_eval_row_and_at_least_one_train_row():
    data = prepare_data(cfg(eval_fraction=0.01), ["a", "b", "c"])
    assert (data.num_train, data.num_eval) == (2, 1)
    with pytest.raises(DataError, match=r"`eval_fraction` = 0.2 holds out 1 of the 1 row.*no training rows"):
        prepare_data(cfg(eval_fraction=0.2), ["only"])


def test_max_samples_applies_before_the_split():
    data = prepare_data(cfg(max_samples=50, eval_fraction=0.1))
    assert (data.num_train, data.num_eval) == (45, 5)
    assert sorted(data.train["text"][:] + data.eval["text"][:]) == sorted(demo_texts()[:50])


def test_fingerprint_is_a_stable_golden_value():
    data = prepare_data(cfg(eval_fraction=0.25), ["alpha", "beta", "gamma", "delta"])
    assert (data.train["text"][:], data.eval["text"][:]) == (["alpha", "beta", "delta"], ["gamma"])
    # sha256 of '{"text":"alpha"}\n{"text":"beta"}\n{"text":"delta"}\n\x1e\n{"text":"gamma"}\n'
    assert data.fingerprint == "5291d5c978913b33cbd58aa0953e84894a3980832c6ec6d1b12a12fdf39629c1"


# ----------------------------------------------------------------------------------------------------
# bad inputs


def test_missing_column_names_file_columns_and_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"body": "x", "label": 1}])
    with pytest.raises(DataError) as err:
        prepare_data(cfg(dataset=str(path), dataset_format="text"))
    msg = str(err.value)
    assert str(path.resolve()) in msg and "no column `text`" in msg
    assert "`body`, `label`" in msg and "Set `text_field`" in msg
    with pytest.raises(DataError, match=r"no column `answer`.*`question`, `answer0`.*`completion_field`"):
        prepare_data(
            cfg(dataset_format="prompt_completion", prompt_field="question", completion_field="answer"),
            [{"question": "q", "answer0": "a"}],
        )


def test_auto_detection_failure_lists_columns_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"body": "x", "label": 1}])
    with pytest.raises(DataError) as err:
        prepare_data(cfg(dataset=str(path)))
    msg = str(err.value)
    assert "cannot detect the format" in msg and "`body`, `label`" in msg
    for field in ("messages_field", "prompt_field", "completion_field", "text_field"):
        assert f"`{field}`" in msg


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.txt", "empty.json"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n" if name.endswith("txt") else "", encoding="utf-8")
    with pytest.raises(DataError, match=rf"dataset `{path.resolve()}` has no rows"):
        prepare_data(cfg(dataset=str(path)))


def test_only_empty_rows(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}, {"text": None}])
    with pytest.raises(DataError, match=r"`.*blank.jsonl` has no non-empty examples: all 3 row.*`text`"):
        prepare_data(cfg(dataset=str(path)))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.csv", "latin1.json"])
def test_non_utf8_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    text = "text\ncaf\u00e9\n" if name.endswith("csv") else '{"text": "caf\u00e9"}\n'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=rf"`{path.resolve()}` is not valid UTF-8 .*re-save it as UTF-8"):
        prepare_data(cfg(dataset=str(path)))


def test_non_utf8_file_in_a_folder_names_that_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"b\.txt` is not valid UTF-8"):
        load_raw(str(tmp_path))


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "sheet.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError) as err:
        load_raw(str(path))
    msg = str(err.value)
    assert "`.xlsx`" in msg and str(path.resolve()) in msg
    assert ".jsonl, .json, .csv, .parquet, .txt" in msg


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.xlsx", "sub/dir/missing", "./missing"])
def test_missing_file_is_not_tried_on_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"dataset file `.*missing.*` not found"):
        load_raw(name)


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "data.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"folder `.*` holds no \.txt files"):
        load_raw(str(tmp_path))


def test_unreachable_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        prepare_data(cfg(dataset="smolora-test/no-such-dataset"))
    msg = str(err.value)
    assert (
        "`smolora-test/no-such-dataset` is neither a local path nor reachable on the Hugging Face Hub" in msg
    )
    assert "Pass a local file" in msg


def test_unknown_builtin_and_unusable_objects():
    with pytest.raises(DataError, match=r"'smolora:nope' is not built in.*`smolora:reviews`"):
        load_raw("smolora:nope")
    with pytest.raises(DataError, match=r"cannot use a int as a dataset"):
        load_raw(3)
    with pytest.raises(DataError, match=r"only strings or only dicts"):
        load_raw(["a", {"text": "b"}])
    with pytest.raises(DataError, match=r"`chunk_words` must be >= 0, got -1"):
        load_raw(["a"], chunk_words=-1)


def test_bad_chat_roles_and_messages():
    bad_role = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    with pytest.raises(
        DataError, match=r"row 0 .*column `messages`: message 1 has role 'bot'.*`system`, `user`"
    ):
        prepare_data(cfg(), bad_role)
    with pytest.raises(DataError, match=r"row 0 .*message 0 content must hold text, got int"):
        prepare_data(cfg(), [{"messages": [{"role": "user", "content": 5}]}])
    with pytest.raises(
        DataError, match=r"`<in-memory>` has a column with values of mixed types.*'Be brief.'"
    ):
        prepare_data(cfg(), [CHATS[0], {"messages": [{"role": "user", "content": 5}]}])
    with pytest.raises(DataError, match=r'message 0 must be a dict with "role" and "content"'):
        prepare_data(cfg(), [{"messages": [{"role": "user"}]}])


def test_bad_values(tmp_path):
    with pytest.raises(DataError, match=r"row 2 of `<in-memory>`: column `text` holds 1,000,001 characters"):
        prepare_data(cfg(), ["a", "b", "x" * 1_000_001])
    assert prepare_data(cfg(), ["y" * 200_000]).num_train == 1  # long is fine; the trainer truncates
    with pytest.raises(DataError, match=r"row 0 of `<in-memory>`: column `text` must hold text, got int"):
        prepare_data(cfg(), [{"text": 5}])
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl` line 2 is not valid JSON"):
        load_raw(str(path))


# ----------------------------------------------------------------------------------------------------
# MLflow


def test_mlflow_dataset_describes_the_rows(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"row {i}"} for i in range(7)])
    data = prepare_data(cfg(dataset=str(path)))
    ds = mlflow_dataset(data.train, source=data.source, name=data.name)
    assert ds.name == "reviews"
    assert ds.source._get_source_type() == "local"
    assert json.loads(ds.source.to_json())["uri"] == str(path.resolve())
    assert len(ds.digest) == 16
    assert ds.schema.input_names() == ["text"]
    assert ds.profile["num_rows"] == 7
    assert mlflow_dataset(data.train, source=data.source, name=data.name).digest == ds.digest
    other = prepare_data(cfg(), ["something else"])
    assert mlflow_dataset(other.train, source=other.source, name=other.name).digest != ds.digest


def test_mlflow_dataset_hub_demo_and_in_memory_sources():
    train = datasets.Dataset.from_dict({"text": ["a", "b"]})
    hub = mlflow_dataset(train, source="smolora-test/no-such-dataset", name="hub")
    assert hub.source._get_source_type() == "hugging_face"
    assert json.loads(hub.source.to_json())["path"] == "smolora-test/no-such-dataset"
    demo = mlflow_dataset(train, source=DEMO_DATASET, name="smolora-reviews")
    assert json.loads(demo.source.to_json())["uri"].endswith("reviews.jsonl")
    memory = mlflow_dataset(train, source="<in-memory>", name="in-memory")
    assert memory.source._get_source_type() == "code"


def test_mlflow_dataset_can_be_logged_as_a_run_input(tracking_uri):
    import mlflow
    from mlflow import MlflowClient

    data = prepare_data(cfg(eval_fraction=0.1, chunk_words=0))
    with mlflow.start_run() as run:
        mlflow.log_input(mlflow_dataset(data.train, source=data.source, name=data.name), context="training")
        mlflow.log_input(mlflow_dataset(data.eval, source=data.source, name=data.name), context="eval")
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert set(by_context) == {"training", "eval"}
    logged = by_context["training"]
    assert logged.name == "smolora-reviews"
    assert json.loads(logged.profile)["num_rows"] == 360
    assert json.loads(logged.schema)["mlflow_colspec"][0]["name"] == "text"
    assert json.loads(by_context["eval"].profile)["num_rows"] == 40
