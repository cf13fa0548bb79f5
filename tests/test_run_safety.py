"""Runs and safety (issue 14): a run directory that cannot be wiped, reused for the wrong thing or
shared by two writers; no traceback and no leftover file from a failed start.

Everything goes through the command (``simclrv2.cli.main`` in this process, or ``python -m
simclrv2`` where a second process is the point), on digits or tiny image folders.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from simclrv2 import checkpoint as ckpt
from test_reliability import (
    _write_model, assert_outputs_whole, assert_same, digits_args, error_line, folder_args, make_folder, run, weights,
)

STEPS = 3  # digits_args: 144 labeled images (10%), batch 48, 1 epoch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def steps():
    """Counts the training steps of the stages; ``steps.stop_at = k`` interrupts step k (Ctrl-C)."""
    from simclrv2.engine import step_hook

    class Steps:
        n = 0
        stop_at = None

    def count(trainer):
        Steps.n += 1
        if Steps.n == Steps.stop_at:
            raise KeyboardInterrupt

    with step_hook(count):
        yield Steps


def rows(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def files(d: Path) -> dict[str, int]:
    """name -> modification time of every file under ``d`` (directories' own times change with the lock file)."""
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


# ------------------------------------------------------------------ 1. a rerun continues, never wipes

def test_rerun_without_resume_continues_a_killed_run_and_refuses_other_options(tmp_path, steps):
    ref = tmp_path / "ref"
    assert run(*digits_args("supervised", ref))[0] == 0
    out = tmp_path / "run"
    args = digits_args("supervised", out, "--checkpoint-every", "1")
    steps.n, steps.stop_at = 0, 3  # interrupted in step 3: last.* holds step 2
    rc, text = run(*args)
    assert rc == 130 and "run the same command again" in text and "step 2" in text, text
    before = files(out)

    # other options: refused, naming the option and both values; nothing touched
    line = error_line(*run(*args, "--lr", "0.05"))
    assert f"--out {out} holds an interrupted (step 2 of 3) supervised run with --lr 0.1; this command has --lr 0.05" in line
    assert "--resume" in line and "--restart" in line
    assert files(out) == before

    # the same command (options that do not change results aside): continues from step 2
    steps.n, steps.stop_at = 0, None
    assert run(*args, "--workers", "0", "--log-every", "5")[0] == 0
    assert steps.n == 1 and rows(out) == [1, 2, 3]
    assert_same(weights(out / "final.safetensors"), weights(ref / "final.safetensors"))

    # --restart throws the finished run away and trains again from step 1
    steps.n = 0
    assert run(*args, "--restart")[0] == 0
    assert steps.n == STEPS and rows(out) == [1, 2, 3]
    assert_same(weights(out / "final.safetensors"), weights(ref / "final.safetensors"))
    assert not (out / ".lock").exists()
    # a restart that cannot start keeps the run it would have replaced
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "validation size must be in" in error_line(*run(*args, "--restart", "--val-size", "100000", "--seed", "5"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_run_killed_in_its_closing_evaluation_keeps_its_result(tmp_path):
    """Killed after its final checkpoint, before it stored its result (last.* gone too): the rerun
    evaluates and stores the result an uninterrupted run stores (found by the soak: final_loss was lost)."""
    out = tmp_path / "pre"
    args = digits_args("pretrain", out, "--batch-size", "256", "--knn-every", "0", "--knn-train-size", "200", "--no-blur")
    assert run(*args)[0] == 0
    tensors, meta = ckpt.load_checkpoint(out / "final.safetensors")
    result = meta.result
    ckpt.save_checkpoint(out / "final", tensors, meta.replace(result=None))
    for name in ("last.safetensors", "last.json"):
        (out / name).unlink()
    logged = (out / "metrics.jsonl").read_text()
    assert run(*args)[0] == 0
    assert (out / "metrics.jsonl").read_text() == logged  # not trained again (new rows, new timings)
    again = ckpt.read_meta(out / "final.safetensors").result
    assert again["final_loss"] is not None
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}


def test_resume_is_an_alias_that_also_accepts_other_options(tmp_path, steps):
    out = tmp_path / "run"
    args = digits_args("supervised", out, "--checkpoint-every", "1")
    # --resume in every launch of a job script: the first one, with nothing to continue, starts the run
    steps.stop_at = 2
    assert run(*args, "--resume")[0] == 130
    assert ckpt.step_of(out / "last.safetensors") == 1
    # --resume continues an interrupted run with changed options (a warning names the change)
    steps.n, steps.stop_at = 0, None
    rc, text = run(*args, "--resume", "--lr", "0.05")
    assert rc == 0 and "--lr 0.1 -> 0.05" in text, text
    assert steps.n == STEPS - 1 and rows(out) == [1, 2, 3]
    assert ckpt.read_meta(out / "final.safetensors").config["lr"] == 0.05
    assert "contradict" in error_line(*run(*args, "--resume", "--restart"))


# ------------------------------------------------------------------ 2. reuse only the same stage and options

def _finished(directory: Path, stage: str, **config) -> Path:
    """A finished run's final checkpoint as a stage leaves it (only its metadata matters here)."""
    kind = "simclr" if stage == "pretrain" else "classifier"
    path = _write_model(directory / "final", kind, stage=stage, config=config, result={"stage": stage, "top1": 99.0})
    assert ckpt.read_meta(path).stage == stage
    return path


def test_a_finished_run_is_reused_only_for_the_same_stage_and_options(tmp_path, steps):
    ft = tmp_path / "ft"
    _finished(ft, "finetune", lr=0.005)
    pre = tmp_path / "pre"
    _finished(pre, "pretrain", epochs=1.0)
    before = files(tmp_path)
    line = error_line(*run(*digits_args("pretrain", ft)))
    assert f"--out {ft} holds a finished finetune run, not a pretrain run" in line and "--restart" in line
    line = error_line(*run(*digits_args("finetune", pre, "--pretrained", str(pre))))
    assert f"--out {pre} holds a finished pretrain run, not a finetune run" in line
    line = error_line(*run(*digits_args("pretrain", pre, "--epochs", "2")))
    assert "holds a finished pretrain run with --epochs 1.0; this command has --epochs 2.0" in line
    assert files(tmp_path) == before

    # the same stage and options: its result, without training; options that change nothing do not matter
    out = tmp_path / "sup"
    assert run(*digits_args("supervised", out))[0] == 0
    steps.n = 0
    mtime = (out / "final.safetensors").stat().st_mtime_ns
    assert run(*digits_args("supervised", out, "--workers", "1", "--device", "cpu", "--checkpoint-every", "7"))[0] == 0
    assert steps.n == 0 and (out / "final.safetensors").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------ 3. one writer per --out

@pytest.mark.slow
def test_a_second_writer_fails_at_once_and_a_dead_holder_is_taken_over(tmp_path, steps):
    out = tmp_path / "run"
    args = digits_args("supervised", out, "--epochs", "10", "--checkpoint-every", "1", "--batch-size", "16")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    first = subprocess.Popen([sys.executable, "-m", "simclrv2", "-q", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while ckpt.step_of(out / "last.safetensors") is None:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "stalled"
            time.sleep(0.05)
        started = time.monotonic()
        line = error_line(*run(*args))
        assert time.monotonic() - started < 10  # at once, not after the other run
        assert f"--out {out} is in use by another simclrv2 run (pid {first.pid} on " in line, line
        assert first.poll() is None  # the first writer goes on undisturbed
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / ".lock").exists()  # a SIGKILLed holder leaves the file; the kernel released its lock
    killed_at = ckpt.step_of(out / "last.safetensors")
    steps.n = 0
    rc, text = run(*args)
    assert rc == 0, text
    assert f"taking over the lock of pid {first.pid} on" in text and "no longer running" in text, text
    total = 10 * (144 // 16)
    assert steps.n == total - killed_at and rows(out) == list(range(1, total + 1))
    assert not (out / ".lock").exists()
    assert_outputs_whole(out)


# ------------------------------------------------------------------ 4. symlink loops

def test_image_folders_read_each_real_directory_once(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "train" / "a" / "again").symlink_to(root / "train" / "a")  # a loop
    (root / "train" / "b" / "up").symlink_to(root / "train")  # a loop through the parent
    (root / "val" / "c" / "d1").mkdir()
    (root / "val" / "c" / "d2").symlink_to(root / "val" / "c" / "d1")
    Image.new("RGB", (16, 16)).save(root / "val" / "c" / "d1" / "x.png")
    out = tmp_path / "out"
    started = time.monotonic()
    rc, text = run(*folder_args(root, out))
    assert rc == 0, text
    assert time.monotonic() - started < 60
    assert "skipping" in text and str(root / "train" / "a" / "again") in text and str(root / "train" / "b" / "up") in text
    assert len((out / "labeled_subset.txt").read_text().split()) == 24  # each image once


# ------------------------------------------------------------------ 5. no tracebacks

def test_a_file_name_with_a_line_break_is_a_one_line_error(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.new("RGB", (16, 16)).save(root / "train" / "a" / "two\nlines.png")
    line = error_line(*run(*folder_args(root, tmp_path / "out")))
    assert "two\\nlines.png" in line and "line break" in line, line
    assert not (tmp_path / "out").exists()


def test_a_class_list_shorter_than_the_classifier_is_a_one_line_error(tmp_path):
    bad = _write_model(tmp_path / "cls" / "final", "classifier", num_classes=10)
    tensors, meta = ckpt.load_checkpoint(bad)
    ckpt.save_checkpoint(tmp_path / "cls" / "final", tensors, meta.replace(classes=["0", "1", "2"]))
    image = tmp_path / "x.png"
    Image.new("L", (16, 16)).save(image)
    line = error_line(*run("predict", str(bad), str(image), "--out", str(tmp_path / "p.csv")))
    assert str(bad) in line and "names 3 classes for its 10-class classifier" in line, line
    assert "names 3 classes" in error_line(*run("evaluate", str(bad)))
    assert not (tmp_path / "p.csv").exists()


def test_out_where_no_file_can_be_created_names_out_not_a_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"

    def no_files(*args, dir=None, **kw):  # what a read-only or full file system does
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir or ".", ".x.abc123.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", no_files)
    line = error_line(*run(*digits_args("supervised", out)), code=1)
    assert f"{out}" in line and "Permission denied" in line and ".tmp" not in line, line
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ 6. unverified checkpoints

def test_a_checkpoint_without_its_checksum_needs_allow_unverified(tmp_path):
    from safetensors.torch import save_file

    good = _write_model(tmp_path / "cls" / "final", "classifier")
    tensors, meta = ckpt.load_checkpoint(good)
    stripped = tmp_path / "stripped.safetensors"
    text = json.dumps(meta.to_json(), sort_keys=True)
    save_file(tensors, str(stripped), metadata={ckpt.META_KEY: text})  # the digest removed
    line = error_line(*run("evaluate", str(stripped)))
    assert str(stripped) in line and "no checksum" in line and "--allow-unverified" in line, line
    pre = _write_model(tmp_path / "pre" / "final", "simclr")
    ptensors, pmeta = ckpt.load_checkpoint(pre)
    pstripped = tmp_path / "pre_stripped.safetensors"
    save_file(ptensors, str(pstripped), metadata={ckpt.META_KEY: json.dumps(pmeta.to_json())})
    out = tmp_path / "ft"
    line = error_line(*run(*digits_args("finetune", out, "--pretrained", str(pstripped))))
    assert str(pstripped) in line and "--allow-unverified" in line
    assert not out.exists()

    rc, text = run("evaluate", str(stripped), "--allow-unverified")
    assert rc == 0 and f"{stripped}: loading an unverified checkpoint" in text, text
    rc, text = run(*digits_args("finetune", out, "--pretrained", str(pstripped), "--allow-unverified"))
    assert rc == 0 and f"{pstripped}: loading an unverified checkpoint" in text, text


# ------------------------------------------------------------------ 7. degenerate data

def test_one_class_and_too_few_labels_say_what_is_missing(tmp_path):
    one = make_folder(tmp_path / "one", classes=("only",))
    line = error_line(*run(*folder_args(one, tmp_path / "o1")))
    assert "has 1 class (only)" in line and "at least 2" in line, line
    assert not (tmp_path / "o1").exists()
    three = make_folder(tmp_path / "three")  # 3 labelled images: the batch of 8 is capped, with a warning
    rc, text = run(*folder_args(three, tmp_path / "o2", "--label-fraction", "0.1"))
    assert rc == 0 and "supervised: --batch-size 8 is more than the 3 training images: batches of 3" in text, text


# ------------------------------------------------------------------ 8. a failed start leaves nothing behind

def test_a_failed_start_leaves_the_file_system_as_it_was(tmp_path, models_dir):
    # a stage that wrote its labeled subset, then met a checkpoint of the wrong kind of images
    out = tmp_path / "a" / "b" / "out"
    line = error_line(*run(*digits_args("finetune", out, "--pretrained", str(models_dir["rgb"]))))
    assert "3-channel images" in line
    assert not (tmp_path / "a").exists()
    # an existing --out keeps exactly what it held (a run killed before its first checkpoint)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (kept / "labeled_subset.txt").write_text("train/0\n")
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    assert "3-channel images" in error_line(*run(*digits_args("finetune", kept, "--pretrained", str(models_dir["rgb"]))))
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    # an image folder with a broken image
    root = make_folder(tmp_path / "data")
    (root / "train" / "a" / "a0.png").write_bytes(b"broken")
    assert "cannot decode image" in error_line(*run(*folder_args(root, tmp_path / "img")))
    assert not (tmp_path / "img").exists()
    # a pipeline whose first stage cannot start
    line = error_line(*run("pipeline", "--preset", "tiny", "--out", str(tmp_path / "pipe"), "--set", "pretrain.val_size=99999"))
    assert "validation size must be in" in line
    assert not (tmp_path / "pipe").exists()


@pytest.fixture
def models_dir(tmp_path):
    return {"rgb": _write_model(tmp_path / "models" / "rgb" / "final", "simclr", in_channels=3)}
