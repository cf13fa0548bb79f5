"""torchrun on CPU (gloo): 2 processes x batch b train exactly like 1 process with batch 2b.

One ``torchrun --nproc_per_node 2`` launch (tests/_distributed_worker.py) runs, while this process
runs the same stages alone (the references):

* GlobalBatchNorm against nn.BatchNorm on the global batch (BN1d, BN2d, channels_last, BN without
  shift, cumulative momentum): outputs, gradients, running statistics;
* pretraining (NT-Xent with gathered candidates, global BN, online probe), with and without the
  memory queue; fine-tuning; distillation mixing true labels (alpha 0.5): 3 steps of a tiny
  ResNet-18 on 16 px digits, global batch 32, fp32;
* the memory-queue pretraining interrupted after step 2 and resumed by both processes;
* pretraining with activation checkpointing (global BN all-gathers again in the recomputation)
  against one process without it;
* pretraining with gradient accumulation (the memory queue on, BN per process): 2 processes x 2
  micro-batches against 1 process x 4, whose micro-batches are the same images (the NT-Xent's
  gathered negatives in pass 1, DDP's all-reduce after the last micro-batch only); all but the BN
  running statistics, which rank 0 keeps of its own micro-batches only.

Equal means: the same loss at every step (relative 1e-5) and the same parameters, BN statistics
and EMA after the last step, to 1e-5 of their scale (optimiser momenta 5e-5, queued EMA keys
1e-4). fp32 gradients themselves are only good to ~1e-5 here (measured against fp64: one
process and two alike), so tensors that start at zero (BN shifts) are compared on their group's
scale, not their own. The learning rates are small and the width 1/8 on purpose: large early
steps, and very narrow layers (width 1/16: 4-channel BNs), amplify rounding differences
chaotically -- one process with 1 vs 2 threads then already differs by ~1e-3 after 3 steps (by
~1e-1 with LARS at a large lr, whose update normalises the near-zero gradients behind each
block's zero-initialised last BN).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _distributed_worker as worker
from simclrv2 import checkpoint as ckpt

pytestmark = pytest.mark.slow  # multi-process end-to-end: deselect with -m 'not slow'

RTOL = 1e-5  # losses, parameters, BN statistics
# momenta are gradients, which fp32 gets to ~1e-5 only (measured against fp64: one process and
# two alike); the queue holds network outputs (EMA keys), which amplify parameter differences
GROUP_RTOL = {"optim": 5e-5, "queue": 1e-4}
NAMES = [name for name, _, _ in worker.stage_configs(Path("."), Path(".")) if name not in worker.ONE_PROCESS_ONLY]
# two-process runs compared with another one-process run: with activation checkpointing, against the run without;
# 2 processes x 2 micro-batches against 1 process x 4 (BN per process: the same micro-batches)
REFERENCE = {"pretrain_checkpointed": "pretrain", "pretrain_accumulate": "pretrain_accumulate4"}
# runs whose BN running statistics are per process (--no-sync-bn): rank 0's differ from one process's
BN_PER_PROCESS = ("pretrain_accumulate",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    start = root / "start"
    worker.make_start_checkpoints(start)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(worker.__file__)), str(root / "two"), str(start)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        worker.run_stages(root / "one", start, skip=tuple(REFERENCE))  # the one-process references, meanwhile
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"torchrun failed:\n{output[-6000:]}"
    return root


def _compare_checkpoints(two: Path, one: Path, bn_statistics: bool = True) -> None:
    """Integer tensors equal; float tensors equal to RTOL (GROUP_RTOL) of their group's scale
    (the largest magnitude among the model's tensors, the optimiser's momenta, the EMA's, the
    queue's). ``bn_statistics=False``: BN running statistics and counts (the model's and the
    EMA's copy of them) left out."""
    ta, _ = ckpt.load_checkpoint(two)
    tb, _ = ckpt.load_checkpoint(one)
    assert ta.keys() == tb.keys()
    groups: dict[str, list[str]] = {}
    for k in tb:
        if not bn_statistics and ("running_" in k or k.endswith("num_batches_tracked")):
            continue
        if not tb[k].is_floating_point():
            assert torch.equal(ta[k], tb[k]), k
        else:
            groups.setdefault(k.split(".")[1] if k.startswith("extra.") else k.split(".")[0], []).append(k)
    for group, keys in groups.items():
        scale = max(tb[k].abs().max().item() for k in keys)
        errors = {k: (ta[k].double() - tb[k].double()).abs().max().item() / scale for k in keys}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= GROUP_RTOL.get(group, RTOL), f"{two}: {worst} differs by {errors[worst]:.3g} of its group's scale"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_global_batchnorm_matches_batchnorm_on_the_global_batch(runs):
    errors = json.loads((runs / "two" / "bn_check.json").read_text())
    assert len(errors) == 34  # every case and quantity was checked
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not bad


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_equal_one_process_on_the_global_batch(runs, name):
    two, one = runs / "two" / name, runs / "one" / REFERENCE.get(name, name)
    rows_two, rows_one = _rows(two / "metrics.jsonl"), _rows(one / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == list(range(1, worker.STEPS + 1))
    for r2, r1 in zip(rows_two, rows_one):  # the loss (and its parts) of the global batch, every step
        for key in set(r1) - {"images_per_s", "epoch", "step"}:
            assert r2[key] == pytest.approx(r1[key], rel=RTOL), (name, r1["step"], key)
    bn = name not in BN_PER_PROCESS
    _compare_checkpoints(two / "final.safetensors", one / "final.safetensors", bn)  # parameters and BN statistics
    _compare_checkpoints(two / "last.safetensors", one / "last.safetensors", bn)  # + optimiser momenta, EMA and queue
    # rank 0 alone evaluated and wrote the result; every process returned it
    meta = ckpt.read_meta(two / "final.safetensors")
    assert meta.result["stage"] == name.split("_")[0] and meta.config["batch_size"] == 32
    for rank in (0, 1):
        assert json.loads((two / f"returned.{rank}.json").read_text()) == meta.result
    assert (two / "labeled_subset.txt").read_text() == (one / "labeled_subset.txt").read_text()


def test_two_processes_resume_like_an_uninterrupted_run(runs):
    resumed = runs / "two" / "pretrain_resumed"
    rows = _rows(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # steps 1-2 before the interruption, 3 after the resume
    reference = runs / "one" / "pretrain_memory"
    assert rows[-1]["loss"] == pytest.approx(_rows(reference / "metrics.jsonl")[-1]["loss"], rel=RTOL)
    _compare_checkpoints(resumed / "final.safetensors", reference / "final.safetensors")
    _compare_checkpoints(resumed / "last.safetensors", reference / "last.safetensors")


def test_rank_questions_before_and_without_a_process_group(monkeypatch):
    """Before the process group is joined (the pipeline's first files), torchrun's RANK decides
    which process is the main one; a plain start is rank 0 of 1."""
    from simclrv2 import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_env() == (0, 1, 0, False) and distributed.is_main_process()
    assert distributed.world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launch_env() == (1, 2, 1, True) and not distributed.is_main_process()
    assert distributed.world() == (0, 1)  # collectives: no group joined, this process alone



def test_the_cli_leaves_the_process_group_together_only_after_a_success(monkeypatch, capsys):
    """Each command ends with distributed.shutdown: waiting for every rank after a success, not after a
    failure (its peers may never arrive at the barrier)."""
    from simclrv2 import distributed
    from simclrv2.cli import main

    calls = []
    monkeypatch.setattr(distributed, "shutdown", lambda wait=True: calls.append(wait))
    assert main(["presets"]) == 0
    assert main(["evaluate", "/nonexistent/run"]) == 2
    assert calls == [True, False]
    capsys.readouterr()
