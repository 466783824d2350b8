"""What MLflow tracking costs a training, against the same training untracked, measured in one process.

    python benchmarks/bench_tracking.py [MODEL_DIR] [--reps 6] [--steps 40] [--threads 1] [--tracking-uri URI]

Three modes train the same short run, interleaved in every order (abc, acb, bac, ...) after one warm-up
each so imports, the demo model build and the store's schema creation are not counted:

(a) untracked: ``tracking=False``;
(b) stock: ``tracking=False`` plus transformers' own ``MLflowCallback`` (``report_to="mlflow"``);
(c) smolora: this package's tracking (params, lineage, datasets, per-step metrics, adapter, card, curve).

Per mode, the median over ``--reps`` of: total wall time of ``SmoLoRA.train()``; wall and process-CPU
time per optimizer step (from the second step's start to the last step's start, so model loading, the
first step and the end-of-run work are outside); time spent inside the tracking callback per step; and,
for (b) and (c), the one-time cost of opening and closing the run. Process CPU time counts every
thread (MLflow's background logger included) and shifts less than wall time when other processes share
the cores; ``--threads 1`` (the default) keeps torch from spinning threads against them. Ratios
against (a) are medians of per-repetition ratios (each mode's run next to the untracked run of the
same repetition), so load that drifts during the benchmark cancels out.

Workloads: 40 steps of the built-in demo model (batch 4, length 32); and, when MODEL_DIR (a local
``save_pretrained`` causal LM) is given, 10 steps of it at batch 4, length 64.

Targets: per-step overhead of (c) <= 2 % over (a); (c) one-time open+close < 1 s; (c) cheaper than (b).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SMOLORA_PROGRESS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback

from smolora_mlflow import SmoLoRA, SmoloraConfig, tracking
from smolora_mlflow.models import pretrained
from smolora_mlflow.tracking import callback as tracking_callback
from smolora_mlflow.train import get_sft_config

MODES = ("untracked", "stock", "smolora")
TIMES: dict[str, float] = defaultdict(float)  # filled by the wrappers below, reset per training


class StepClock(TrainerCallback):
    """Wall and CPU clock at each step's start; added last, so it sees each step after every other callback."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))

    def per_step(self) -> tuple[float, float]:
        (w0, c0), (w1, c1) = self.marks[1], self.marks[-1]
        n = len(self.marks) - 2
        return (w1 - w0) / n, (c1 - c0) / n


class Timed(SmoLoRA):
    """SmoLoRA with a step clock; ``stock=True`` builds the trainer with transformers' MLflowCallback."""

    stock = False

    def _build_trainer(self, model, tokenizer, data, tracker):
        if self.stock:
            trainer = self._stock_trainer(model, tokenizer, data)
        else:
            trainer = super()._build_trainer(model, tokenizer, data, tracker)
        self.clock = StepClock()
        trainer.add_callback(self.clock)
        return trainer

    def _stock_trainer(self, model, tokenizer, data):
        from transformers.integrations import MLflowCallback
        from transformers.trainer_callback import PrinterCallback

        args = get_sft_config(self.config, device=self.device.type, dtype=self.dtype,
                              has_eval=data.eval is not None, output_dir=str(self.output_dir))
        args.report_to = ["mlflow"]
        with pretrained.quiet_upstream_deprecations():
            trainer = self._make_sft_trainer(model, args, data, tokenizer, [])
        trainer.remove_callback(PrinterCallback)  # (a) and (c) drop it too: no dict printed per step
        assert any(isinstance(cb, MLflowCallback) for cb in trainer.callback_handler.callbacks)
        return trainer


def _timed(cls, name: str, key: str) -> None:
    fn = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - t0

    setattr(cls, name, wrapper)


def _instrument() -> None:
    """Time the tracking code itself: per-step callbacks, and the run's opening and closing work."""
    from transformers.integrations import MLflowCallback

    for hook in ("on_log", "on_step_begin", "on_step_end", "on_evaluate", "on_save"):
        _timed(tracking_callback.MlflowTrainingCallback, hook, "smolora.callback")
    _timed(MLflowCallback, "on_log", "stock.callback")
    _timed(MLflowCallback, "on_train_begin", "stock.once")  # setup: start_run, ~150 params
    _timed(MLflowCallback, "on_train_end", "stock.once")  # end_run
    _timed(tracking.RunTracker, "log_model_stats", "smolora.once")
    _timed(tracking.RunTracker, "log_adapter", "smolora.once")
    original_run = tracking.RunTracker.run

    @contextlib.contextmanager
    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        cm = original_run(self, *args, **kwargs)
        run_id = cm.__enter__()
        TIMES["smolora.once"] += time.perf_counter() - t0
        try:
            yield run_id
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            t0 = time.perf_counter()
            cm.__exit__(None, None, None)
            TIMES["smolora.once"] += time.perf_counter() - t0

    tracking.RunTracker.run = run


def train_once(mode: str, cfg: SmoloraConfig) -> dict[str, float]:
    TIMES.clear()
    lora = Timed(config=cfg.replace(tracking=mode == "smolora", experiment_name=f"bench-{mode}"))
    lora.stock = mode == "stock"
    t0 = time.perf_counter()
    lora.train()
    total = time.perf_counter() - t0
    wall, cpu = lora.clock.per_step()
    steps = len(lora.clock.marks)
    prefix = {"untracked": "-", "stock": "stock", "smolora": "smolora"}[mode]
    return {"total": total, "step_wall": wall, "step_cpu": cpu,
            "callback": TIMES[f"{prefix}.callback"] / steps, "once": TIMES[f"{prefix}.once"]}


def bench(name: str, cfg: SmoloraConfig, reps: int) -> None:
    print(f"\n== {name}: {cfg.max_steps} steps, batch {cfg.per_device_train_batch_size}, length {cfg.max_length}"
          f" ({reps} reps, medians) ==", flush=True)
    for mode in MODES:
        train_once(mode, cfg)  # warm-up
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    orders = list(itertools.permutations(MODES))
    for rep in range(reps):
        # Any run right after a stock run is measurably slower (10-30 % per step here, whatever its mode),
        # so the repetitions go through every order: each mode follows each other mode equally often.
        for mode in orders[rep % len(orders)]:
            gc.collect()
            results[mode].append(train_once(mode, cfg))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}

    def paired(mode: str, key: str) -> float:
        """Median over repetitions of mode/untracked within one repetition: drifting load cancels out."""
        return statistics.median(r[key] / u[key] for r, u in zip(results[mode], results["untracked"], strict=True))

    print(f"{'mode':<10} {'total s':>8} {'step ms':>8} {'step CPU ms':>11} {'callback ms/step':>16} "
          f"{'open+close s':>12} {'total ratio':>11} {'step overhead':>13} {'CPU overhead':>12}")
    for mode in MODES:
        m = med[mode]
        print(f"{mode:<10} {m['total']:8.2f} {1e3 * m['step_wall']:8.1f} {1e3 * m['step_cpu']:11.1f} "
              f"{1e3 * m['callback']:16.3f} {m['once']:12.3f} {paired(mode, 'total'):11.3f} "
              f"{100 * (paired(mode, 'step_wall') - 1):+12.1f}% {100 * (paired(mode, 'step_cpu') - 1):+11.1f}%")
    ours, stock, base = med["smolora"], med["stock"], med["untracked"]
    direct = 100 * ours["callback"] / base["step_wall"]
    print(f"smolora: in-callback cost {1e3 * ours['callback']:.3f} ms/step = {direct:.2f}% of an untracked step "
          f"(target <= 2%); open+close {ours['once']:.3f} s (target < 1 s); vs stock: in-callback "
          f"{ours['callback'] / stock['callback']:.2f}x, per-step CPU {ours['step_cpu'] / stock['step_cpu']:.3f}x, "
          f"total {ours['total'] / stock['total']:.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", help="a larger local causal LM for the second workload")
    parser.add_argument("--reps", type=int, default=6, help="a multiple of 6 visits every order of the modes")
    parser.add_argument("--steps", type=int, default=40, help="steps of the demo workload")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--tracking-uri", help="default: a SQLite store in a temporary folder")
    args = parser.parse_args(argv)

    import mlflow
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.chdir(work)  # the SQLite store's artifacts land in ./mlruns
    _instrument()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"store {uri}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; load avg {load:.1f}")

    common = {"per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 0, "eval_fraction": 0.0,
              "output_dir": str(work / "out")}
    bench("demo model", SmoloraConfig(**common, max_steps=args.steps, max_length=32), args.reps)
    if args.model_dir:
        bench(Path(args.model_dir).name, SmoloraConfig(**common, base_model=str(Path(args.model_dir).resolve()),
                                                       max_steps=10, max_length=64), args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
