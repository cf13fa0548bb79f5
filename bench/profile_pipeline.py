"""Where the wall time of a short cpu-demo pretrain + finetune goes.

Usage: ``python bench/profile_pipeline.py [--steps N] [--threads N] [--precision P] [--json]``
(or ``python bench/run.py --profile-demo``). Runs the real stage functions
(``simclrv2.pretrain`` then ``simclrv2.finetune`` from it) with the cpu-demo preset, cut to
about ``--steps`` training steps each (default 20), ``torch.set_num_threads(2)``, the preset's
precision (``auto``: bf16 autocast where the CPU reports native bf16), and times every call of
the library's building blocks: model forward, ``backward``, the optimiser step, augmentation, losses,
EMA/queue updates, batches, checkpoints, metrics, evaluation (kNN, test accuracy), data
preparation. Each call's time is charged to the innermost timed block it is in (evaluation
takes everything inside it); time in no block is charged to the enclosing stage code
("training loop" for ``engine.fit``'s own lines). Reported per stage: the share of the wall
time outside forward + backward + optimiser, for the whole stage, for the training loop
(``engine.fit``), and per step (the blocks every step runs), and the blocks sorted by time.

Short runs overstate the fixed costs (data preparation, evaluation, the first optimiser's
import of torch._dynamo, the final checkpoint) that a real run amortises over hundreds of
steps; the per-step share is the one that scales.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

try:
    import simclrv2
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import simclrv2

COMPUTE = ("forward", "backward", "optimizer")
PRETRAIN_REST = "task.loss (rest: probe, queue read, ...)"
CLASSIFY_REST = "task.loss (rest: cross-entropy, ...)"
# the blocks every training step runs (the rest are fixed costs: setup, evaluation, checkpoints)
PER_STEP = COMPUTE + ("augmentation", "loss (NT-Xent)", "loss (distillation)", PRETRAIN_REST, CLASSIFY_REST,
                      "EMA + queue update", "next batch")


class Clock:
    """Exclusive wall time per block: a call's time minus that of the timed calls inside it."""

    def __init__(self):
        self.total = defaultdict(float)  # block -> seconds
        self.in_fit = defaultdict(float)  # the same, inside engine.fit only
        self.calls = defaultdict(int)
        self.stack = []  # [block, children seconds, opaque]

    def timed(self, block: str, fn, opaque: bool = False):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if any(frame[2] for frame in self.stack):  # inside an opaque block: charged to it
                return fn(*args, **kwargs)
            self.stack.append([block, 0.0, opaque])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, children, _ = self.stack.pop()
                self.charge(block, elapsed - children)
                if self.stack:
                    self.stack[-1][1] += elapsed
        return wrapper

    def charge(self, block: str, seconds: float) -> None:
        self.total[block] += seconds
        self.calls[block] += 1
        if block == "training loop" or any(frame[0] == "training loop" for frame in self.stack):
            self.in_fit[block] += seconds

    def timed_generator(self, block: str, gen_fn):
        """Time each ``next()`` of the generators ``gen_fn`` returns (not the consumer's work)."""
        timed_next = self.timed(block, next)

        @functools.wraps(gen_fn)
        def wrapper(*args, **kwargs):
            it = gen_fn(*args, **kwargs)
            while True:
                try:
                    item = timed_next(it)
                except StopIteration:
                    return
                yield item
        return wrapper


def instrument(clock: Clock) -> None:
    """Wrap the library's building blocks (class and module attributes, so every caller sees them)."""
    from simclrv2 import checkpoint, engine, metrics
    from simclrv2.data import augment
    from simclrv2.losses import DistillationLoss, NTXentLoss
    from simclrv2.models import Classifier, SimCLRModel
    from simclrv2.optim import LARS
    classify = importlib.import_module("simclrv2.stages.classify")  # (simclrv2.stages.pretrain is also a function)
    pretrain = importlib.import_module("simclrv2.stages.pretrain")

    def wrap(owner, name, block, opaque=False):
        if hasattr(owner, name):  # (PretrainAugment.views is new: older checkouts can be profiled too)
            setattr(owner, name, clock.timed(block, getattr(owner, name), opaque))

    wrap(SimCLRModel, "forward", "forward")
    wrap(Classifier, "forward", "forward")
    wrap(torch.Tensor, "backward", "backward")
    for opt in (LARS, torch.optim.SGD):
        wrap(opt, "step", "optimizer")
    wrap(torch.optim.Optimizer, "zero_grad", "optimizer")
    wrap(engine, "build_optimizer", "optimizer setup (torch.optim's first use imports torch._dynamo)")
    wrap(augment.PretrainAugment, "forward", "augmentation")
    wrap(augment.PretrainAugment, "views", "augmentation")
    wrap(augment.FinetuneAugment, "forward", "augmentation")
    wrap(NTXentLoss, "forward", "loss (NT-Xent)")
    wrap(DistillationLoss, "forward", "loss (distillation)")
    wrap(pretrain.ContrastiveTask, "loss", PRETRAIN_REST)
    wrap(classify.SupervisedTask, "loss", CLASSIFY_REST)  # fine-tuning, the baseline and linear evaluation
    wrap(classify.DistillTask, "loss", CLASSIFY_REST)
    wrap(pretrain.ContrastiveTask, "after_step", "EMA + queue update")
    engine.BatchStream.epoch = clock.timed_generator("next batch", engine.BatchStream.epoch)
    wrap(checkpoint, "save_checkpoint", "checkpoints")
    wrap(checkpoint, "load_checkpoint", "checkpoints")
    wrap(metrics.MetricsWriter, "write", "metrics + progress")
    wrap(engine.Progress, "update", "metrics + progress")
    wrap(pretrain, "knn_eval", "evaluation (kNN / test accuracy)", opaque=True)
    wrap(classify, "evaluate_classifier", "evaluation (kNN / test accuracy)", opaque=True)
    for mod in (pretrain, classify):
        wrap(mod, "prepare_data", "data preparation", opaque=True)
        wrap(mod, "fit", "training loop")
    wrap(classify, "load_model", "checkpoints")  # the name classify imported from simclrv2.checkpoint


def profile_stage(clock: Clock, fn) -> dict:
    clock.total.clear(), clock.in_fit.clear(), clock.calls.clear()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    clock.charge("stage setup + other", wall - sum(clock.total.values()))
    fit_wall = sum(clock.in_fit.values())
    compute = sum(clock.total[b] for b in COMPUTE)
    fit_compute = sum(clock.in_fit[b] for b in COMPUTE)
    steps = clock.calls["backward"]
    per_step = sum(clock.in_fit[b] for b in PER_STEP)
    return {
        "wall_s": wall,
        "outside_compute_fraction": 1 - compute / wall,
        "training_loop_s": fit_wall,
        "training_loop_outside_compute_fraction": 1 - fit_compute / max(fit_wall, 1e-9),
        "steps": steps,
        "step_ms": 1000 * per_step / max(steps, 1),
        "step_outside_compute_fraction": 1 - fit_compute / max(per_step, 1e-9),
        "blocks": {b: {"s": s, "fraction": s / wall, "calls": clock.calls[b]}
                   for b, s in sorted(clock.total.items(), key=lambda kv: -kv[1])},
        "training_loop_blocks": {b: s for b, s in sorted(clock.in_fit.items(), key=lambda kv: -kv[1])},
    }


def run(steps: int = 20, threads: int = 2, precision: str = "auto") -> dict:
    torch.set_num_threads(threads)
    clock = Clock()
    instrument(clock)
    load_before = os.getloadavg()[0]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # cpu-demo: 60000 images / 256 per pretraining step; 600 labeled / 100 per fine-tuning step
        pre = dict(out=f"{tmp}/pre", epochs=steps / (60000 // 256), checkpoint_every=max(1, steps // 2), log_every=5,
                   precision=precision, **simclrv2.config.load_preset("cpu-demo")["model"])
        out["pretrain"] = profile_stage(clock, lambda: simclrv2.pretrain("cpu-demo", **pre))
        ft = dict(out=f"{tmp}/ft", pretrained=f"{tmp}/pre", epochs=steps / (600 // 100), log_every=5, precision=precision)
        out["finetune"] = profile_stage(clock, lambda: simclrv2.finetune("cpu-demo", **ft))
    from simclrv2.runtime import init_runtime

    return {"benchmark": "profile_pipeline", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "precision": "bf16" if init_runtime("cpu", precision).dtype else "fp32", "steps": steps, "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0], "stages": out}


def print_report(report: dict) -> None:
    print(f"torch {report['torch']}, {report['threads']} threads, {report['precision']}, about {report['steps']} steps per stage, "
          f"load average {report['loadavg_1min_before']:.2f} -> {report['loadavg_1min_after']:.2f}")
    for stage, r in report["stages"].items():
        print(f"\n{stage}: wall {r['wall_s']:.1f} s, {100 * r['outside_compute_fraction']:.1f}% outside forward/backward/"
              f"optimizer; training loop {r['training_loop_s']:.1f} s, "
              f"{100 * r['training_loop_outside_compute_fraction']:.1f}% of it outside; per step (the blocks every step runs) "
              f"{r['step_ms']:.0f} ms, {100 * r['step_outside_compute_fraction']:.1f}% of it outside")
        print("| block | s | % of wall | calls | s in training loop |")
        print("|---|---:|---:|---:|---:|")
        for b, x in r["blocks"].items():
            print(f"| {b} | {x['s']:.2f} | {100 * x['fraction']:.1f} | {x['calls']} | "
                  f"{r['training_loop_blocks'].get(b, 0.0):.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per stage (about)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the stages' --precision (default auto, as the preset: bf16 on CPUs that report it)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON (last line)")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("simclrv2").setLevel(logging.WARNING)
    report = run(args.steps, args.threads, args.precision)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
