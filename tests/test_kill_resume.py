"""Kill -9 at a random step, then --resume: exactly the weights of an uninterrupted run, with gradient
accumulation (--accumulate 2; test_reliability's soak kills every stage without it at random instants).

A real process (``python -m simclrv2``) is SIGKILLed once its metrics show a randomly chosen step
(seeded), at whatever instant that is (mid-step or mid-checkpoint-write), then resumed by a second
process; meanwhile the uninterrupted reference runs here (the same command, in-process, on one
thread like the subprocesses). Every step's result is a function of
(seed, step) and the checkpoint, so the final tensors must be bit-identical. The pretraining case
has the EMA memory queue on, so the EMA weights and the queue must survive the kill too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from simclrv2 import checkpoint as ckpt
from test_reliability import metrics, run

pytestmark = pytest.mark.slow  # multi-process end-to-end: deselect with -m 'not slow'

COMMON = ["--dataset", "digits", "--depth", "18", "--width", "0.0625", "--precision", "fp32", "--epochs", "1",
          "--checkpoint-every", "1", "--log-every", "1", "--min-steps", "0"]
# the plain supervised and memory-queue pretraining runs are killed at random instants by
# test_reliability's soak (with the same checks); here, gradient accumulation, whose resume point is a step
# made of micro-batches
CASES = {
    # 721 labeled images / 64 = 11 steps, in 2 micro-batches each
    "supervised-accumulate": ["supervised", *COMMON, "--label-fraction", "0.5", "--batch-size", "64", "--accumulate", "2"],
    # 1437 images / 128 = 11 steps: pretraining's two passes a micro-batch, EMA keys queued as extra negatives once a step
    "pretrain-accumulate": ["pretrain", *COMMON, "--batch-size", "128", "--accumulate", "2", "--memory-size", "300",
                            "--memory-decay", "0.9", "--knn-every", "0", "--temperature", "0.5", "--no-blur"],
}
TOTAL = 11
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same arithmetic in every process


def start(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simclrv2", "-q", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kill_when(p: subprocess.Popen, out: Path, step: int, report: dict) -> None:
    """SIGKILL ``p`` as soon as ``out/metrics.jsonl`` shows ``step`` (run in a thread)."""
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= step for r in metrics(out)):
        if p.poll() is not None or time.monotonic() > deadline:
            report["error"] = f"the run ended or stalled before step {step}"
            return
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    report["killed"] = True


def test_sigkill_then_resume_gives_identical_final_weights(tmp_path, one_thread):
    """The cases side by side (the victims, then the resumes) to save wall time."""
    victims, killers, reports, kill_at = {}, {}, {}, {}
    for case, args in CASES.items():
        kill_at[case] = random.Random(f"kill-resume/{case}").randint(3, TOTAL - 3)
        victims[case] = start(args, tmp_path / case / "victim")
        reports[case] = {}
        killers[case] = threading.Thread(target=kill_when, daemon=True,
                                         args=(victims[case], tmp_path / case / "victim", kill_at[case], reports[case]))
        killers[case].start()
    try:
        for case, args in CASES.items():  # the uninterrupted references, meanwhile
            rc, text = run(*args, "--out", str(tmp_path / case / "reference"))
            assert rc == 0, text
        for case, p in victims.items():
            killers[case].join(300)
            assert reports[case].get("killed"), (case, reports[case], p.stderr.read() if p.poll() is not None else "")
            assert p.wait(60) == -signal.SIGKILL
    finally:
        for p in victims.values():
            if p.poll() is None:
                p.kill()
    resumes = {}
    for case, args in CASES.items():
        victim = tmp_path / case / "victim"
        assert not (victim / "final.safetensors").exists()
        resumed_from = ckpt.step_of(victim / "last.safetensors")  # whole: the kill may have hit a write
        assert resumed_from is not None and kill_at[case] - 1 <= resumed_from < TOTAL, (case, resumed_from)
        resumes[case] = subprocess.Popen([sys.executable, "-m", "simclrv2", "-q", *args, "--out", str(victim), "--resume"],
                                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for case, p in resumes.items():
        assert p.wait(300) == 0, (case, p.stderr.read())
        check_identical(case, tmp_path / case / "reference", tmp_path / case / "victim")


def check_identical(case: str, ref: Path, victim: Path) -> None:
    a = ckpt.load_checkpoint(ref / "final.safetensors")[0]
    b = ckpt.load_checkpoint(victim / "final.safetensors")[0]
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), (case, k)
    # the resume point of the last step too: optimiser momentum, and for pretraining EMA weights + queue
    a = ckpt.load_checkpoint(ref / "last.safetensors")[0]
    b = ckpt.load_checkpoint(victim / "last.safetensors")[0]
    assert a.keys() == b.keys()
    if case.startswith("pretrain"):
        assert {"extra.queue", "extra.queue_len", "extra.queue_ptr"} <= a.keys() and any(k.startswith("extra.ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), (case, k)
    # one metrics row per step, as if never interrupted
    rows_ref, rows_vic = metrics(ref), metrics(victim)
    assert [x["step"] for x in rows_vic] == list(range(1, TOTAL + 1))
    assert [x["loss"] for x in rows_vic] == [x["loss"] for x in rows_ref]
    assert not list(victim.glob("*.tmp")) and not list(victim.glob(".*.tmp"))
