"""The smolora flavor: save/log/load round trips, adapter mode, integrity checks, validation, threads."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

PIP = ["torch", "transformers", "safetensors"]  # explicit, so only one test pays for inference
PROMPTS = ["The food was", "Our waiter brought", "I would come back because", "Great"]


def _save(path, model_dir=None, **kw):
    from smolora_mlflow import flavor

    kw.setdefault("pip_requirements", PIP)
    flavor.save_model(path, model_dir, **kw)
    return Path(path)


def _native(model_dir, prompts, **params):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.generation import generate

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return generate(model, AutoTokenizer.from_pretrained(model_dir), prompts, **params)


@pytest.fixture(scope="module")
def merged_path(tmp_path_factory, demo_model_dir):
    return _save(tmp_path_factory.mktemp("flavor") / "merged", demo_model_dir)


@pytest.fixture(scope="module")
def loaded(merged_path):
    import mlflow

    return mlflow.pyfunc.load_model(str(merged_path))


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, demo_model_dir):
    """A LoRA adapter with random B (so it changes outputs) on the demo model, and its merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with quiet_upstream_deprecations():  # peft 0.21 reads a transformers-5-deprecated attribute
        peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(root / "merged")
    return root / "adapter", root / "merged"


# ----------------------------------------------------------------------------------------------------
# round trips


def test_pyfunc_round_trip_equals_native_generate(loaded, demo_model_dir):
    expected = _native(demo_model_dir, PROMPTS, max_new_tokens=8)
    got = loaded.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 8})
    assert list(got.columns) == ["generated_text"]
    assert got["generated_text"].tolist() == expected
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "seed": 11}
    assert loaded.predict({"prompt": PROMPTS[:2]}, params=sampled)["generated_text"].tolist() == _native(
        demo_model_dir, PROMPTS[:2], **sampled
    )


def test_defaults_come_from_generation_config(loaded, demo_model_dir):
    # The demo's generation_config sets max_new_tokens=32; the signature and predictions follow it.
    params = {p.name: p.default for p in loaded.metadata.get_params_schema().params}
    assert params["max_new_tokens"] == 32 and params["do_sample"] is False and params["seed"] == -1
    expected = _native(demo_model_dir, PROMPTS[:1], max_new_tokens=32)
    assert loaded.predict({"prompt": PROMPTS[:1]})["generated_text"].tolist() == expected


def test_input_forms(loaded, tiny_llama_dir):
    one = {"max_new_tokens": 5}
    ref = loaded.predict(pd.DataFrame({"prompt": PROMPTS}), params=one)["generated_text"].tolist()
    assert loaded.predict({"prompt": PROMPTS}, params=one)["generated_text"].tolist() == ref
    assert loaded.predict([{"prompt": p} for p in PROMPTS], params=one)["generated_text"].tolist() == ref
    impl = loaded._model_impl  # the wrapper itself also takes bare strings and lists
    assert impl.predict(PROMPTS, params=one)["generated_text"].tolist() == ref
    assert impl.predict(PROMPTS[0], params=one)["generated_text"].tolist() == ref[:1]
    # A plain-format model reads a lone user message as the plain prompt it was trained on, not chat-rendered.
    assert impl.prompt_format == "plain"
    msgs = [{"role": "user", "content": "The food was"}]
    chat_ref = impl.predict("The food was", params=one)["generated_text"].tolist()
    assert impl.predict(msgs, params=one)["generated_text"].tolist() == chat_ref
    assert impl.predict([msgs, msgs], params=one)["generated_text"].tolist() == chat_ref * 2
    framed = loaded.predict(pd.DataFrame({"prompt": [msgs, "Great"]}), params=one)
    assert framed["generated_text"].tolist() == chat_ref + ref[3:]


def test_full_text_and_streaming(loaded):
    full = loaded.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 6, "return_full_text": True})
    short = loaded.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 6})
    assert full["generated_text"][0] == "The food was" + short["generated_text"][0]
    pieces = list(loaded.predict_stream({"prompt": "The food was"}, params={"max_new_tokens": 6}))
    assert len(pieces) > 1 and "".join(pieces) == short["generated_text"][0]


def test_mlmodel_records_flavor_block(merged_path, demo_model_dir):
    from smolora_mlflow.flavor import weights_sha256

    mlmodel = yaml.safe_load((merged_path / "MLmodel").read_text())
    pf, block = mlmodel["flavors"]["python_function"], mlmodel["flavors"]["smolora"]
    assert pf["loader_module"] == "smolora_mlflow.flavor" and pf["streamable"] is True
    assert pf["code"] == "code" and (merged_path / "code/smolora_mlflow/flavor/__init__.py").is_file()
    assert block["mode"] == "merged" and block["data"] == "model"
    assert block["file_sha256"]["model.safetensors"]
    assert weights_sha256(merged_path / "model") == weights_sha256(demo_model_dir)
    assert block["transformers_version"] and block["torch_version"] and "peft_version" not in block
    assert block["generation_defaults"]["max_new_tokens"] == 32 and block["max_new_tokens_limit"] == 1024
    assert block["context_length"] == 512
    assert not list((merged_path / "model").glob("*.bin"))
    assert "# " in (merged_path / "README.md").read_text()
    example = json.loads((merged_path / "input_example.json").read_text())
    assert example["inputs"] == {"columns": ["prompt"], "data": [["Once upon a time"]]}
    assert example["params"] == {"max_new_tokens": 8}
    assert (merged_path / "requirements.txt").read_text().split("\n")[0].startswith("mlflow")


def test_log_model_and_load_from_runs_uri(tracking_uri, demo_model_dir):
    import mlflow

    from smolora_mlflow import flavor

    with mlflow.start_run() as run:
        info = flavor.log_model(
            "model", demo_model_dir, pip_requirements=PIP, training_run_id=run.info.run_id,
            registered_model_name="reviews",
        )
    assert info.flavors["smolora"]["training_run_id"] == run.info.run_id
    expected = _native(demo_model_dir, PROMPTS[:2], max_new_tokens=6)
    for uri in (f"runs:/{run.info.run_id}/model", info.model_uri, "models:/reviews/1"):
        got = mlflow.pyfunc.load_model(uri).predict({"prompt": PROMPTS[:2]}, params={"max_new_tokens": 6})
        assert got["generated_text"].tolist() == expected
    model, tok = flavor.load_model(f"runs:/{run.info.run_id}/model", device="cpu")
    from smolora_mlflow.models.generation import generate

    assert generate(model, tok, PROMPTS[:2], max_new_tokens=6) == expected


# ----------------------------------------------------------------------------------------------------
# adapter mode


def test_adapter_mode_matches_merged_mode(tmp_path, lora_dirs, demo_model_dir):
    import mlflow

    from smolora_mlflow import flavor

    adapter_dir, merged_dir = lora_dirs
    a = _save(tmp_path / "a", mode="adapter", adapter_dir=adapter_dir, base_model=str(demo_model_dir),
              pip_requirements=[*PIP, "peft"], training_run_id="abc123")
    m = _save(tmp_path / "m", merged_dir)
    assert sorted(p.name for p in (a / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    block = yaml.safe_load((a / "MLmodel").read_text())["flavors"]["smolora"]
    assert block["mode"] == "adapter" and block["base_model"] == str(Path(demo_model_dir).resolve())
    assert block["base_model_sha256"] == flavor.weights_sha256(demo_model_dir)
    assert block["lora"]["r"] == 4 and sorted(block["lora"]["target_modules"]) == ["q_proj", "v_proj"]
    assert block["peft_version"] and block["training_run_id"] == "abc123"
    params = {"max_new_tokens": 10}
    out_a = mlflow.pyfunc.load_model(str(a)).predict({"prompt": PROMPTS}, params=params)
    out_m = mlflow.pyfunc.load_model(str(m)).predict({"prompt": PROMPTS}, params=params)
    assert out_a["generated_text"].tolist() == out_m["generated_text"].tolist()
    assert out_a["generated_text"].tolist() != _native(demo_model_dir, PROMPTS, **params)  # the adapter acts
    peft_model, _ = flavor.load_model(str(a), merge=False)
    assert type(peft_model).__name__ == "PeftModelForCausalLM" or hasattr(peft_model, "peft_config")
    adapter_bytes = (a / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (m / "model" / "model.safetensors").stat().st_size


def test_adapter_refuses_other_base_weights(tmp_path, lora_dirs, demo_model_dir, tiny_llama_dir):
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from safetensors.torch import load_file, save_file

    from smolora_mlflow import flavor

    base_copy = tmp_path / "base"
    shutil.copytree(demo_model_dir, base_copy)
    a = _save(tmp_path / "a", mode="adapter", adapter_dir=lora_dirs[0], base_model=str(base_copy),
              pip_requirements=[*PIP, "peft"])
    recorded = flavor.weights_sha256(base_copy)
    with pytest.raises(MlflowException, match="base_model_path") as e:
        flavor.load_model(str(a), base_model_path=str(tiny_llama_dir))
    assert recorded in e.value.message and flavor.weights_sha256(tiny_llama_dir) in e.value.message
    tensors = load_file(base_copy / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name]) * 1e-3
    save_file(tensors, base_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MlflowException, match=r"sha256 .* but this adapter was trained"):
        mlflow.pyfunc.load_model(str(a))
    shutil.rmtree(base_copy)
    with pytest.raises(MlflowException, match="does not exist"):
        flavor.load_model(str(a))


# ----------------------------------------------------------------------------------------------------
# integrity and safety


def test_tampered_files_are_refused(tmp_path, merged_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    for rel, damage in [("model.safetensors", "truncate"), ("tokenizer.json", "append")]:
        copy = tmp_path / f"copy-{damage}"
        shutil.copytree(merged_path, copy)
        target = copy / "model" / rel
        if damage == "truncate":
            target.write_bytes(target.read_bytes()[:-100])
        else:
            target.write_bytes(target.read_bytes() + b" ")
        with pytest.raises(MlflowException, match=rf"Model file `.*{rel}` does not match the sha256"):
            mlflow.pyfunc.load_model(str(copy))
    (copy / "model" / "config.json").unlink()
    with pytest.raises(MlflowException, match=r"config\.json` is missing"):
        mlflow.pyfunc.load_model(str(copy))


@pytest.mark.parametrize(("name", "content"), [
    ("special_tokens_map.json", {"additional_special_tokens": ["<extra_0>", "<extra_1>"]}),
    ("added_tokens.json", {"<extra_0>": 100000, "<extra_1>": 100001}),
])
def test_files_the_manifest_does_not_list_are_refused(tmp_path, merged_path, name, content):
    import mlflow
    from mlflow.exceptions import MlflowException

    from smolora_mlflow import flavor

    copy = tmp_path / "copy"
    shutil.copytree(merged_path, copy)
    (copy / "model" / name).write_text(json.dumps(content))
    for load in (mlflow.pyfunc.load_model, flavor.load_model):
        with pytest.raises(MlflowException, match=rf"does not list: \['{name}'\]") as err:
            load(str(copy))
        assert err.value.error_code == "INVALID_STATE"
    (copy / "model" / name).unlink()  # without it the same folder loads and predicts again
    assert len(mlflow.pyfunc.load_model(str(copy)).predict({"prompt": ["Hi"]}, params={"max_new_tokens": 2})) == 1


def test_pickle_weights_are_refused(tmp_path, demo_model_dir):
    from mlflow.exceptions import MlflowException

    src = tmp_path / "src"
    shutil.copytree(demo_model_dir, src)
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(MlflowException, match=r"Pickle-based files \['pytorch_model.bin'\]"):
        _save(tmp_path / "out", src)


def test_loads_with_pickle_deserialization_disabled(merged_path, monkeypatch, demo_model_dir):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    got = mlflow.pyfunc.load_model(str(merged_path)).predict({"prompt": PROMPTS[:1]}, params={"max_new_tokens": 4})
    assert got["generated_text"].tolist() == _native(demo_model_dir, PROMPTS[:1], max_new_tokens=4)


def test_inferred_requirements_of_a_merged_model(tmp_path, demo_model_dir):
    import logging

    from smolora_mlflow import flavor

    path = tmp_path / "m"
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("mlflow").addHandler(handler)
    try:
        flavor.save_model(path, demo_model_dir)  # the one test that runs MLflow's requirement inference
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert not [m for m in seen if "local version label" in m]  # torch 2.x+cpu: pinned without it, silently
    assert not any("+" in r for r in (path / "requirements.txt").read_text().split())
    reqs = [r.split("==")[0].lower() for r in (path / "requirements.txt").read_text().split()]
    assert {"mlflow", "torch", "transformers", "safetensors"} <= set(reqs)
    assert not {"peft", "trl", "smolora-mlflow"} & set(reqs)
    assert all("==" in r for r in (path / "requirements.txt").read_text().split() if not r.startswith("mlflow"))
    assert any(r.startswith("peft==") for r in flavor.get_default_pip_requirements("adapter"))
    assert not any(r.startswith(("peft", "trl")) for r in flavor.get_default_pip_requirements())


def test_save_model_argument_errors(tmp_path, demo_model_dir):
    from mlflow.exceptions import MlflowException

    demo = demo_model_dir
    cases = [
        ({"model_dir": demo, "mode": "full"}, "`mode` must be one of"),
        ({}, "exactly one of `model_dir` or `model`"),
        ({"mode": "adapter"}, "exactly one of `adapter_dir`"),
        ({"mode": "adapter", "adapter_dir": demo}, "lacks"),
        ({"model_dir": demo, "max_new_tokens_limit": 0}, "max_new_tokens_limit"),
        ({"model_dir": demo, "generation_defaults": {"max_tokens": 3}}, r"unknown parameter\(s\) \['max_tokens'\]"),
        ({"model_dir": demo, "generation_defaults": {"top_p": 2.0}}, r"`top_p` must be in \(0, 1\]"),
    ]
    for i, (kw, message) in enumerate(cases):
        with pytest.raises(MlflowException, match=message):
            _save(tmp_path / str(i), **kw)


# ----------------------------------------------------------------------------------------------------
# request validation


BAD_INPUTS = [
    (pd.DataFrame({"text": ["a"]}), None, r"missing inputs \['prompt'\].*extra inputs: \['text'\]"),
    (pd.DataFrame({"prompt": [""]}), None, "row 0 is an empty string"),
    (pd.DataFrame({"prompt": ["ok", None]}), None, "row 1 is missing"),
    (pd.DataFrame({"prompt": [3]}), None, "Incompatible input types for column prompt"),
    ({"prompt": ["a"]}, {"max_new_tokens": 0}, r"`max_new_tokens` must be in 1\.\.1024, got 0"),
    ({"prompt": ["a"]}, {"max_new_tokens": 4096}, r"`max_new_tokens` must be in 1\.\.1024, got 4096"),
    ({"prompt": ["a"]}, {"do_sample": True, "temperature": 0.0}, "`temperature` must be >= 0.001 when `do_sample`"),
    ({"prompt": ["a"]}, {"do_sample": True, "temperature": 1e-300}, "`temperature` must be >= 0.001"),  # 0 in float32
    ({"prompt": ["a"]}, {"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
    ({"prompt": ["a"]}, {"top_k": -1}, "`top_k` must be >= 0"),
    ({"prompt": ["a"]}, {"repetition_penalty": 0.0}, "`repetition_penalty` must be > 0"),
    ({"prompt": ["a"]}, {"max_new_tokens": "many"}, "max_new_tokens"),
    ({"prompt": ["a"]}, {"seed": 2**64}, r"`seed` must be in 0\.\.2\*\*63-1"),  # torch.manual_seed overflows
    ({"prompt": ["word " * 600]}, None, "exceeds the model's context of 512 tokens"),
]


@pytest.mark.parametrize(("model_input", "params", "message"), BAD_INPUTS)
def test_bad_inputs_raise_400(loaded, model_input, params, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as e:
        loaded.predict(model_input, params=params)
    assert e.value.get_http_status_code() == 400


def test_wrapper_level_validation(loaded, tmp_path, demo_model_dir):
    import mlflow
    from mlflow.exceptions import MlflowException

    impl = loaded._model_impl
    for model_input, params, message in [
        ({"prompt": ["a"]}, {"max_tokens": 5}, r"unknown parameter\(s\) \['max_tokens'\]"),
        ([], None, "no prompts"),
        ([1, 2], None, "prompt 0 must be a string"),
        ({"text": ["a"]}, None, r"no `prompt` key; it has keys \['text'\]"),
        (pd.DataFrame({"text": ["a"]}), None, r"no `prompt` column; it has columns \['text'\]"),
        (42, None, "Unsupported input type int"),
        ({"prompt": ["a"]}, [1], "`params` must be a dict"),
    ]:
        with pytest.raises(MlflowException, match=message) as e:
            impl.predict(model_input, params=params)
        assert e.value.get_http_status_code() == 400
    # MLflow's pyfunc layer drops unknown params with a warning before the model sees them.
    out = loaded.predict({"prompt": ["a"]}, params={"max_tokens": 5, "max_new_tokens": 3})
    assert out["generated_text"].tolist() == impl.predict("a", params={"max_new_tokens": 3})["generated_text"].tolist()
    with pytest.raises(MlflowException, match="exactly one prompt"):
        list(loaded.predict_stream({"prompt": ["a", "b"]}))  # pyfunc wraps it in a lazy generator
    src = tmp_path / "plain"
    shutil.copytree(demo_model_dir, src)
    (src / "chat_template.jinja").unlink()
    plain = mlflow.pyfunc.load_model(str(_save(tmp_path / "p", src, max_prompt_tokens=4)))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with pytest.raises(MlflowException, match=r"trained on plain prompts \(prompt_format: plain\), not chat turns"):
        plain.predict(pd.DataFrame({"prompt": [conversation]}))
    with pytest.raises(MlflowException, match="more than this model's max_prompt_tokens"):
        plain.predict({"prompt": ["one two three four five six"]})


def test_unencodable_prompts_and_template_refusals_are_400_not_500(loaded):
    """A lone surrogate (a TypeError in the tokenizer) and a chat template's raise_exception (a jinja2
    TemplateError) are the caller's mistakes: MlflowException 400 naming them."""
    from mlflow.exceptions import MlflowException

    impl = loaded._model_impl
    for model_input in ("a\ud800", ["ok", "\udfff"], [{"role": "user", "content": "hi \ud800"}],
                        pd.DataFrame({"prompt": [[{"role": "\ud800", "content": "hi"}]]})):
        with pytest.raises(MlflowException, match=r"lone surrogate \(U\+D[8-F][0-9A-F]{2}\)") as e:
            impl.predict(model_input)
        assert e.value.get_http_status_code() == 400
    template, fmt = impl.tokenizer.chat_template, impl.prompt_format
    # A plain-format model reads a lone user message as plain text: the template speaks only for a chat model.
    impl.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    impl.prompt_format = "chat"
    try:
        with pytest.raises(MlflowException, match="roles must alternate") as e:
            impl.predict([{"role": "user", "content": "hi"}])
        assert e.value.get_http_status_code() == 400
    finally:
        impl.tokenizer.chat_template, impl.prompt_format = template, fmt


# ----------------------------------------------------------------------------------------------------
# concurrency


def test_concurrent_predicts_are_coalesced_and_correct(merged_path, demo_model_dir):
    import mlflow

    model = mlflow.pyfunc.load_model(str(merged_path), model_config={"coalesce_window_ms": 200})
    prompts = [f"{p} number {i}" for i, p in enumerate(PROMPTS * 2)]
    expected = _native(demo_model_dir, prompts, max_new_tokens=6)
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def call(i: int) -> None:
        try:
            barrier.wait()
            out = model.predict({"prompt": [prompts[i]]}, params={"max_new_tokens": 6})
            results[i] = out["generated_text"].tolist()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert [results[i] for i in range(len(prompts))] == [[e] for e in expected]
    stats = model._model_impl.stats
    assert stats.requests == len(prompts)
    assert stats.batches < len(prompts) and stats.coalesced_requests >= 2 and stats.largest_batch >= 2
