"""What tracking costs one sweep trial, against the same trial untracked, measured in one process.

    python benchmarks/bench_sweep.py [--reps 5] [--steps 20] [--threads 1] [--checkpoints]

A trial is what ``smolora sweep`` runs per trial: ``SmoLoRA(config).train()`` on the demo model with an
eval split. Two modes alternate (ab, ba, ...) after one warm-up each, so imports, the demo build and the
store's schema creation are not counted:

(a) untracked: ``tracking=False``;
(b) tracked: a run nested under a sweep parent run on a SQLite store, as in a sweep (params, lineage,
    dataset inputs, per-step metrics, evaluations, samples, adapter, card, curve); with ``--checkpoints``
    also a checkpoint every 5 steps, each logged as a LoggedModel with its metrics linked.

Prints the median wall time per trial of each mode and the median of per-repetition ratios (b)/(a), so
load that drifts during the run cancels out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SMOLORA_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def trial_config(root: Path, steps: int, tracked: bool, checkpoints: bool, i: int):
    from smolora_mlflow import SmoloraConfig

    return SmoloraConfig(max_steps=steps, max_samples=64, max_length=32, per_device_train_batch_size=4,
                         eval_fraction=0.2, eval_steps=max(steps // 2, 1), lora_dropout=0.0,
                         sample_prompts=["The food was"], sample_max_new_tokens=4, tracking=tracked,
                         save_steps=5 if checkpoints else 0, experiment_name="bench-sweep",
                         output_dir=str(root / f"trial-{i}"), run_name=f"trial-{i}")


def run_trial(cfg) -> float:
    from smolora_mlflow import SmoLoRA

    start = time.perf_counter()
    SmoLoRA(config=cfg).train()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoints", action="store_true")
    args = ap.parse_args()

    import mlflow
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["SMOLORA_CACHE"] = str(root / "cache")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment("bench-sweep")
    times: dict[str, list[float]] = {"untracked": [], "tracked": []}
    ratios = []
    with mlflow.start_run(run_name="sweep"):
        counter = 0
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            order = ("untracked", "tracked") if rep % 2 == 0 else ("tracked", "untracked")
            got = {}
            for mode in order:
                counter += 1
                got[mode] = run_trial(trial_config(root, args.steps, mode == "tracked", args.checkpoints, counter))
            if rep:
                for mode, t in got.items():
                    times[mode].append(t)
                ratios.append(got["tracked"] / got["untracked"])
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"sweep trial, demo model, {args.steps} steps, eval every {max(args.steps // 2, 1)}, "
          f"checkpoints: {'every 5 steps as LoggedModels' if args.checkpoints else 'none'}, {args.reps} reps")
    print(f"  untracked trial      {med['untracked']:.3f} s")
    print(f"  tracked nested trial {med['tracked']:.3f} s")
    print(f"  tracked / untracked  {statistics.median(ratios):.3f}x  (median of per-rep ratios; "
          f"range {min(ratios):.3f}-{max(ratios):.3f}); overhead {med['tracked'] - med['untracked']:+.3f} s/trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
