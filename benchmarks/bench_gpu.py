"""The GPU path in one run: training throughput and MFU, decode speed, pyfunc and `smolora serve` overheads.

    python benchmarks/bench_gpu.py [--json bench_gpu.json] [--only train,decode,pyfunc,serve] [--steps 8]
                                   [--peak-tflops 989] [--smoke]

Needs one CUDA device, runs offline and installs nothing; on a machine without CUDA it says so and exits
with status 2. Meant to finish within 5 minutes on an H200: a part that would start with less time left of its
285-second budget than it needs is skipped and reported as such (``--only`` runs it alone). Not yet run on a
GPU by its author (no GPU machine was available). Every figure is measured in this run, against a baseline of
this run:

- **model**: a random-init Llama of SmolLM2-360M's shape (hidden 960, 32 layers, 15 heads / 5 KV heads,
  intermediate 2560, vocab 49152, tied embeddings) built from its config and saved in bfloat16, with the
  demo tokenizer; its generation config has no EOS so every call generates the tokens asked for.
- **train**: LoRA r=16 on all linear layers, bf16, the demo reviews, ``--steps`` steps of 16 rows of up to
  512 tokens, through :class:`SmoLoRA` (TRL SFTTrainer). Tracked (MLflow, a local SQLite store) vs untracked;
  packing on vs off; activation checkpointing on vs off. tokens/s = non-padding tokens TRL counted over the
  trainer's ``train_runtime``. MFU = tokens/s x FLOPs/token / peak, with
  ``FLOPs/token = 4 N + 6 N_lora + 12 L d S`` (N: base weights in linear layers, lm_head included; 2N forward,
  2N for the input gradients of the frozen weights; 6 N_lora for the trained adapters; 12 L d S the attention
  scores and values forward and backward, PaLM's term, with S the mean example length in tokens, since packed
  examples attend only within themselves) and the peak the device's dense bf16 figure (H100/H200 989 TFLOPS,
  A100 312; ``--peak-tflops`` otherwise). The attention implementation and TRL's padding-free mode are read
  back from the run's tags.
- **decode**: greedy, 128 new tokens, 1 and 32 prompts, dynamic vs static cache (compiled), through the
  project's ``generate_kwargs``; the first static call (compilation) is reported apart.
- **pyfunc**: ``mlflow.pyfunc.load_model(...).predict`` (default settings: static cache, compiled and warmed up
  at load) vs raw ``model.generate`` with transformers' defaults, 1 and 32 prompts, 64 new tokens.
- **serve**: ``smolora serve`` on the merged model, 32 clients at once vs the same 32 requests one by one.

The summary is printed last; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SMOLORA_PROGRESS", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SMOLLM2_360M = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                "num_key_value_heads": 5, "vocab_size": 49152, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
TRAIN = {"max_length": 512, "per_device_train_batch_size": 16, "lora_r": 16, "lora_alpha": 32.0,
         "lora_dropout": 0.0, "lora_target_modules": ["all-linear"], "dtype": "bfloat16", "device": "cuda",
         "sample_prompts": ["The food was"], "sample_max_new_tokens": 4, "checkpoint_models": False}
PROMPT = "The food was"
# --smoke: the same code on the CPU with a tiny shape, to check the script itself where no GPU is at hand.
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512, "tie_word_embeddings": True}


@dataclass
class Plan:
    """What one run measures: the full GPU plan, or a seconds-long CPU smoke run of the same code."""

    device: str = "cuda"
    shape: dict = field(default_factory=lambda: dict(SMOLLM2_360M))
    steps: int = 8
    train: dict = field(default_factory=lambda: dict(TRAIN))
    decode_prompts: tuple[int, ...] = (1, 32)
    decode_tokens: int = 128
    new_tokens: int = 64
    clients: int = 32
    reps: int = 2
    budget_s: float = 285.0  # a part that would start past its share of this is skipped, and says so

    @classmethod
    def smoke(cls) -> Plan:
        return cls(device="cpu", shape=dict(SMOKE_SHAPE), steps=2,
                   train={**TRAIN, "device": "cpu", "dtype": "float32", "max_length": 64,
                          "per_device_train_batch_size": 4},
                   decode_prompts=(1, 4), decode_tokens=8, new_tokens=8, clients=4, reps=1, budget_s=600.0)


def build_model(folder: Path, shape: dict) -> Path:
    """A random-init Llama of SmolLM2-360M's shape in bfloat16 with the demo tokenizer, never stopping at EOS."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from smolora_mlflow.models.demo import demo_model_path

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def peak_flops(override: float | None) -> tuple[float | None, str]:
    import torch

    name = torch.cuda.get_device_name()
    if override:
        return override * 1e12, name
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, name
    return None, name


def _linear_weights(model, *, lora: bool) -> int:
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".lora_" in name) == lora:
            total += module.weight.numel()
    return total


def _mean_example_tokens(tokenizer) -> float:
    from smolora_mlflow.models.demo import demo_texts

    texts = demo_texts()
    return statistics.mean(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + EOS, as TRL appends it


def train_once(base: Path, work: Path, name: str, plan: Plan, **overrides) -> dict:
    """One SmoLoRA training; tokens/s from the trainer's own counters, FLOP inputs from its model."""
    import mlflow

    from smolora_mlflow import SmoLoRA, SmoloraConfig
    from smolora_mlflow.train import smolora as smolora_module

    captured = []
    original = smolora_module.SmoLoRA._build_trainer

    def capture(self, *args, **kwargs):  # the benchmark reads the trainer's counters; training is untouched
        trainer = original(self, *args, **kwargs)
        captured.append(trainer)
        return trainer

    smolora_module.SmoLoRA._build_trainer = capture
    try:
        cfg = SmoloraConfig(**{**plan.train, "base_model": str(base), "max_steps": plan.steps,
                               "output_dir": str(work / name), **overrides})
        started = time.perf_counter()
        result = SmoLoRA(config=cfg).train()
        wall = time.perf_counter() - started
    finally:
        smolora_module.SmoLoRA._build_trainer = original
    trainer = captured[0]
    runtime = float(result.metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    row = {"name": name, "steps": plan.steps, "wall_s": wall, "train_runtime_s": runtime, "tokens": tokens,
           "tokens_per_s": tokens / runtime, "packing": cfg.packing,
           "activation_checkpointing": cfg.activation_checkpointing, "tracking": cfg.tracking,
           "n_linear": _linear_weights(trainer.model, lora=False), "n_lora": _linear_weights(trainer.model, lora=True)}
    # As the run records them (tags), and as the trainer ran (for the untracked run too).
    row.update(attn_implementation=trainer.model.config._attn_implementation, padding_free=trainer.padding_free)
    if result.run_id:
        tags = mlflow.MlflowClient().get_run(result.run_id).data.tags
        row.update(run_tags={k: tags.get(k) for k in ("smolora.attn_implementation", "smolora.padding_free")})
    return row


def bench_train(base: Path, work: Path, plan: Plan, peak: float | None) -> dict:
    from transformers import AutoTokenizer

    mean_len = _mean_example_tokens(AutoTokenizer.from_pretrained(base))
    rows = [train_once(base, work, "untracked", plan, tracking=False),
            train_once(base, work, "tracked", plan),
            train_once(base, work, "tracked_packing", plan, packing=True),
            train_once(base, work, "tracked_activation_checkpointing", plan, activation_checkpointing=True)]
    layers, d = plan.shape["num_hidden_layers"], plan.shape["hidden_size"]
    for row in rows:
        row["flops_per_token"] = 4 * row["n_linear"] + 6 * row["n_lora"] + 12 * layers * d * mean_len
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak if peak else None
    by = {r["name"]: r for r in rows}
    return {"mean_example_tokens": mean_len, "runs": rows, "ratios": {
        "tracked_over_untracked_tokens_s": by["tracked"]["tokens_per_s"] / by["untracked"]["tokens_per_s"],
        "packing_over_no_packing_tokens_s": by["tracked_packing"]["tokens_per_s"] / by["tracked"]["tokens_per_s"],
        "checkpointing_over_none_tokens_s": (by["tracked_activation_checkpointing"]["tokens_per_s"]
                                             / by["tracked"]["tokens_per_s"])}}


def bench_decode(base: Path, plan: Plan) -> dict:
    from bench_decode import decode_rates
    from transformers import AutoTokenizer

    from smolora_mlflow.models.pretrained import load_causal_lm

    model = load_causal_lm(base, dtype="auto", device=plan.device).eval()
    rows = decode_rates(model, AutoTokenizer.from_pretrained(base), list(plan.decode_prompts),
                        new_tokens=plan.decode_tokens, reps=plan.reps)
    return {"rows": rows}


def _timed(fn, reps: int) -> float:
    import torch

    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_pyfunc(model_path: Path, merged: Path, plan: Plan) -> dict:
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow.models.generation import decode_settings

    new_tokens = plan.new_tokens
    started = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(str(model_path), model_config={"device": plan.device})
    load_s = time.perf_counter() - started
    raw = AutoModelForCausalLM.from_pretrained(merged, dtype="auto", use_kernels=False).to(plan.device).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    # What the wrapper resolved its defaults to (the same call, on the model it loaded).
    decode = decode_settings(pyfunc.get_raw_model()[0], "auto", "auto", (1, 8)).as_dict()
    out = {"pyfunc_load_s_with_warm_up": load_s, "new_tokens": new_tokens, "pyfunc_decode": decode}
    for n in (1, plan.clients):
        prompts = [PROMPT] * n
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(plan.device)

        def raw_generate(enc=enc):
            with torch.inference_mode():
                raw.generate(**enc, max_new_tokens=new_tokens, do_sample=False)

        def predict(prompts=prompts):
            pyfunc.predict({"prompt": prompts}, params={"max_new_tokens": new_tokens})

        raw_generate(), predict()
        raw_s, pyfunc_s = _timed(raw_generate, plan.reps), _timed(predict, plan.reps)
        out[f"{n}_prompts"] = {"raw_generate_s": raw_s, "pyfunc_predict_s": pyfunc_s,
                               "raw_tok_s": n * new_tokens / raw_s, "pyfunc_tok_s": n * new_tokens / pyfunc_s,
                               "pyfunc_speed_over_raw": raw_s / pyfunc_s}
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(model_path: Path, work: Path, plan: Plan) -> dict:
    import requests

    clients, new_tokens = plan.clients, plan.new_tokens

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (closed in finally, after the server stops)
    proc = subprocess.Popen([sys.executable, "-m", "smolora_mlflow", "serve", str(model_path), "-p", str(port)],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"smolora serve exited with {proc.returncode}; see {work / 'serve.log'}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - started > 240:
                raise TimeoutError("smolora serve did not answer /ping within 240 s")
            time.sleep(0.5)
        ready_s = time.perf_counter() - started
        body = {"inputs": {"prompt": [PROMPT]}, "params": {"max_new_tokens": new_tokens}}

        def one(_=None) -> None:
            r = requests.post(f"{url}/invocations", json=body, timeout=300)
            r.raise_for_status()

        for _ in range(2):
            one()
        started = time.perf_counter()
        for _ in range(clients):
            one()
        sequential = time.perf_counter() - started
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients)))  # warm: the first coalesced batch shapes
            started = time.perf_counter()
            list(pool.map(one, range(clients)))
            concurrent = time.perf_counter() - started
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    return {"clients": clients, "new_tokens": new_tokens, "ready_s_with_warm_up": ready_s,
            "sequential_s": sequential, "concurrent_s": concurrent,
            "sequential_tok_s": clients * new_tokens / sequential,
            "concurrent_tok_s": clients * new_tokens / concurrent,
            "concurrent_speed_over_sequential": sequential / concurrent}


# Seconds a part needs at least (compilation dominates decode, pyfunc and serve): a part is skipped when less
# than this is left of the budget, so the run ends in time with a summary of what was measured.
NEEDS_S = {"train": 0.0, "decode": 100.0, "pyfunc": 60.0, "serve": 60.0}


def _section(results: dict, name: str, fn, *args, deadline: float) -> None:
    started = time.perf_counter()
    if deadline - started < NEEDS_S[name]:
        results[name] = {"error": f"skipped: {deadline - started:.0f} s left of the time budget, {name} needs "
                                  f"about {NEEDS_S[name]:.0f} s (rerun with --only {name})"}
        print(f"[bench_gpu] {name} skipped (time budget)", flush=True)
        return
    try:
        results[name] = fn(*args)
    except Exception as e:  # one part failing must not hide the figures of the others
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    results[name]["section_s"] = time.perf_counter() - started
    print(f"[bench_gpu] {name} done in {results[name]['section_s']:.0f} s", flush=True)


def summary(results: dict) -> str:
    lines = [f"bench_gpu on {results['device']} (torch {results['torch']}, transformers {results['transformers']}), "
             f"{results['total_s']:.0f} s"]
    for name in ("train", "decode", "pyfunc", "serve"):
        part = results.get(name)
        if part and "error" in part:
            lines.append(f"  {name}: not measured: {part['error']}")
    train = results.get("train") or {}
    for r in train.get("runs", []):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a (pass --peak-tflops)"
        lines.append(f"  train {r['name']:<34} {r['tokens_per_s']:9.0f} tok/s  MFU {mfu:>6}  "
                     f"attn={r.get('attn_implementation')} padding_free={r.get('padding_free')}")
    for key, value in (train.get("ratios") or {}).items():
        lines.append(f"  train {key:<34} {value:6.2f}x")
    for r in (results.get("decode") or {}).get("rows", []):
        lines.append(f"  decode {r['prompts']:>2} prompt(s): dynamic {r['dynamic_tok_s']:8.0f} tok/s, static "
                     f"{r['static_tok_s']:8.0f} tok/s ({r['static_over_dynamic']:.1f}x; first call "
                     f"{r['first_static_call_s']:.0f} s), identical tokens: {r['tokens_identical']}")
    pyfunc = results.get("pyfunc") or {}
    for n in (1, results["plan"]["clients"]):
        if f"{n}_prompts" in pyfunc:
            p = pyfunc[f"{n}_prompts"]
            lines.append(f"  pyfunc {n:>2} prompt(s): predict {p['pyfunc_tok_s']:8.0f} tok/s vs raw generate "
                         f"{p['raw_tok_s']:8.0f} tok/s ({p['pyfunc_speed_over_raw']:.2f}x)")
    serve = results.get("serve") or {}
    if "concurrent_s" in serve:
        lines.append(f"  serve {serve['clients']} clients: concurrent {serve['concurrent_tok_s']:.0f} tok/s vs "
                     f"sequential {serve['sequential_tok_s']:.0f} tok/s "
                     f"({serve['concurrent_speed_over_sequential']:.1f}x)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench_gpu.json", help="where the figures are written")
    ap.add_argument("--only", default="train,decode,pyfunc,serve", help="comma-separated parts to run")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per training run")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not H100/H200/A100")
    ap.add_argument("--smoke", action="store_true", help="run the same code on the CPU with a tiny model (checks "
                    "the script; the figures mean nothing)")
    args = ap.parse_args()

    import torch

    plan = Plan.smoke() if args.smoke else Plan(steps=args.steps)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device and torch.cuda.is_available() is False here; nothing was "
              "measured. Run it on a GPU machine (see the README, 'GPU').", file=sys.stderr)
        return 2
    import transformers

    parts = set(args.only.split(","))
    peak, device = peak_flops(args.peak_tflops) if plan.device == "cuda" else (None, "cpu (--smoke)")
    results: dict = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peak_bf16_flops": peak, "plan": {k: v for k, v in vars(plan).items() if k != "train"}}
    started = time.perf_counter()
    deadline = started + plan.budget_s
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        base = build_model(work / "base", plan.shape)
        if "train" in parts:
            _section(results, "train", bench_train, base, work, plan, peak, deadline=deadline)
        if "decode" in parts:
            _section(results, "decode", bench_decode, base, plan, deadline=deadline)
        if parts & {"pyfunc", "serve"}:
            from smolora_mlflow import flavor

            flavor.save_model(work / "model", base, pip_requirements=["torch", "transformers", "safetensors"])
            if "pyfunc" in parts:
                _section(results, "pyfunc", bench_pyfunc, work / "model", base, plan, deadline=deadline)
            if "serve" in parts:
                _section(results, "serve", bench_serve, work / "model", work, plan, deadline=deadline)
    results["total_s"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"figures written to {args.json}")
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
