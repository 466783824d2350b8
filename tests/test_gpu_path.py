"""The GPU path, proven on the CPU (issue 20): Hub kernels off unless asked, the merged model saved in the
base's dtype, and the static-cache decode path equal to the dynamic one.

transformers 5 turns Hub kernels on by default (``from_pretrained(use_kernels=None)`` kernelizes the model,
and on CUDA ``model.train()`` then resolves kernels from the Hub). On the CPU the same call reaches
``kernels.kernelize`` (it just finds no CPU kernels), so a guard that makes ``kernelize`` raise catches any
load that did not turn them off, here as on a GPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]
PIP = ["torch", "transformers", "safetensors"]
PROMPTS = ["The food was", "Our waiter brought us", "I would come back because the", "Great"]

# Loaded by every Python process that has this folder on PYTHONPATH (a `smolora serve` subprocess): it makes
# `kernels.kernelize` raise before transformers imports it, and writes the PID to prove it was active.
SITECUSTOMIZE = '''
import os
_marker = os.environ.get("SMOLORA_TEST_FORBID_KERNELIZE")
if _marker:
    import kernels

    def _forbidden(*args, **kwargs):
        raise RuntimeError("kernels.kernelize was called: a model was loaded with Hub kernels on")

    kernels.kernelize = _forbidden
    with open(_marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
'''


def safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return dtypes


# ----------------------------------------------------------------------------------------------------
# 1. Hub kernels


@pytest.mark.slow
def test_hub_kernels_stay_off_from_training_to_smolora_serve(tmp_path, tracking_uri, smolora_cache, kernelize_calls):
    import mlflow
    import requests
    from conftest import free_port
    from servers import launch_server

    from smolora_mlflow import SmoLoRA, SmoloraConfig

    lora = SmoLoRA(config=SmoloraConfig(**TINY_TRAINING, output_dir=str(tmp_path / "out")))
    result = lora.train()
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.params["hub_kernels"] == "False"
    assert run.data.tags["smolora.attn_implementation"] == "sdpa"
    assert run.data.tags["smolora.padding_free"] == "false"
    lora.save()
    assert lora.model.use_kernels is False
    info = lora.log_model(pip_requirements=PIP)
    assert mlflow.models.get_model_info(info.model_uri).flavors["smolora"]["hub_kernels"] is False
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    model, _ = pyfunc.get_raw_model()
    assert model.use_kernels is False
    expected = list(pyfunc.predict({"prompt": PROMPTS[:2]}, params={"max_new_tokens": 6})["generated_text"])
    assert kernelize_calls == []

    # `smolora serve` in its own process, with `kernels.kernelize` made to raise before transformers loads.
    shim, marker = tmp_path / "shim", tmp_path / "kernelize-guard.pids"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "served"))
    port = free_port()
    srv = launch_server([sys.executable, "-m", "smolora_mlflow", "serve", local, "-p", str(port)], port,
                        tmp_path / "server.log", cwd=tmp_path,
                        env={"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)]),
                             "SMOLORA_TEST_FORBID_KERNELIZE": str(marker)})
    try:
        srv.wait("/ping", timeout=180)
        answer = requests.post(f"{srv.url}/invocations", timeout=120,
                               json={"inputs": {"prompt": PROMPTS[:2]}, "params": {"max_new_tokens": 6}})
        assert answer.status_code == 200, answer.text[:500]
    finally:
        srv.stop()
    assert marker.read_text().split(), "the guard never ran in the server"
    assert [row["generated_text"] for row in answer.json()["predictions"]] == expected


def test_hub_kernels_reach_transformers_only_when_asked(tmp_path, demo_model_dir, kernelize_calls):
    import mlflow

    from smolora_mlflow import flavor
    from smolora_mlflow.models.pretrained import load_causal_lm

    model = load_causal_lm(demo_model_dir)
    model.train()  # on CUDA this is where transformers 5 fetched kernels from the Hub (Mode.TRAINING)
    assert model.use_kernels is False and kernelize_calls == []
    asked = load_causal_lm(demo_model_dir, hub_kernels=True)
    assert asked.use_kernels is True and len(kernelize_calls) == 1
    asked.train()
    assert [str(c["mode"]) for c in kernelize_calls] == ["Mode.INFERENCE", "Mode.TRAINING"]
    kernelize_calls.clear()

    flavor.save_model(tmp_path / "off", demo_model_dir, pip_requirements=PIP)
    flavor.save_model(tmp_path / "on", demo_model_dir, pip_requirements=PIP, hub_kernels=True)
    for path, model_config, on in [("off", None, False), ("on", None, True), ("off", {"hub_kernels": True}, True),
                                   ("on", {"hub_kernels": False}, False)]:
        before = len(kernelize_calls)
        model, _ = mlflow.pyfunc.load_model(str(tmp_path / path), model_config=model_config).get_raw_model()
        assert model.use_kernels is on, (path, model_config)
        assert len(kernelize_calls) == before + on, (path, model_config)
    with pytest.raises(mlflow.exceptions.MlflowException, match="`hub_kernels` must be true or false"):
        mlflow.pyfunc.load_model(str(tmp_path / "off"), model_config={"hub_kernels": "maybe"})


def test_hub_kernels_and_merged_dtype_config_fields():
    from smolora_mlflow.cli import build_config, parse_args
    from smolora_mlflow.config import ConfigError, SmoloraConfig

    cfg = SmoloraConfig()
    assert cfg.hub_kernels is False and cfg.merged_dtype == "auto"
    args = parse_args(["train", "--hub_kernels", "--merged_dtype", "bfloat16"])
    assert build_config(args).hub_kernels is True and build_config(args).merged_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="`merged_dtype` must be one of 'auto', 'float32'"):
        SmoloraConfig(merged_dtype="int8")
    with pytest.raises(ConfigError, match="`hub_kernels` must be true or false"):
        SmoloraConfig(hub_kernels="yes")


# ----------------------------------------------------------------------------------------------------
# 2. The merged model in the base's dtype


@pytest.fixture(scope="module")
def bf16_base_and_adapter(tmp_path_factory, demo_model_dir):
    """The demo model saved in bfloat16, and a LoRA adapter with random B (so it changes outputs) on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    root = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.bfloat16).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(root / "base")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    with quiet_upstream_deprecations():
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_merge_saves_in_the_base_dtype_and_pyfunc_loads_it(tmp_path, bf16_base_and_adapter):
    import mlflow
    import torch
    from transformers import AutoTokenizer

    from smolora_mlflow import flavor
    from smolora_mlflow.flavor.files import read_flavor_conf
    from smolora_mlflow.models.adapters import apply_adapter
    from smolora_mlflow.models.generation import generate
    from smolora_mlflow.models.pretrained import load_causal_lm
    from smolora_mlflow.train.merge import merge_adapter

    base, adapter = bf16_base_and_adapter
    auto = merge_adapter(adapter, tmp_path / "auto", base_model=str(base))
    full = merge_adapter(adapter, tmp_path / "f32", base_model=str(base), save_dtype="float32")
    assert (auto.dtype, full.dtype) == ("bfloat16", "float32")
    assert auto.max_abs_logit_diff < 1e-3  # checked in float32, before the cast
    assert safetensors_dtypes(tmp_path / "auto") == {"BF16"} and safetensors_dtypes(tmp_path / "f32") == {"F32"}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("auto", "f32")}
    assert 0.45 < size["auto"] / size["f32"] < 0.55, size
    with pytest.raises(ValueError, match="`merged_dtype` must be auto, float32"):
        merge_adapter(adapter, tmp_path / "bad", base_model=str(base), save_dtype="int8")

    tokenizer = AutoTokenizer.from_pretrained(base)
    on_base = apply_adapter(load_causal_lm(base, dtype=torch.bfloat16), adapter, merge=False)
    expected = generate(on_base, tokenizer, PROMPTS, max_new_tokens=12)
    flavor.save_model(tmp_path / "model", tmp_path / "auto", pip_requirements=PIP)
    assert read_flavor_conf(tmp_path / "model")["dtype"] == "bfloat16"
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert loaded.get_raw_model()[0].dtype == torch.bfloat16  # the saved dtype, on the CPU too
    assert list(loaded.predict({"prompt": PROMPTS}, params={"max_new_tokens": 12})["generated_text"]) == expected
    as_f32 = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"dtype": "float32"})
    assert as_f32.get_raw_model()[0].dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# 3. Decode settings: the static cache


def test_static_cache_greedy_tokens_equal_dynamic(demo_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from smolora_mlflow.models import decoding, generation
    from smolora_mlflow.models.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm(demo_model_dir), AutoTokenizer.from_pretrained(demo_model_dir)
    static = generation.decode_settings(model, "static")
    assert static == decoding.DecodeSettings("static", compile=False)  # the CPU never compiles
    assert generation.decode_settings(model) == decoding.DecodeSettings(decoding.CPU_CACHE_DEFAULT)
    kwargs = generation.generate_kwargs(model, tokenizer, generation.resolve_params({"max_new_tokens": 300}),
                                        static, prompt_tokens=7)
    assert (kwargs["cache_implementation"], kwargs["max_cache_len"], kwargs["disable_compile"]) == ("static", 512,
                                                                                                  True)
    dynamic = generation.generate(model, tokenizer, PROMPTS, max_new_tokens=16, decode=generation.DYNAMIC)
    assert generation.generate(model, tokenizer, PROMPTS, max_new_tokens=16, decode=static) == dynamic
    streamed = "".join(generation.stream(model, tokenizer, PROMPTS[2], max_new_tokens=16, decode=static))
    assert streamed == dynamic[2]

    # Compiled decoding pads a batch to a warmed-up size: 3 prompts run as 4, the extra row is dropped.
    shapes: list[tuple[int, ...]] = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or
                        real_generate(**kw))
    bucketed = decoding.DecodeSettings("static", compile=False, batch_sizes=(1, 4))
    assert generation.generate(model, tokenizer, PROMPTS[:3], max_new_tokens=16, decode=bucketed) == dynamic[:3]
    assert [s[0] for s in shapes] == [4]
    # Warm-up runs one short generate per batch size a compiled decode step will see (a no-op when uncompiled).
    shapes.clear()
    assert generation.warm_up(model, tokenizer, bucketed) == 0.0 and shapes == []
    generation.warm_up(model, tokenizer, decoding.DecodeSettings("static", compile=True, batch_sizes=(1, 4)))
    assert [s[0] for s in shapes] == [1, 4]


def test_decode_settings_errors(demo_model_dir):
    from smolora_mlflow.models import generation
    from smolora_mlflow.models.pretrained import load_causal_lm

    model = load_causal_lm(demo_model_dir)
    with pytest.raises(ValueError, match="`cache_implementation` must be one of auto, dynamic, static, got 'paged'"):
        generation.decode_settings(model, "paged")
    with pytest.raises(ValueError, match="`compile` must be one of auto, true, false"):
        generation.decode_settings(model, "static", "sometimes")
    with pytest.raises(ValueError, match="`compile` is true, but the decode step compiles only with"):
        generation.decode_settings(model, "static", "true")


def test_pyfunc_cache_implementation_model_config(tmp_path, demo_model_dir, monkeypatch):
    import mlflow

    from smolora_mlflow import flavor

    flavor.save_model(tmp_path / "m", demo_model_dir, pip_requirements=PIP)
    outputs, caches = {}, []
    for cache in ("dynamic", "static"):
        loaded = mlflow.pyfunc.load_model(str(tmp_path / "m"), model_config={"cache_implementation": cache,
                                                                              "compile": "false"})
        model, _ = loaded.get_raw_model()
        real_generate = model.generate
        monkeypatch.setattr(model, "generate", lambda real=real_generate, **kw: caches.append(
            kw.get("cache_implementation")) or real(**kw))
        outputs[cache] = list(loaded.predict({"prompt": PROMPTS}, params={"max_new_tokens": 10})["generated_text"])
    # The dynamic cache: the scheduler's rows (model forward, no generate call); the static cache: one whole
    # generate call with it.
    assert caches == ["static"]
    assert outputs["static"] == outputs["dynamic"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="`compile` is true, but"):
        mlflow.pyfunc.load_model(str(tmp_path / "m"), model_config={"cache_implementation": "static",
                                                                     "compile": "true"})
