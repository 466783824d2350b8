"""Decode speed: the dynamic KV cache against the static one, on whatever device is here.

    python benchmarks/bench_decode.py [MODEL_DIR] [--device cpu] [--reps 5] [--new-tokens 64] [--prompts 1,8]
                                      [--json out.json]

MODEL_DIR is a local ``save_pretrained`` causal LM (default: the built-in offline demo model). Greedy, every
call generates exactly ``--new-tokens`` tokens (``min_new_tokens``), through the project's one choice of
``generate`` kwargs (``smolora_mlflow.models.generation.generate_kwargs``). Each figure is the median of
``--reps`` calls, dynamic and static timed alternately so load from other processes hits both alike. On the
CPU the static cache runs uncompiled (transformers compiles only on CUDA/XPU/MPS); this is the measurement
behind ``generation.CPU_CACHE_DEFAULT``. ``benchmarks/bench_gpu.py`` reuses :func:`decode_rates` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["The food was", "Our waiter brought the wrong order twice, and then", "I would come back because",
           "Great", "The dessert menu", "Parking near the restaurant was", "We booked a table for six and",
           "The soup tasted like"]


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def timed_generate(model, tokenizer, prompts: list[str], decode, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds one ``model.generate`` call takes for ``prompts`` (exactly ``new_tokens`` each), and the tokens."""
    import torch

    from smolora_mlflow.models import generation

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    params = generation.resolve_params({"max_new_tokens": new_tokens})
    kwargs = generation.generate_kwargs(model, tokenizer, params, decode, prompt_tokens=enc["input_ids"].shape[1])
    kwargs["min_new_tokens"] = new_tokens  # a random model may emit EOS early; time a fixed amount of work
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - started
    return took, out[:, enc["input_ids"].shape[1]:].tolist()


def decode_rates(model, tokenizer, batch_sizes: list[int], *, new_tokens: int, reps: int,
                 compile: str = "auto") -> list[dict]:
    """tokens/s of the dynamic and the static cache for each batch size (medians), and whether the greedy
    tokens are identical. The first static call of each shape compiles (on CUDA) and is timed apart."""
    from smolora_mlflow.models import generation

    dynamic = generation.DYNAMIC
    static = generation.decode_settings(model, "static", compile, batch_sizes)
    rows = []
    for n in batch_sizes:
        prompts = _prompts(n)
        warm_dynamic, _ = timed_generate(model, tokenizer, prompts, dynamic, new_tokens)
        first_static, _ = timed_generate(model, tokenizer, prompts, static, new_tokens)  # compiles, if it will
        times: dict[str, list[float]] = {"dynamic": [], "static": []}
        tokens: dict[str, list] = {}
        for _ in range(reps):
            for name, settings in (("dynamic", dynamic), ("static", static)):
                took, tokens[name] = timed_generate(model, tokenizer, prompts, settings, new_tokens)
                times[name].append(took)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "prompts": n, "new_tokens": new_tokens, "static_compiled": static.compile,
            "dynamic_tok_s": n * new_tokens / med["dynamic"], "static_tok_s": n * new_tokens / med["static"],
            "static_over_dynamic": med["dynamic"] / med["static"], "first_static_call_s": first_static,
            "first_dynamic_call_s": warm_dynamic, "tokens_identical": tokens["dynamic"] == tokens["static"],
        })
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"  {r['prompts']:>3} prompt(s) x {r['new_tokens']} tokens: dynamic {r['dynamic_tok_s']:8.1f} tok/s | "
              f"static{' (compiled)' if r['static_compiled'] else ''} {r['static_tok_s']:8.1f} tok/s | "
              f"static/dynamic {r['static_over_dynamic']:.2f}x | first static call {r['first_static_call_s']:.1f} s"
              f" | greedy tokens identical: {r['tokens_identical']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", help="a save_pretrained causal LM (default: the demo model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from smolora_mlflow.models.demo import demo_model_path
    from smolora_mlflow.models.generation import resolve_device
    from smolora_mlflow.models.pretrained import load_causal_lm

    torch.manual_seed(0)
    path = args.model_dir or str(demo_model_path())
    device = resolve_device(args.device)
    model = load_causal_lm(path, dtype="auto", device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = decode_rates(model, tokenizer, [int(x) for x in args.prompts.split(",")], new_tokens=args.new_tokens,
                        reps=args.reps)
    print(f"decode, {path} on {device} ({model.dtype}), torch threads {torch.get_num_threads()}, "
          f"median of {args.reps}:")
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": path, "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
