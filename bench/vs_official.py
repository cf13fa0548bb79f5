"""Our pretraining step against the official TF2 step on the same CPU, interleaved (issue 18).

Three steps of the same configuration (``bench/run.py``'s kernel sections: ResNet-18 width 1,
32 px, 3 channels, batch 256 by default), timed in rounds that alternate between them so that
background load hits all alike:

* ``official``: google-research/simclr's TF2 step on ready-made tensors, in its own process and
  virtual environment (``bench/official_tf2_step.py --serve``; set-up in its docstring), fp32;
* ``ours``: our whole step (``engine.train_step`` of the real ``ContrastiveTask``: batch order,
  views from uint8, forward, NT-Xent + probe, backward, LARS), once per variant (precision,
  ``+cl`` = channels_last);
* ``bare``: forward + backward + SGD of the same network on a ready batch, per variant.

Usage (the official process waits on stdin while ours runs, so each has the cores to itself)::

    TF_USE_LEGACY_KERAS=1 PYTHONPATH=src python3 bench/vs_official.py \\
        --tf-python /tmp/tfvenv/bin/python --simclr-dir /tmp/simclr [--variants fp32 bf16] [--rounds 5]

Prints a table of images/s (median over rounds) and the ratios ours / official and ours / bare,
then the results as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import run as bench  # noqa: E402
from activation_memory import cpu_name  # noqa: E402


class OfficialStep:
    """The official step in a child process: ``__call__(n)`` runs n steps there, returns seconds."""

    def __init__(self, python: str, simclr_dir: str, depth: int, width: float, px: int, batch: int, threads: int):
        cmd = [python, os.path.join(HERE, "official_tf2_step.py"), "--simclr-dir", simclr_dir, "--serve",
               "--depth", str(depth), "--width", str(width), "--image-size", str(px), "--batch", str(batch),
               "--threads", str(threads)]
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the official step exited (code {self.proc.wait()}); run bench/official_tf2_step.py "
                             "alone to see why")
        return json.loads(line)

    def __call__(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def timed(fn):
    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tf-python", required=True, help="the python of a virtual environment with tensorflow-cpu + tf-keras")
    p.add_argument("--simclr-dir", required=True, help="a checkout of github.com/google-research/simclr")
    p.add_argument("--section", default="kernel_r18", choices=list(bench.KERNEL_SECTIONS))
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=bench.KERNEL_VARIANTS + bench.KERNEL_COMPILE_VARIANTS)
    p.add_argument("--threads", type=int, default=2, help="threads of every step (torch intra-op; TF intra-op)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per step kind per round")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    depth, width, px, batch, _ = bench.KERNEL_SECTIONS[a.section]
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "section": a.section,
              "torch": torch.__version__, "threads": a.threads, "loadavg_1min_start": os.getloadavg()[0],
              "busy_cpus_at_start": bench.busy_cpus()}
    steps = {"official": OfficialStep(a.tf_python, a.simclr_dir, depth, width, px, batch, a.threads)}
    report["tensorflow"] = steps["official"].info.get("tensorflow")
    for v in a.variants:
        ours, bare = bench.kernel_setup(a.section, v)
        steps[f"ours {v}"], steps[f"bare {v}"] = timed(ours), timed(bare)
    try:
        for name, fn in steps.items():  # warm-up (the official one warmed up before "ready")
            if name != "official":
                fn(1)
        seconds = {name: [] for name in steps}
        names = list(steps)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for name in order:
                seconds[name].append(steps[name](a.steps))
    finally:
        steps["official"].close()
    rate = {name: batch * a.steps / statistics.median(s) for name, s in seconds.items()}
    report.update(images_per_s={k: round(v, 2) for k, v in rate.items()},
                  seconds=seconds, loadavg_1min_end=os.getloadavg()[0], cpu=cpu_name())
    off = rate["official"]
    print(f"{report['date']}  {report['cpu']}, {a.threads} threads, load {report['loadavg_1min_start']:.2f} -> "
          f"{report['loadavg_1min_end']:.2f}; ResNet-{depth} x{width}, {px} px, batch {batch}, {a.rounds} rounds of {a.steps} steps")
    print("| step | images/s | vs official | ours / bare |")
    print("|---|---:|---:|---:|")
    print(f"| official TF2 {report['tensorflow']}, fp32 | {off:.1f} | 1.00 | |")
    for v in a.variants:
        ours, bare = rate[f"ours {v}"], rate[f"bare {v}"]
        print(f"| ours, {v} | {ours:.1f} | {ours / off:.2f} | {ours / bare:.3f} |")
        print(f"| bare, {v} | {bare:.1f} | {bare / off:.2f} | |")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
