"""What `smolora serve`'s streaming, OpenAI endpoints and adapter sets cost and buy, as ratios measured in one run.

    python benchmarks/bench_serving.py [MODEL_DIR] [--reps 3] [--max-new-tokens 32] [--adapters 8]
        [--only ttft,mixed,memory,clients] [--build-llama]

MODEL_DIR is a local ``save_pretrained`` causal LM (default: the built-in demo model); ``--build-llama``
builds an 18M-param Llama (6 layers, hidden 512, the demo tokenizer) into a temp folder and uses that.
LoRA adapters (rank 8 on q_proj/v_proj, random B so each changes outputs) are made on the base, logged in
adapter mode to a temporary SQLite registry and combined into adapter sets. Medians of ``--reps``:

- ttft: time to the first SSE piece of ``/stream`` vs a full non-streamed ``/v1/completions`` answer
- mixed: 8 prompts, each on its own adapter, in one ``generate`` call (PEFT mixed batch) vs the same
  8 prompts on one merged adapter (throughput ratio; target >= 0.6x)
- memory: RSS of a server holding an 8-adapter set vs a 1-adapter set (target <= 1.1x plus the
  adapters' bytes)
- clients: 8 concurrent ``openai`` clients vs the same 8 requests one after another (target >= 3x)
- streams: 8 concurrent ``/stream`` requests' total time vs one stream alone (target <= 1.5x); the 8th
  stream's time to first piece vs the 1st's (target <= 2x); a short (4-token) ``/invocations`` sent while
  the 8 streams run vs the same request alone (target <= 2x)
- cb: the decode loop the scheduler runs (``models.row_batch.RowBatch``) and transformers'
  ``generate_batch`` (continuous batching, paged cache) vs one static batched ``generate``, in-process:
  the measurement behind the scheduler's choice on this device
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_flavor import PROMPTS, _free_port, _stop, _wait_for_ping  # noqa: E402

PIP = ["torch", "transformers", "safetensors", "peft"]


def _median(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_llama(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from smolora_mlflow.models.demo import demo_model_path

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapters(base_dir: Path, root: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from smolora_mlflow.models.pretrained import quiet_upstream_deprecations

    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        with quiet_upstream_deprecations():
            get_peft_model(base, cfg).save_pretrained(root / f"adapter{i}")
        out.append(root / f"adapter{i}")
    return out


def register(base_dir: Path, adapters: list[Path]) -> None:
    """a0..aN-1 in the registry (alias champion), set8 (all of them) and set1 (a0) as adapter sets."""
    import mlflow

    from smolora_mlflow import flavor
    from smolora_mlflow import registry as reg
    from smolora_mlflow.flavor import adapter_set

    for i, adapter in enumerate(adapters):
        with mlflow.start_run():
            flavor.log_model("model", mode="adapter", adapter_dir=adapter, base_model=str(base_dir),
                             pip_requirements=PIP, registered_model_name=f"a{i}")
        reg.set_alias(f"a{i}", "champion", 1)
    for name, count in (("set8", len(adapters)), ("set1", 1)):
        with mlflow.start_run():
            adapter_set.log_adapter_set("model", {f"a{i}": f"models:/a{i}@champion" for i in range(count)},
                                        registered_model_name=name, pip_requirements=PIP)


def bench_mixed(base_dir: Path, reps: int, max_new: int, n: int) -> None:
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from smolora_mlflow.models.generation import generate

    wrapper = mlflow.pyfunc.load_model("models:/set8/1", model_config={"refresh_seconds": 0})._model_impl
    model, tok = wrapper.model, wrapper.tokenizer
    prompts = (PROMPTS * 2)[:n]
    names = [wrapper.adapters.internal(f"a{i}") for i in range(n)]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    local = mlflow.artifacts.download_artifacts("models:/a0/1")
    merged = PeftModel.from_pretrained(base, str(Path(local) / "adapter")).merge_and_unload().eval()
    params = {"max_new_tokens": max_new}
    t_mixed = _median(lambda: generate(model, tok, prompts, batch_size=n, adapter_names=names, **params), reps)
    t_merged = _median(lambda: generate(merged, tok, prompts, batch_size=n, **params), reps)
    print(f"mixed: {n} adapters in one batch of {n}: {t_mixed * 1000:.0f} ms; same prompts on one merged adapter: "
          f"{t_merged * 1000:.0f} ms -> throughput {t_merged / t_mixed:.2f}x (target >= 0.6x)", flush=True)


def start(model_uri: str, workdir: Path, env: dict[str, str]):
    import subprocess


    port = _free_port()
    cmd = [sys.executable, "-m", "smolora_mlflow", "serve", model_uri, "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, _wait_for_ping(proc, port, f"smolora serve {model_uri}")


def rss_bytes(pgid: int) -> int:
    """RSS of every process in the server's process group (the CLI and the uvicorn process it starts)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                status = (stat.parent / "status").read_text()
                total += next(int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmRSS:"))
        except (OSError, StopIteration, IndexError):
            continue
    return total


def bench_memory(workdir: Path, n: int) -> None:
    from openai import OpenAI

    rss = {}
    for name in ("set1", f"set{n}"):
        proc, url = start(f"models:/{name}/1", workdir, {"SERVING_MODEL_CONFIG": '{"refresh_seconds": 0}'})
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=4)
            time.sleep(1)
            rss[name] = rss_bytes(proc.pid)
        finally:
            _stop(proc)
    import mlflow

    adapter_bytes = sum((Path(mlflow.artifacts.download_artifacts(f"models:/a{i}/1")) / "adapter" /
                         "adapter_model.safetensors").stat().st_size for i in range(1, n))
    one, many = rss["set1"], rss[f"set{n}"]
    print(f"memory: server RSS with {n} adapters {many / 2**20:.1f} MiB vs 1 adapter {one / 2**20:.1f} MiB -> "
          f"{many / one:.3f}x; the {n - 1} extra adapters' weights are {adapter_bytes / 2**20:.2f} MiB, "
          f"so (RSS{n} - adapters) / RSS1 = {(many - adapter_bytes) / one:.3f}x (target <= 1.1x)", flush=True)


def bench_stream_and_clients(merged: Path, workdir: Path, reps: int, max_new: int) -> None:
    import requests
    from openai import OpenAI

    proc, url = start(str(merged), workdir, {})
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def first_piece() -> float:
            t0 = time.perf_counter()
            with requests.post(f"{url}/stream", json={"prompt": PROMPTS[1], "params": {"max_new_tokens": max_new}},
                               stream=True, timeout=300) as r:
                for line in r.iter_lines(chunk_size=None):
                    if line.startswith(b"data: "):
                        took = time.perf_counter() - t0
                        break
                for _ in r.iter_lines():
                    pass
            return took

        ttfts = [first_piece() for _ in range(reps + 1)][1:]
        full = _median(lambda: client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=max_new), reps)
        ttft = statistics.median(ttfts)
        print(f"ttft: first SSE piece {ttft * 1000:.1f} ms vs full answer ({max_new} tokens) {full * 1000:.0f} ms -> "
              f"{ttft / full:.3f}x of the wait", flush=True)

        def ask(i: int) -> str:
            return client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=max_new).choices[0].text

        def sequential() -> None:
            for i in range(8):
                ask(i)

        def concurrent() -> None:
            barrier = threading.Barrier(8)
            threads = [threading.Thread(target=lambda i=i: (barrier.wait(), ask(i))) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        t_seq, t_conc = _median(sequential, reps), _median(concurrent, reps)
        print(f"clients: 8 concurrent openai clients {t_conc * 1000:.0f} ms vs 8 sequential {t_seq * 1000:.0f} ms -> "
              f"{t_seq / t_conc:.2f}x (target >= 3x)", flush=True)
        bench_streams(url, reps, max(max_new, 64))
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        sizes = [line for line in metrics.splitlines() if line.startswith(("smolora_batch_size_sum",
                                                                           "smolora_batch_size_count"))]
        print("  " + json.dumps(sizes), flush=True)
    finally:
        _stop(proc)


def _stream_times(url: str, prompt: str, max_new: int, go: threading.Event | None = None) -> tuple[float, float]:
    """(time to the first piece, total time) of one ``/stream``, from when ``go`` is set."""
    import requests

    if go is not None:
        go.wait()
    t0, first = time.perf_counter(), None
    with requests.post(f"{url}/stream", json={"prompt": prompt, "params": {"max_new_tokens": max_new}},
                       stream=True, timeout=600) as r:
        for line in r.iter_lines(chunk_size=None):
            if line.startswith(b"data: ") and first is None:
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


def _short(url: str) -> float:
    import requests

    t0 = time.perf_counter()
    requests.post(f"{url}/invocations", json={"inputs": {"prompt": [PROMPTS[3]]}, "params": {"max_new_tokens": 4}},
                  timeout=600).raise_for_status()
    return time.perf_counter() - t0


def bench_streams(url: str, reps: int, max_new: int) -> None:
    """8 concurrent streams vs one; the 8th's first piece vs the 1st's; a short request during them vs alone."""
    from concurrent.futures import ThreadPoolExecutor

    alone = statistics.median(_stream_times(url, PROMPTS[0], max_new)[1] for _ in range(reps))
    totals, firsts = [], []
    for _ in range(reps):
        go = threading.Event()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_stream_times, url, PROMPTS[i % len(PROMPTS)], max_new, go) for i in range(8)]
            t0 = time.perf_counter()
            go.set()
            results = [f.result() for f in futures]
        totals.append(time.perf_counter() - t0)
        order = sorted(r[0] for r in results)
        firsts.append((order[0], order[-1]))
    total = statistics.median(totals)
    first1, first8 = statistics.median(f[0] for f in firsts), statistics.median(f[1] for f in firsts)
    print(f"streams: 8 concurrent streams of {max_new} tokens {total * 1000:.0f} ms vs one alone {alone * 1000:.0f} ms "
          f"-> {total / alone:.2f}x (target <= 1.5x)", flush=True)
    print(f"streams: first piece of the 8th stream {first8 * 1000:.1f} ms vs the 1st's {first1 * 1000:.1f} ms -> "
          f"{first8 / max(first1, 1e-9):.2f}x (target <= 2x)", flush=True)
    solo = statistics.median(_short(url) for _ in range(max(reps, 5)))
    during = []
    for _ in range(reps):
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_stream_times, url, PROMPTS[i % len(PROMPTS)], max_new * 4) for i in range(8)]
            time.sleep(0.15)  # the streams are running
            during.append(_short(url))
            [f.result() for f in futures]
    short = statistics.median(during)
    print(f"streams: a 4-token /invocations during 8 streams {short * 1000:.1f} ms vs alone {solo * 1000:.1f} ms -> "
          f"{short / solo:.2f}x (target <= 2x)", flush=True)


def bench_cb(base: Path, max_new: int) -> None:
    """The scheduler's decode loop and transformers' continuous batching against one static generate call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from smolora_mlflow.models.generation import generate, resolve_params
    from smolora_mlflow.models.row_batch import Row, RowBatch, eos_ids

    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    prompts = PROMPTS[:8]
    params = resolve_params({"max_new_tokens": max_new})
    ids = [tok(p)["input_ids"] for p in prompts]

    def rows() -> None:
        batch = RowBatch(model, tok.pad_token_id)
        batch.add([Row(i, params, eos_ids(model, tok)) for i in ids])
        while batch.rows:
            batch.step()
            batch.keep([r.finish is None for r in batch.rows])

    t_static = _median(lambda: generate(model, tok, prompts, batch_size=8, **params), 2)
    t_rows = _median(rows, 2)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    try:
        t0 = time.perf_counter()
        model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
        t_cb = time.perf_counter() - t0
        cb = f"generate_batch {t_cb * 1000:.0f} ms ({t_cb / t_static:.1f}x)"
    except Exception as e:  # report, do not hide: the comparison is the point
        cb = f"generate_batch failed: {type(e).__name__}: {e}"[:300]
    print(f"cb: 8 prompts x {max_new} tokens: static generate {t_static * 1000:.0f} ms; scheduler's decode loop "
          f"{t_rows * 1000:.0f} ms ({t_rows / t_static:.2f}x); {cb}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--only", default="ttft,mixed,memory,clients,streams,cb")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the servers")
    ap.add_argument("--build-llama", action="store_true")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        import mlflow

        from smolora_mlflow import flavor
        from smolora_mlflow.models.demo import demo_model_path

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        base = build_llama(root / "llama") if args.build_llama else Path(args.model_dir or demo_model_path())
        params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(base)
                     .parameters())
        print(f"model: {base} ({params / 1e6:.2f}M params)  reps: {args.reps}  max_new_tokens: "
              f"{args.max_new_tokens}  threads: {args.threads}", flush=True)
        if "cb" in parts:
            bench_cb(base, args.max_new_tokens)
        if parts & {"ttft", "clients", "streams"}:
            flavor.save_model(root / "merged", base, pip_requirements=PIP[:3])
            bench_stream_and_clients(root / "merged", root, args.reps, args.max_new_tokens)
        if parts & {"mixed", "memory"}:
            register(base, make_adapters(base, root, args.adapters))
        if "mixed" in parts:
            bench_mixed(base, args.reps, args.max_new_tokens, args.adapters)
        if "memory" in parts:
            bench_memory(root, args.adapters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
