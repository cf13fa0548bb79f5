"""channels_last against NCHW for a preset's model: our full pretraining step, rounds interleaved.

Usage: ``PYTHONPATH=src python3 bench/channels_last_ab.py --width 0.125 --rounds 8 [--threads 1]``
(ResNet-18 at ``--width``, 28 px, 3 channels, batch 256: ``bench/run.py``'s ``kernel_setup``, i.e.
the real ``ContrastiveTask`` through ``Trainer.step``), in bf16 and fp32, each with and without
channels_last. Prints images/s of the median round of each and the channels_last / NCHW ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

VARIANTS = ["bf16", "bf16+cl", "fp32", "fp32+cl"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.125, help="ResNet-18 width (cpu-demo 0.125, cpu-full's student 0.25)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run.KERNEL_SECTIONS["ab"] = (18, args.width, 28, 256, 1024)
    steps = {v: run.kernel_setup("ab", v)[0] for v in VARIANTS}
    t = run.time_interleaved(steps, reps=args.rounds, warmup=1)
    med = {v: statistics.median(t[v]) for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v:8s} {256 / med[v]:8.1f} img/s")
    print(f"channels_last / NCHW: bf16 {med['bf16'] / med['bf16+cl']:.3f}, fp32 {med['fp32'] / med['fp32+cl']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
