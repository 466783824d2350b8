"""What MLflow tracking costs a DPO and a GRPO training, against the same training untracked, in one process.

    python benchmarks/bench_recipes.py [--reps 4] [--steps 12] [--threads 1] [--methods dpo,grpo]

For each method, the demo model trains on the bundled preference pairs twice per repetition, tracked
(params, lineage, datasets, per-step method metrics, the GRPO completions table, adapter, card, curve)
and untracked (``tracking=False``), in alternating order, after one warm-up of each. The time per
optimizer step runs from the second step's start to the last step's start, so loading, the first step
and the end-of-run work are outside it. The ratio is the median over repetitions of tracked/untracked
within one repetition, so load that drifts during the benchmark cancels out.

Target: tracked/untracked step time <= 1.05 for both methods.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow.train import smolora as smolora_module


class StepClock(TrainerCallback):
    """Start time of every optimizer step."""

    def __init__(self):
        self.marks: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def per_step(self) -> float:
        return (self.marks[-1] - self.marks[1]) / max(len(self.marks) - 2, 1)


def _with_clock(clock: StepClock):
    """Wrap the method-trainer builder so the clock rides along with the run's own callbacks."""
    original = smolora_module.build_method_trainer

    def build(method, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], clock]
        return original(method, **kwargs)

    return original, build


def train_once(cfg: SmoloraConfig, tracked: bool) -> float:
    clock = StepClock()
    original, build = _with_clock(clock)
    smolora_module.build_method_trainer = build
    try:
        SmoLoRA(config=cfg.replace(tracking=tracked)).train()
    finally:
        smolora_module.build_method_trainer = original
    return clock.per_step()


def bench(method: str, cfg: SmoloraConfig, reps: int) -> float:
    print(f"\n== {method}: {cfg.max_steps} steps, batch {cfg.per_device_train_batch_size} ({reps} reps) ==", flush=True)
    train_once(cfg, True)
    train_once(cfg, False)  # warm-ups
    ratios, tracked_s, untracked_s = [], [], []
    for rep in range(reps):
        order = (True, False) if rep % 2 == 0 else (False, True)
        times = {}
        for tracked in order:
            gc.collect()
            times[tracked] = train_once(cfg, tracked)
        tracked_s.append(times[True])
        untracked_s.append(times[False])
        ratios.append(times[True] / times[False])
    ratio = statistics.median(ratios)
    print(f"{'untracked ms/step':>18} {'tracked ms/step':>16} {'ratio':>7}")
    print(f"{1e3 * statistics.median(untracked_s):18.1f} {1e3 * statistics.median(tracked_s):16.1f} {ratio:7.3f}"
          f"   (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--methods", default="dpo,grpo")
    args = parser.parse_args(argv)

    import mlflow
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-recipes-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.chdir(work)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"store {uri}; torch threads {torch.get_num_threads()}; load avg {load:.1f}")
    common = dict(max_steps=args.steps, max_length=32, per_device_train_batch_size=8, logging_steps=1,
                  lora_dropout=0.0, learning_rate=1e-2, sample_prompts=[], output_dir=str(work / "out"),
                  experiment_name="bench-recipes")
    extra = {"grpo": {"trainer_args": {"max_completion_length": 8}, "rewards": ["length_target"]}}
    for method in args.methods.split(","):
        bench(method, SmoloraConfig(**common, method=method, **extra.get(method, {})), args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
