"""What the smolora flavor costs and buys, as ratios against a baseline measured in the same run.

    python benchmarks/bench_flavor.py [MODEL_DIR] [--reps 5] [--max-new-tokens 16] [--only load,predict,serve,size]

MODEL_DIR is a local ``save_pretrained`` causal LM (default: the built-in offline demo model). Each
number is the median of ``--reps`` repetitions:

- pyfunc ``predict`` vs raw transformers ``generate`` (1 prompt; a batch of 8)
- 8 prompts in one ``predict`` call vs 8 calls
- served ``/invocations``: 8 concurrent clients vs the same 8 requests one after another
- load time: ``mlflow.pyfunc.load_model("models:/...")`` from the registry vs raw ``from_pretrained``
- artifact size: adapter mode vs merged mode (a rank-8 LoRA on q_proj/v_proj)
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "The food was",
    "Our waiter brought the wrong order twice, and then",
    "I would come back because",
    "Great",
    "The dessert menu",
    "Parking near the restaurant was",
    "We booked a table for six and",
    "The soup tasted like",
]
PIP = ["torch", "transformers", "safetensors"]


def paired(fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Medians of ``fn_a`` and ``fn_b`` timed alternately, so load from other processes hits both alike."""
    fn_a(), fn_b()
    a, b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def report(name: str, ours: float, base: float, ours_label: str, base_label: str) -> None:
    """Times and their ratio; ``speed`` is the baseline's time over ours (1.0 = as fast, > 1 = faster)."""
    print(f"{name:<44} {ours_label} {ours:9.4f}s  {base_label} {base:9.4f}s  time ratio {ours / base:5.2f}x  "
          f"speed {base / ours:5.2f} of {base_label}", flush=True)


def raw_generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The baseline: plain transformers, left-padded batch, greedy."""
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def bench_predict(model_path: Path, model_dir: Path, reps: int, n: int) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pyfunc_model = mlflow.pyfunc.load_model(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = {"max_new_tokens": n}
    one, eight = PROMPTS[:1], PROMPTS
    ours, base = paired(lambda: pyfunc_model.predict({"prompt": one}, params=params),
                        lambda: raw_generate(model, tok, one, n), 3 * reps)  # short calls: more repetitions
    report("predict, 1 prompt", ours, base, "pyfunc", "raw")
    ours, base = paired(lambda: pyfunc_model.predict({"prompt": eight}, params=params),
                        lambda: raw_generate(model, tok, eight, n), reps)
    report("predict, batch of 8", ours, base, "pyfunc", "raw")
    batched, calls = paired(lambda: pyfunc_model.predict({"prompt": eight}, params=params),
                            lambda: [pyfunc_model.predict({"prompt": [p]}, params=params) for p in eight], reps)
    print(f"{'8 prompts: one predict call vs 8 calls':<44} 1 call {batched:9.4f}s  8 calls {calls:9.4f}s  "
          f"speed-up {calls / batched:6.2f}x", flush=True)


def bench_load(model_dir: Path, root: Path, reps: int) -> None:
    """Load from the Model Registry (a SQLite store in ``root``) vs raw ``from_pretrained`` of the same files.

    Twice: with the files' hashes already remembered (a reload, a restarted server on the same disk) and
    with every file hashed (a first load after a download; ``SMOLORA_VERIFY_CACHE=0``).
    """
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora_mlflow import flavor

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment("bench-flavor")
    with mlflow.start_run():
        info = flavor.log_model(name="model", model_dir=model_dir, registered_model_name="bench-flavor",
                                pip_requirements=PIP)
    files = Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "model"
    time.sleep(2.1)  # hashes of files written in the last 2 s are not remembered (see smolora_mlflow.models.verified)

    def raw_load():
        return AutoModelForCausalLM.from_pretrained(files), AutoTokenizer.from_pretrained(files)

    def registry_load():
        return mlflow.pyfunc.load_model("models:/bench-flavor/1")

    ours, base = paired(registry_load, raw_load, reps)
    report("load from registry (hashes remembered)", ours, base, "pyfunc", "raw")
    os.environ["SMOLORA_VERIFY_CACHE"] = "0"
    try:
        ours, base = paired(registry_load, raw_load, reps)
    finally:
        del os.environ["SMOLORA_VERIFY_CACHE"]
    report("load from registry (every file hashed)", ours, base, "pyfunc", "raw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_path: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_path), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, _wait_for_ping(proc, port, "mlflow models serve")


def _wait_for_ping(proc: subprocess.Popen, port: int, what: str) -> str:
    """The server's URL once ``/ping`` answers 200 (5 minutes at most); stops it and raises otherwise."""
    import requests

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return url
        except requests.ConnectionError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{what} did not come up")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_serve(model_path: Path, workdir: Path, reps: int, n: int) -> None:
    import requests

    proc, url = _start_server(model_path, workdir)
    try:
        def ask(prompt: str) -> None:
            body = {"dataframe_records": [{"prompt": prompt}], "params": {"max_new_tokens": n}}
            r = requests.post(f"{url}/invocations", json=body, timeout=300)
            r.raise_for_status()

        def concurrent() -> None:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(ask, PROMPTS))

        ours, base = paired(concurrent, lambda: [ask(p) for p in PROMPTS], reps)
        print(f"{'served /invocations, 8 requests':<44} concurrent {8 / ours:7.2f} req/s  "
              f"sequential {8 / base:7.2f} req/s  speed-up {base / ours:6.2f}x")
    finally:
        _stop(proc)


def bench_sizes(model_dir: Path, root: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from smolora_mlflow import flavor
    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with quiet_upstream_deprecations():  # peft reads an attribute transformers 5 deprecated
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "adapter-src")
    flavor.save_model(root / "adapter-model", mode="adapter", adapter_dir=root / "adapter-src",
                      base_model=str(model_dir), pip_requirements=[*PIP, "peft"])

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    for name, a, m in [
        ("artifact size (weights folder)", size(root / "adapter-model/adapter"), size(root / "merged/model")),
        ("artifact size (whole MLflow model)", size(root / "adapter-model"), size(root / "merged")),
    ]:
        print(f"{name:<44} adapter {a / 1e6:9.3f}MB  merged {m / 1e6:9.3f}MB  ratio {a / m:8.4f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="a local save_pretrained causal LM (default: the demo model)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--only", default="load,predict,serve,size", help="comma-separated parts to run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server (steadier)")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server
    from smolora_mlflow import flavor
    from smolora_mlflow.models.demo import demo_model_path

    model_dir = Path(args.model_dir) if args.model_dir else demo_model_path()
    print(f"model: {model_dir}  reps: {args.reps}  max_new_tokens: {args.max_new_tokens}  threads: {args.threads}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        flavor.save_model(root / "merged", model_dir, pip_requirements=PIP)
        if "load" in parts:
            bench_load(model_dir, root, 3 * args.reps)  # cheap and noisy: more repetitions
        if "predict" in parts:
            bench_predict(root / "merged", model_dir, args.reps, args.max_new_tokens)
        if "serve" in parts:
            bench_serve(root / "merged", root, args.reps, args.max_new_tokens)
        if "size" in parts:
            bench_sizes(model_dir, root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
