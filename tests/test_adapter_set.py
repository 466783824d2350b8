"""Adapter sets: several registered LoRA adapters served on one resident base, mixed in one generate call.

Real parts only: adapters made with PEFT on the demo base, logged in adapter mode to a per-test SQLite
registry, an adapter set logged and registered beside them, loaded with ``mlflow.pyfunc.load_model`` and
served by a real `smolora serve` queried with the real `openai` client.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

PIP = ["torch", "transformers", "safetensors", "peft"]
PROMPTS = ["The food was", "Our waiter brought", "Great"]
ROOT = Path(__file__).resolve().parents[1]


def _make_adapter(out: Path, base_dir, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with quiet_upstream_deprecations():
        get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, demo_model_dir, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = {f"s{seed}": _make_adapter(root / f"s{seed}", demo_model_dir, seed) for seed in range(4)}
    dirs["other_base"] = _make_adapter(root / "other", tiny_llama_dir, 9)
    return dirs


def _register(name: str, adapter_dir: Path, base_dir) -> str:
    import mlflow

    from smolora_mlflow import flavor

    with mlflow.start_run():
        info = flavor.log_model("model", mode="adapter", adapter_dir=adapter_dir, base_model=str(base_dir),
                                pip_requirements=PIP, registered_model_name=name)
    return info.registered_model_version


def _native(version_uri: str, prompts, **params) -> list[str]:
    import mlflow

    out = mlflow.pyfunc.load_model(version_uri).predict({"prompt": list(prompts)}, params=params)
    return out["generated_text"].tolist()


@pytest.fixture
def registry(tracking_uri, adapter_dirs, demo_model_dir):
    """Registered adapters a0..a2 (version 1 each, alias champion), a0 version 2, and the set `bots`."""
    from smolora_mlflow import registry as reg
    from smolora_mlflow.flavor import adapter_set

    for i in range(3):
        _register(f"a{i}", adapter_dirs[f"s{i}"], demo_model_dir)
        reg.set_alias(f"a{i}", "champion", 1)
    _register("a0", adapter_dirs["s3"], demo_model_dir)  # version 2, not yet champion
    import mlflow

    refs = {"a0": "models:/a0@champion", "a1": "models:/a1/1", "a2": "models:/a2@champion"}
    with mlflow.start_run():
        adapter_set.log_adapter_set("set", refs, registered_model_name="bots", pip_requirements=PIP,
                                    generation_defaults={"max_new_tokens": 6})
    return tracking_uri


def test_each_request_gets_its_adapter_and_different_adapters_share_one_generate(registry):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/bots/1", model_config={"coalesce_window_ms": 300,
                                                                      "refresh_seconds": 0})
    wrapper = model._model_impl
    assert wrapper.adapter_names == ["a0", "a1", "a2"]
    want = {f"a{i}": _native(f"models:/a{i}/1", PROMPTS, max_new_tokens=6) for i in range(3)}
    assert len({tuple(v) for v in want.values()}) == 3  # the adapters really differ
    got, barrier = {}, threading.Barrier(3)

    def ask(name: str) -> None:
        barrier.wait()
        got[name] = model.predict({"prompt": PROMPTS}, params={"adapter": name})["generated_text"].tolist()

    batches = wrapper.stats.batches
    threads = [threading.Thread(target=ask, args=(n,)) for n in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert wrapper.stats.batches - batches == 1 and wrapper.stats.largest_batch == 9  # one mixed generate call
    # Each adapter costs its own weights, not another base: the model holds one base plus the adapters.
    import torch
    from safetensors.torch import load_file

    pool = wrapper.adapters
    saved = {n: sum(t.numel() * t.element_size() for t in load_file(
        next(Path(mlflow.artifacts.download_artifacts(f"models:/{n}/1")).rglob("adapter_model.safetensors"))
    ).values()) for n in want}
    assert pool.memory_bytes() == saved
    total = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
    base = sum(p.numel() * p.element_size() for p in wrapper.model.get_base_model().parameters()) - sum(saved.values())
    assert total == base + sum(saved.values()) and isinstance(wrapper.model.base_model.model, torch.nn.Module)
    with pytest.raises(MlflowException, match=r"`adapter` is 'a9', which this adapter set does not serve; use one "
                                              r"of \['a0', 'a1', 'a2'\]"):
        model.predict({"prompt": PROMPTS}, params={"adapter": "a9"})
    with pytest.raises(MlflowException, match="name the adapter with param `adapter`"):
        model.predict({"prompt": PROMPTS})
    pieces = list(model.predict_stream({"prompt": ["The food was"]}, params={"adapter": "a2", "max_new_tokens": 6}))
    assert "".join(pieces) == want["a2"][0]


def test_streams_for_different_adapters_share_one_running_batch(registry):
    """Each stream reads its own adapter's tokens, generated in the same forwards as the others'."""
    import mlflow

    model = mlflow.pyfunc.load_model("models:/bots/1", model_config={"coalesce_window_ms": 300,
                                                                      "refresh_seconds": 0})
    wrapper = model._model_impl
    want = {f"a{i}": _native(f"models:/a{i}/1", PROMPTS[:1], max_new_tokens=10)[0] for i in range(3)}
    got, barrier = {}, threading.Barrier(3)

    def read(name: str) -> None:
        barrier.wait()
        stream = wrapper.open_stream(PROMPTS[0], {"max_new_tokens": 10}, adapter=name)
        got[name] = ("".join(stream), stream.result.token_ids)

    threads = [threading.Thread(target=read, args=(n,)) for n in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {n: text for n, (text, _) in got.items()} == want
    assert all(len(ids) == 10 for _, ids in got.values())
    assert wrapper.stats.batches == 1 and wrapper.stats.largest_batch == 3  # admitted together, one batch


def test_moving_an_alias_is_picked_up_without_reloading(registry):
    import mlflow

    from smolora_mlflow import registry as reg

    model = mlflow.pyfunc.load_model("models:/bots/1", model_config={"refresh_seconds": 0})
    pool = model._model_impl.adapters
    v1, v2 = (_native(f"models:/a0/{v}", PROMPTS, max_new_tokens=6) for v in (1, 2))
    assert v1 != v2
    assert model.predict({"prompt": PROMPTS}, params={"adapter": "a0"})["generated_text"].tolist() == v1
    assert pool.refresh() == []  # nothing moved
    reg.set_alias("a0", "champion", 2)
    assert pool.refresh() == ["a0"]
    assert model.predict({"prompt": PROMPTS}, params={"adapter": "a0"})["generated_text"].tolist() == v2
    assert pool.loaded["a0"].uri == "models:/a0/2"
    assert sorted(model._model_impl.model.peft_config) == sorted(e.internal for e in pool.loaded.values())


def test_the_refresh_thread_reads_its_own_store_and_ends_with_the_model(registry, tmp_path, monkeypatch):
    """The periodic refresh reads the stores the set was loaded from, and stops once the model is dropped
    (a leaked thread used to migrate whatever SQLite store later tests pointed MLflow at)."""
    import gc

    import mlflow

    from smolora_mlflow import registry as reg

    model = mlflow.pyfunc.load_model("models:/bots/1", model_config={"refresh_seconds": 0.05})
    pool = model._model_impl.adapters
    thread = pool._thread
    assert thread is not None and thread.is_alive()
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    mlflow.set_tracking_uri(f"sqlite:///{elsewhere}")
    mlflow.set_registry_uri(f"sqlite:///{elsewhere}")
    reg.set_alias("a0", "champion", 2, client=mlflow.MlflowClient(registry, registry))
    deadline = time.monotonic() + 20
    while pool.loaded["a0"].uri != "models:/a0/2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.loaded["a0"].uri == "models:/a0/2"  # the move in the set's own registry was picked up
    assert not elsewhere.exists()  # and the store the process points at now was never touched
    del model, pool
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    mlflow.set_registry_uri(registry)


def test_an_adapter_trained_on_another_base_is_refused(registry, adapter_dirs, tiny_llama_dir, tmp_path):
    from mlflow.exceptions import MlflowException

    from smolora_mlflow.flavor import adapter_set

    _register("other", adapter_dirs["other_base"], tiny_llama_dir)
    with pytest.raises(MlflowException, match=r"Adapter `b` \(models:/other/1\) was trained on base weights with "
                                              r"sha256 \w+, but this adapter set's base has sha256 \w+"):
        adapter_set.save_adapter_set(tmp_path / "bad", {"a": "models:/a1/1", "b": "models:/other/1"},
                                     pip_requirements=PIP)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(MlflowException, match="Adapter name 'no spaces'"):
        adapter_set.save_adapter_set(tmp_path / "bad", {"no spaces": "models:/a1/1"}, pip_requirements=PIP)


def test_edited_mlmodel_references_and_mixed_prompt_formats_are_refused(registry, adapter_dirs, demo_model_dir,
                                                                         tmp_path):
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from smolora_mlflow import flavor
    from smolora_mlflow.flavor import adapter_set

    # MLmodel's `adapters` is covered by the manifest digest (format 2), which the MLmodel's model_id leads to;
    # without that record, the hashed adapters.json is what counts.
    local = Path(mlflow.artifacts.download_artifacts("models:/bots/1", dst_path=str(tmp_path / "dl")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    mlmodel["flavors"]["smolora"]["adapters"]["a1"] = "models:/a0/2"
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(MlflowException, match=f"logged model {mlmodel['model_id']} has digest"):
        mlflow.pyfunc.load_model(str(local), model_config={"refresh_seconds": 0})
    del mlmodel["model_id"]
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(MlflowException, match=r"the adapters in MLmodel \(.*'a1': 'models:/a0/2'.*\) differ from "
                                              r"those in its hashed `adapter_set/adapters.json` \(.*'a1': "
                                              r"'models:/a1/1'") as e:
        mlflow.pyfunc.load_model(str(local), model_config={"refresh_seconds": 0})
    assert e.value.error_code == "INVALID_STATE"

    with mlflow.start_run():
        flavor.log_model("model", mode="adapter", adapter_dir=adapter_dirs["s1"], base_model=str(demo_model_dir),
                         pip_requirements=PIP, registered_model_name="chatty", prompt_format="chat")
    with pytest.raises(MlflowException, match=r"must share one prompt format .*got \{'a': 'plain', 'c': 'chat'\}"):
        adapter_set.save_adapter_set(tmp_path / "mixed", {"a": "models:/a1/1", "c": "models:/chatty/1"},
                                     pip_requirements=PIP)
    assert not (tmp_path / "mixed").exists()
    adapter_set.save_adapter_set(tmp_path / "chat", {"c": "models:/chatty/1"}, pip_requirements=PIP)
    wrapper = mlflow.pyfunc.load_model(str(tmp_path / "chat"), model_config={"refresh_seconds": 0})._model_impl
    assert wrapper.prompt_format == "chat"


@pytest.mark.slow
def test_served_adapter_set_through_the_openai_client(registry, tmp_path):
    import openai
    from conftest import free_port
    from openai import OpenAI
    from servers import launch_server

    from smolora_mlflow import registry as reg

    want = {f"a{i}": _native(f"models:/a{i}/1", PROMPTS[:1], max_new_tokens=6)[0] for i in range(3)}
    v2 = _native("models:/a0/2", PROMPTS[:1], max_new_tokens=6)[0]
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MLFLOW_TRACKING_URI": registry, "SERVING_MODEL_CONFIG": '{"refresh_seconds": 0.5}'}
    srv = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", "models:/bots/1", "-p", str(port)], port,
                        tmp_path / "server.log", cwd=tmp_path, env=env)
    try:
        srv.wait("/ping", timeout=180)
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["a0", "a1", "a2"]
        for name, text in want.items():
            assert client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=6).choices[0].text == text
        chunks = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=6, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == want["a1"]
        with pytest.raises(openai.NotFoundError, match="The model `a9` does not exist"):
            client.completions.create(model="a9", prompt=PROMPTS[0], max_tokens=6)
        reg.set_alias("a0", "champion", 2)  # picked up by the running server
        deadline = time.monotonic() + 60
        while client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=6).choices[0].text != v2:
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.3)
        import requests

        for bad in (["a1"], {}):  # not a string: the client's mistake, a 400 naming the value
            for path, body in (("/stream", {"prompt": PROMPTS[0], "adapter": bad}),
                               ("/invocations", {"inputs": {"prompt": [PROMPTS[0]]}, "params": {"adapter": bad}})):
                answer = requests.post(f"{srv.url}{path}", json=body, timeout=60)
                assert answer.status_code == 400, (path, bad, answer.text)
                assert "adapter" in answer.json()["message"], answer.text
        metrics = requests.get(f"{srv.url}/metrics", timeout=10).text
        for name in want:
            assert f'smolora_requests_total{{adapter="{name}"}}' in metrics
            assert f'smolora_generated_tokens_total{{adapter="{name}"}}' in metrics
    finally:
        srv.stop()
