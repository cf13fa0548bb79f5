"""Reliability (issue #6): atomic checkpoints, clear one-line errors on bad checkpoints, data and
options, divergence, interrupts, and resume equality through the DataLoader path.

Everything runs the real command in-process (``simclrv2.cli.main``) on tiny data, so the checks
are of what a user sees: the exit code and one ``simclrv2: error: ...`` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2 import checkpoint as ckpt
from simclrv2.data.image_check import cache_path
from simclrv2.cli import main
from simclrv2.engine import step_hook
from simclrv2.errors import CheckpointError
from simclrv2.models import build_model, model_spec

TINY_NET = ["--depth", "18", "--width", "0.0625", "--precision", "fp32", "--log-every", "1000"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine makes two threads spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ helpers (also used by test_property)

def run(*args: str) -> tuple[int, str]:
    """``simclrv2 -q ARGS`` in this process: (exit code, stderr). Fails on any escaping exception."""
    logger = logging.getLogger("simclrv2")
    saved = logger.handlers[:]
    logger.handlers.clear()  # setup_logging binds a fresh handler to the redirected stderr
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(["-q", *map(str, args)])
    finally:
        logger.handlers[:] = saved
    text = err.getvalue()
    assert "Traceback" not in text, text
    return rc, text


def interrupt_at(n: int):
    """A step hook that interrupts (Ctrl-C) a run at its n-th step, after the update, before that step's checkpoint."""
    calls = {"n": 0}

    def hook(trainer):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    return hook


def error_line(rc: int, text: str, code: int = 2) -> str:
    """The single error line of a failed command (warnings may precede it)."""
    assert rc == code, text
    lines = text.strip().splitlines()
    assert lines and lines[-1].startswith("simclrv2: error: "), text
    assert sum(line.startswith("simclrv2:") for line in lines) == 1, text
    return lines[-1]


def assert_outputs_whole(out: Path) -> None:
    """Every checkpoint in ``out`` loads (and is finite); no temporary file is left."""
    if not out.exists():
        return
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for f in out.rglob("*.safetensors"):
        tensors, _ = ckpt.load_checkpoint(f)
        assert ckpt.first_non_finite(tensors) is None, f


def make_folder(root: Path, classes=("a", "b", "c"), per_class: int = 8, size: int = 16, val: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{c}{i}.png")
    return root


def folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["supervised", "--out", str(out), "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16",
            *TINY_NET, "--epochs", "1", "--batch-size", "8", "--label-fraction", "1", "--workers", "0", "--min-steps", "0",
            *extra]


def digits_args(stage: str, out: Path, *extra: str) -> list[str]:
    net = TINY_NET if stage in ("supervised", "pretrain", "distill") else TINY_NET[4:]
    return [stage, "--out", str(out), "--dataset", "digits", *net, "--label-fraction", "0.1", "--epochs", "1",
            "--batch-size", "48", "--min-steps", "0", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt.load_checkpoint(path)[0].items() if k.startswith("model.")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _write_model(stem: Path, kind: str, num_classes: int | None = 10, in_channels: int = 1, width: float = 0.0625,
                 tensors_width: float | None = None, **meta) -> Path:
    """A checkpoint as the stages write it (optionally with tensors of another width than its spec says)."""
    spec = model_spec(kind, depth=18, width=width, sk=False, small_images=True, in_channels=in_channels,
                      head_layers=3 if kind == "simclr" else 0, num_classes=num_classes, image_size=16)
    real = spec.replace(width=tensors_width or width)
    tensors = {f"model.{k}": v for k, v in build_model(real).state_dict().items()}
    meta = {"stage": "supervised" if kind == "classifier" else "pretrain", **meta}
    info = ckpt.CheckpointMeta(model=spec, classes=[str(i) for i in range(num_classes or 10)], dataset="digits", step=1,
                               complete=True, **meta)
    ckpt.save_checkpoint(stem, tensors, info)
    return stem.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    good_cls = _write_model(d / "cls" / "final", "classifier")
    good_simclr = _write_model(d / "simclr" / "final", "simclr")
    data = good_cls.read_bytes()
    paths = {"classifier": good_cls, "simclr": good_simclr}
    paths["truncated"] = d / "truncated.safetensors"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0x10  # inside the last tensor's bytes: only the checksum can tell
    paths["flipped"] = d / "flipped.safetensors"
    paths["flipped"].write_bytes(bytes(flipped))
    paths["garbage"] = d / "garbage.safetensors"
    paths["garbage"].write_bytes(b"\x80\x04\x95" + os.urandom(500))  # e.g. a pickle renamed: never unpickled
    from safetensors.torch import save_file

    paths["foreign"] = d / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(paths["foreign"]))
    paths["classes5"] = _write_model(d / "c5" / "final", "classifier", num_classes=5)
    paths["rgb"] = _write_model(d / "rgb" / "final", "simclr", in_channels=3)
    paths["arch"] = _write_model(d / "arch" / "final", "simclr", width=0.125, tensors_width=0.0625)
    paths["empty_dir"] = d / "empty_dir"
    paths["empty_dir"].mkdir()
    paths["missing"] = d / "nope" / "final.safetensors"
    return paths


# ------------------------------------------------------------------ atomic checkpoints

def _meta(step: int) -> ckpt.CheckpointMeta:
    """Metadata for checkpoints of arbitrary tensors (the writer does not look at them)."""
    return ckpt.CheckpointMeta("pretrain", model_spec("simclr", depth=18, width=0.0625, sk=False, small_images=True,
                                                      in_channels=1), step=step)


def test_checkpoint_files_survive_sigkill_at_any_instant(tmp_path):
    """A writer killed at random instants: the checkpoint always loads whole, the .json lags by at
    most one write, and the stale temporary file it may leave is cleaned up."""
    stem = tmp_path / "last"

    def tensors(step):  # numpy-made (no torch kernels run in the forked child)
        return {"w": torch.from_numpy(np.full((512, 512), step, np.float32)), "n": torch.tensor(step)}

    ckpt.save_checkpoint(stem, tensors(0), _meta(0))
    rng = random.Random(6)
    for _ in range(5):
        start = ckpt.step_of(stem.with_suffix(".safetensors"))
        pid = os.fork()
        if pid == 0:  # the child writes checkpoints as fast as it can until killed
            try:
                step = start
                while True:
                    step += 1
                    ckpt.save_checkpoint(stem, tensors(step), _meta(step))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t, meta = ckpt.load_checkpoint(stem.with_suffix(".safetensors"))
        step = meta.step
        assert step >= start and int(t["n"]) == step and bool((t["w"] == step).all())
        assert json.loads(stem.with_suffix(".json").read_text())["step"] in (step - 1, step)
    assert ckpt.step_of(stem.with_suffix(".safetensors")) > 0
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


def test_failed_write_keeps_previous_file_and_names_it(tmp_path, monkeypatch):
    stem = tmp_path / "final"
    ckpt.save_checkpoint(stem, {"w": torch.ones(4)}, _meta(1))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(OSError) as e:
        ckpt.save_checkpoint(stem, {"w": torch.zeros(4)}, _meta(2))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(stem.with_suffix(".safetensors"))
    monkeypatch.undo()
    t, meta = ckpt.load_checkpoint(stem.with_suffix(".safetensors"))
    assert meta.step == 1 and torch.equal(t["w"], torch.ones(4))
    assert not list(tmp_path.glob(".*"))
    mode = stem.with_suffix(".safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~ckpt._umask()  # not mkstemp's 0600


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path):
    """atomic_path (every file of ours, ONNX exports too): a failure inside the block keeps the old file."""
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="exporter broke"):
        with ckpt.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a")
            raise RuntimeError("exporter broke")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with ckpt.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_disk_full_during_training_is_one_line_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):  # the disk fills up while the third last.safetensors is written
        if ".last.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    line = error_line(*run(*digits_args("supervised", out, "--checkpoint-every", "1")), code=1)
    monkeypatch.undo()
    assert "No space left on device" in line and str(out / "last.safetensors") in line
    assert ckpt.step_of(out / "last.safetensors") == 2
    assert not (out / "final.safetensors").exists()
    assert_outputs_whole(out)


def test_json_beside_may_lag_resume_reads_the_safetensors_header(tmp_path):
    out = tmp_path / "run"
    with step_hook(interrupt_at(3)):
        rc, text = run(*digits_args("supervised", out, "--checkpoint-every", "1"))
    assert rc == 130 and "run the same command again" in text and "step 2" in text, text
    # as if killed between the two renames: the .json still describes step 1
    meta = json.loads((out / "last.json").read_text())
    (out / "last.json").write_text(json.dumps(dict(meta, step=1)))
    (out / ".last.safetensors.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert run(*digits_args("supervised", out, "--checkpoint-every", "1", "--resume"))[0] == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, no step trained twice
    assert_outputs_whole(out)
    ref = tmp_path / "ref"
    assert run(*digits_args("supervised", ref))[0] == 0
    assert_same(weights(out / "final.safetensors"), weights(ref / "final.safetensors"))


# ------------------------------------------------------------------ bad checkpoints, through the CLI

def _cmd(command: str, path: Path, out: Path) -> list[str]:
    if command == "evaluate":
        return ["evaluate", str(path)]
    if command == "finetune":
        return digits_args("finetune", out, "--pretrained", str(path))
    return digits_args("distill", out, "--teacher", str(path))


@pytest.mark.parametrize("case,needle", [
    ("missing", "checkpoint file not found"),
    ("empty_dir", "no final.safetensors or last.safetensors"),
    ("truncated", "truncated"),
    ("flipped", "do not match the checksum"),
    ("garbage", "not a valid safetensors checkpoint"),
    ("foreign", "without simclrv2 metadata"),
])
@pytest.mark.parametrize("command", ["evaluate", "finetune", "distill"])
def test_unreadable_checkpoints_are_one_line_errors(models, tmp_path, command, case, needle):
    path = models[case]
    line = error_line(*run(*_cmd(command, path, tmp_path / "out")))
    assert needle in line and str(path) in line, line
    assert not (tmp_path / "out" / "final.safetensors").exists()


@pytest.mark.parametrize("command,case,needle", [
    ("evaluate", "simclr", "expected a classifier"),
    ("distill", "simclr", "expected a classifier"),
    ("finetune", "classifier", "expected a pretrained"),
    ("evaluate", "classes5", "5 classes"),
    ("distill", "classes5", "the classifier has 5 classes; expected 10"),
    ("finetune", "rgb", "3-channel images; expected 1"),
    ("finetune", "arch", "does not match the expected simclr model (depth 18, width 0.125)"),
])
def test_checkpoints_of_another_model_are_one_line_errors(models, tmp_path, command, case, needle):
    line = error_line(*run(*_cmd(command, models[case], tmp_path / "out")))
    assert needle in line and str(models[case]) in line, line


def test_sk_for_a_student_of_a_resnet18_teacher_is_a_one_line_error(models, tmp_path):
    # the student takes the teacher's depth (18): its basic blocks have no selective kernels
    line = error_line(*run(*_cmd("distill", models["classifier"], tmp_path / "out"), "--sk"))
    assert "--sk needs a bottleneck ResNet (--depth 50, 101 or 152): depth 18" in line, line
    assert not (tmp_path / "out" / "last.safetensors").exists()
    line = error_line(*run("summary", "--depth", "34", "--sk"))
    assert "--sk needs a bottleneck ResNet" in line and "depth 34" in line, line


def test_a_resnet18_student_of_an_sk_teacher_needs_no_sk(tmp_path):
    # --sk not asked for: the student of an SK ResNet-50 teacher is a ResNet-18 as before, not an error
    teacher = Path(__file__).resolve().parent / "fixtures" / "checkpoints_v1" / "supervised_sk.safetensors"
    rc, text = run(*digits_args("distill", tmp_path / "out", "--teacher", str(teacher), "--epochs", "0.1"))
    assert rc == 0, text
    assert ckpt.read_meta(tmp_path / "out" / "final.safetensors").model.depth == 18


def test_loading_never_unpickles(models, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    for case in ("classifier", "simclr"):
        ckpt.load_checkpoint(models[case])
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(models["garbage"])


def test_resume_with_other_options_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    assert run(*digits_args("supervised", out))[0] == 0
    for name in ("final.safetensors", "final.json"):  # as if killed before the end
        (out / name).unlink()
    line = error_line(*run(*digits_args("supervised", out, "--resume", "--width", "0.125")))
    assert str(out / "last.safetensors") in line and "does not match the expected model" in line
    line = error_line(*run(*digits_args("supervised", out, "--resume", "--epochs", "2")))
    assert "cannot resume" in line and "3 steps" in line and "6 steps" in line


# ------------------------------------------------------------------ divergence

def test_huge_learning_rate_stops_with_clear_message_and_finite_checkpoints(tmp_path):
    out = tmp_path / "run"
    line = error_line(*run(*digits_args("supervised", out, "--lr", "1e30", "--checkpoint-every", "1")))
    assert "non-finite" in line and "--lr" in line and "step" in line
    assert not (out / "final.safetensors").exists()
    assert_outputs_whole(out)


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from simclrv2.stages import classify

    out = tmp_path / "run"
    original, calls = classify.SupervisedTask.loss, {"n": 0}

    def poisoned(self, images, labels, generator):
        calls["n"] += 1
        loss, parts = original(self, images, labels, generator)
        return (loss * float("nan") if calls["n"] == 5 else loss), parts

    monkeypatch.setattr(classify.SupervisedTask, "loss", poisoned)
    line = error_line(*run(*digits_args("supervised", out, "--epochs", "3", "--checkpoint-every", "2")))
    assert "non-finite between steps 4 and 6" in line, line
    assert f"last good checkpoint {out / 'last.safetensors'} (step 4) is kept" in line and "--resume" in line
    assert ckpt.step_of(out / "last.safetensors") == 4 and not (out / "final.safetensors").exists()
    assert_outputs_whole(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """Weights can go non-finite while the step's loss (computed before the update) is finite."""
    out = tmp_path / "run"

    def corrupt(trainer):
        if trainer.step_count == 2:
            with torch.no_grad():
                trainer.task.model.fc.weight[0, 0] = float("inf")

    with step_hook(corrupt):
        line = error_line(*run(*digits_args("supervised", out, "--checkpoint-every", "1")))
    assert "model.fc.weight became non-finite by step 2" in line and "(step 1) is kept" in line, line
    assert ckpt.step_of(out / "last.safetensors") == 1
    assert_outputs_whole(out)


# ------------------------------------------------------------------ bad data

def _no_classes(root):
    (root / "train").mkdir(parents=True)


def _empty_class(root):
    make_folder(root)
    (root / "train" / "d").mkdir()


def _no_val(root):
    make_folder(root, val=0)
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val").rmdir()


@pytest.mark.parametrize("build,needle", [
    (None, "not found"),
    (lambda r: r.mkdir(), "has no train/ directory"),
    (_no_classes, "has no class subfolders"),
    (_empty_class, "train/d contains no images"),
    (_no_val, "no val/ (or test/) directory"),
])
def test_bad_dataset_directories(tmp_path, build, needle):
    root = tmp_path / "data"
    if build is not None:
        build(root)
    line = error_line(*run(*folder_args(root, tmp_path / "out")))
    assert needle in line, line


def test_unreadable_images_fail_naming_the_file_or_are_skipped(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "b" / "b3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (root / "train" / "c" / "notes.jpg").write_text("not an image")
    line = error_line(*run(*folder_args(root, tmp_path / "out")))
    assert "cannot decode image" in line and "2 unreadable image(s)" in line and "--skip-bad-images" in line
    assert str(bad) in line or str(root / "train" / "c" / "notes.jpg") in line

    out = tmp_path / "skip"
    rc, text = run(*folder_args(root, out, "--skip-bad-images"))
    assert rc == 0, text
    assert "skipping 2 unreadable image(s)" in text and "train/b/b3.png" in text and "train/c/notes.jpg" in text
    cached = [json.loads(line) for line in cache_path(str(root), "train", 16).read_text().splitlines()]
    assert sorted(i for i, _, _, reason, _ in cached if reason) == ["train/b/b3.png", "train/c/notes.jpg"]
    assert len((out / "labeled_subset.txt").read_text().split()) == 23  # 24 + notes.jpg - 2
    assert_outputs_whole(out)


def test_a_class_left_without_readable_images_is_named(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    for p in (root / "train" / "c").iterdir():
        p.write_bytes(b"")
    line = error_line(*run(*folder_args(root, tmp_path / "out", "--skip-bad-images", "--batch-size", "2")))
    assert "class 'c'" in line and "no readable images" in line


def test_mixed_modes_and_sizes_train(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    makers = [
        lambda: Image.fromarray(rng.integers(0, 256, (20, 31, 3), dtype=np.uint8)),  # RGB, not square
        lambda: Image.fromarray(rng.integers(0, 256, (40, 12, 4), dtype=np.uint8)),  # RGBA
        lambda: Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).convert("P"),
        lambda: Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8)),  # L
        lambda: Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).convert("1"),
        lambda: Image.fromarray(rng.integers(0, 65536, (17, 23), dtype=np.uint16)),  # 16-bit
        lambda: Image.fromarray(rng.integers(0, 256, (30, 30, 2), dtype=np.uint8)),  # LA
        lambda: Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert("CMYK"),
    ]
    for split, n in (("train", 8), ("val", 2)):
        for c in ("x", "y"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = makers[i % len(makers)]()
                ext = ".jpg" if img.mode == "CMYK" else ".tiff" if img.mode.startswith("I") else ".png"
                img.save(root / split / c / f"{i}{ext}")
    out = tmp_path / "out"
    rc, text = run(*folder_args(root, out))
    assert rc == 0, text
    meta = ckpt.read_meta(out / "final.safetensors")
    # every training image was read (16 labelled, 2 steps of 8) and the 4 validation images were evaluated
    assert meta.result["labeled_images"] == 16 and meta.step == meta.total_steps == 2
    assert meta.result["top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    from simclrv2.stages import evaluate

    again = evaluate(str(out), data_dir=str(root), device="cpu", precision=meta.precision, workers=0)
    assert again["images"] == 4 and again["top1"] == meta.result["top1"] and again["top5"] == 100.0  # 2 classes


def test_subset_files_naming_missing_or_escaping_images(tmp_path):
    root = make_folder(tmp_path / "data")

    def with_subset(lines):
        f = tmp_path / "subset.txt"
        f.write_text("\n".join(lines) + "\n")
        return error_line(*run(*folder_args(root, tmp_path / "out", "--subset-file", str(f))))

    assert "match no image" in with_subset(["train/a/a0.png", "train/a/nope.png"])
    assert "absolute path or contains '..'" in with_subset(["../data/train/a/a0.png"])
    assert "absolute path or contains '..'" in with_subset([str(root / "train" / "a" / "a0.png")])
    line = with_subset(["train/a/a0.png", "b1.png"])
    assert "gives class 'c' no labeled images" in line, line
    missing = tmp_path / "missing.txt"
    assert "subset file not found" in error_line(*run(*folder_args(root, tmp_path / "out", "--subset-file", str(missing))))


def test_tiny_label_fraction_still_labels_every_class(tmp_path):
    out = tmp_path / "out"
    rc, text = run(*folder_args(make_folder(tmp_path / "data"), out, "--label-fraction", "1e-9", "--batch-size", "2"))
    assert rc == 0, text
    assert sorted(i.split("/")[1] for i in (out / "labeled_subset.txt").read_text().split()) == ["a", "b", "c"]


def test_dataloader_worker_errors_are_one_line(tmp_path, monkeypatch):
    """Files that break after the up-front check, or a worker that dies, during training."""
    from simclrv2.data.sources import ImageFolderDataset
    from simclrv2.errors import DataError

    root = make_folder(tmp_path / "data")
    original = ImageFolderDataset.__getitem__

    def breaks_in_worker(self, i):
        if torch.utils.data.get_worker_info() is not None and i == 5:
            raise DataError(f"cannot decode image {self.path(i)}: broken after the check")
        return original(self, i)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", breaks_in_worker)
    lazy = ["--workers", "1", "--image-cache-gb", "0"]  # decoded by the DataLoader worker during training
    line = error_line(*run(*folder_args(root, tmp_path / "a", *lazy)))
    assert "broken after the check" in line and "cannot decode image" in line

    def dies_in_worker(self, i):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, i)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", dies_in_worker)
    line = error_line(*run(*folder_args(root, tmp_path / "b", *lazy)), code=1)
    assert "data loading failed" in line and "DataLoader worker" in line
    assert_outputs_whole(tmp_path / "b")


# ------------------------------------------------------------------ (seed, step) determinism, DataLoader path

def test_results_do_not_depend_on_workers_interruption_or_global_rng(tmp_path):
    """Image folders are read by DataLoader workers: the weights after 2 epochs are the same decoded into
    memory once (the default for a small folder) and by 0 or 2 workers every epoch, and after an
    interruption + --resume with the global RNGs scrambled."""
    root = make_folder(tmp_path / "data")
    args = lambda out, *x: folder_args(root, out, "--epochs", "2", "--checkpoint-every", "2", *x)  # noqa: E731
    assert run(*args(tmp_path / "w0"))[0] == 0
    assert run(*args(tmp_path / "w2", "--workers", "2", "--image-cache-gb", "0"))[0] == 0
    assert run(*args(tmp_path / "d0", "--workers", "0", "--image-cache-gb", "0"))[0] == 0
    reference = weights(tmp_path / "w0" / "final.safetensors")
    assert_same(reference, weights(tmp_path / "w2" / "final.safetensors"))
    assert_same(reference, weights(tmp_path / "d0" / "final.safetensors"))

    calls = {"n": 0}

    def interrupt_and_scramble(trainer):
        calls["n"] += 1
        torch.manual_seed(1000 + calls["n"])  # anything that used the global RNGs would now differ
        np.random.seed(calls["n"])
        random.seed(calls["n"])
        torch.rand(7)
        if calls["n"] == 5:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with step_hook(interrupt_and_scramble):
        rc, text = run(*args(out, "--workers", "2", "--image-cache-gb", "0"))
        assert rc == 130 and "step 4" in text
        assert run(*args(out, "--workers", "2", "--image-cache-gb", "0", "--resume"))[0] == 0
    assert calls["n"] > 6
    assert_same(reference, weights(out / "final.safetensors"))


# ------------------------------------------------------------------ bad options (beyond test_pipeline_cli)

@pytest.mark.parametrize("args,needle", [
    (["pretrain", "--lr", "nan"], "--lr must be a finite number"),
    (["pretrain", "--epochs", "inf"], "--epochs must be a finite number"),
    (["pretrain", "--epochs", "1e9"], "--epochs must be at most"),
    (["pretrain", "--batch-size", "abc"], "invalid int value: 'abc'"),
    (["pretrain", "--seed", "-1"], "--seed must be in"),
    (["pretrain", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["pretrain", "--width", "1e9"], "--width 1000000000.0 is not supported"),
    (["pretrain", "--memory-size", "-5"], "--memory-size must be between 0 (off) and"),
    (["pretrain", "--head-layers", "9"], "--head-layers 9 is not supported"),
    (["pretrain", "--depth", "18", "--sk"], "--sk needs a bottleneck ResNet (--depth 50, 101 or 152): depth 18"),
    (["pretrain", "--image-size", "2"], "--image-size must be between"),
    (["pretrain", "--precision", "fp64"], "--precision must be auto, bf16, fp16 or fp32"),
    (["pretrain", "--dataset", "mnist-ish"], "unknown dataset 'mnist-ish'"),
    (["pretrain", "--device", "tpu9"], "--device"),
    (["pretrain", "--decode-scale", "0.5", "--depth", "18"], "--decode-scale must be between 1 and 8"),
    (["distill", "--teacher", "x", "--temperature", "-1"], "--temperature must be > 0"),
    (["finetune", "--pretrained", "x", "--head-layer", "7"], "--head-layer 7 is not available"),
    (["supervised", "--labels-per-class", "0"], "--labels-per-class must be >= 1"),
    (["supervised", "--label-fraction", "1.0001"], "--label-fraction must be in (0, 1]"),
    (["supervised", "--no-such-option", "1"], "unrecognized arguments: --no-such-option"),
    (["evaluate", "x.safetensors", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_options_are_one_line_errors_before_any_work(tmp_path, args, needle):
    out = tmp_path / "out"
    extra = [] if args[0] == "evaluate" else ["--out", str(out)] + ([] if "--dataset" in args else ["--dataset", "digits"])
    line = error_line(*run(*args, *extra))
    assert needle in line, line
    assert not (out / "last.safetensors").exists()


def test_preset_values_of_the_wrong_type(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("pretrain:\n  epochs: lots\n")
    line = error_line(*run("pretrain", "--preset", str(preset), "--out", str(tmp_path / "o"), "--dataset", "digits"))
    assert "--epochs must be a number, got 'lots'" in line
    line = error_line(*run("pipeline", "--preset", "tiny", "--out", str(tmp_path / "p"), "--set", "pretrain.blur=maybe"))
    assert "--blur must be true or false" in line


def test_cli_one_line_helper_unwraps_dataloader_worker_messages():
    from simclrv2.cli import one_line
    from simclrv2.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in f\n    g()\nsimclrv2.errors.DataError: cannot decode image /d/a.png: bad\n')
    assert one_line(wrapped) == "cannot decode image /d/a.png: bad"
    assert one_line(ValueError("a\n  b")) == "a b"


def test_image_check_runs_in_workers_and_is_reused_on_resume(tmp_path, monkeypatch):
    from simclrv2.data import image_check

    root = make_folder(tmp_path / "data")
    (root / "val" / "a" / "a0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # the test split is checked too
    monkeypatch.setattr(image_check, "_WORKERS_FROM", 1)  # decode in DataLoader workers even for 33 images
    out = tmp_path / "out"
    rc, text = run(*folder_args(root, out, "--workers", "2", "--skip-bad-images", "--checkpoint-every", "1"))
    assert rc == 0 and "skipping 1 unreadable image(s)" in text and "val/a/a0.png" in text, text

    decoded = []
    original = image_check._Probe.__getitem__
    monkeypatch.setattr(image_check, "_WORKERS_FROM", 10**9)  # in this process, where the calls can be counted
    monkeypatch.setattr(image_check._Probe, "__getitem__", lambda self, j: decoded.append(j) or original(self, j))
    (out / "final.safetensors").unlink()  # as if killed before the end
    rc, text = run(*folder_args(root, out, "--workers", "2", "--skip-bad-images", "--checkpoint-every", "1", "--resume"))
    assert rc == 0 and "skipping 1 unreadable image(s)" in text and not decoded, text  # the bad file is remembered too
    (out / "final.safetensors").unlink()  # (a finished run would be reused, not checked again)
    (root / "train" / "a" / "a1.png").touch()  # a changed file is checked again, and only it
    assert run(*folder_args(root, out, "--workers", "2", "--skip-bad-images", "--resume"))[0] == 0
    assert len(decoded) == 1


# ------------------------------------------------------------------ soak: random SIGKILL + rerun, every stage and the pipeline

# SIMCLRV2_SOAK=N runs every stage N times, SIGKILLing each launch but the last at a random instant (while
# starting, at a random step, mid-checkpoint, or after the last step, during the closing evaluation), each
# launch being the same command (a rerun continues the run it finds); the last one runs to the end, whose
# checkpoints, metrics and result must be bit-identical to an uninterrupted run. Unset: 2 launches per stage
# (one kill), the CI size. The pipeline is soaked the same way with kills at random times.
# Example: SIMCLRV2_SOAK=20 python3 -m pytest -q tests/test_reliability.py -k soak -s  (prints the kill counts)
SOAK = int(os.environ.get("SIMCLRV2_SOAK") or 0) or 2
SOAK_EPOCHS = 1 if SOAK <= 10 else 2  # a run of 11 steps per epoch: room for N kills at about one step apart
SOAK_STEPS = 11 * SOAK_EPOCHS  # every case: 1437 images / 128, or 721 labeled (50%) / 64
SOAK_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
_SOAK_NET = ["--dataset", "digits", "--precision", "fp32", "--epochs", str(SOAK_EPOCHS), "--min-steps", "0",
             "--checkpoint-every", "1",
             "--log-every", "1"]
_MODEL = ["--depth", "18", "--width", "0.0625"]


def soak_cases(inputs: Path) -> dict[str, list[str]]:
    pretrained = _write_model(inputs / "pretrained" / "final", "simclr")
    teacher = _write_model(inputs / "teacher" / "final", "classifier")
    labeled = ["--label-fraction", "0.5", "--batch-size", "64"]
    return {
        "pretrain": ["pretrain", *_SOAK_NET, *_MODEL, "--batch-size", "128", "--temperature", "0.5", "--no-blur",
                     "--memory-size", "300", "--memory-decay", "0.9", "--knn-every", "0", "--knn-train-size", "300"],
        "supervised": ["supervised", *_SOAK_NET, *_MODEL, *labeled],
        "finetune": ["finetune", *_SOAK_NET, *labeled, "--pretrained", str(pretrained)],
        "linear-eval": ["linear-eval", *_SOAK_NET, *labeled, "--pretrained", str(pretrained)],
        "distill": ["distill", *_SOAK_NET, *_MODEL, "--batch-size", "128", "--teacher", str(teacher)],
    }


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simclrv2", "-q", *args], env=SOAK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def metrics(out: Path) -> list[dict]:
    """The rows of OUT/metrics.jsonl written so far (a line being written ends them)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _fresh_rows(out: Path, since_ns: int) -> list[dict]:
    """metrics.jsonl rows, once this launch has (re)written the file (before, they are the killed run's)."""
    try:
        if (out / "metrics.jsonl").stat().st_mtime_ns < since_ns:
            return []
    except FileNotFoundError:
        return []
    return metrics(out)


def _kill_when(p: subprocess.Popen, ready, delay: float) -> bool:
    """SIGKILL ``p`` ``delay`` seconds after ``ready()``; False if it ended first (then it must have succeeded)."""
    deadline = time.monotonic() + 600
    while not ready():
        if p.poll() is not None:
            break
        assert time.monotonic() < deadline, "stalled"
        time.sleep(0.005)
    time.sleep(delay)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(60)
        return True
    assert p.returncode == 0, p.stderr.read()
    return False


def _loadable(out: Path) -> None:
    """After a kill: every checkpoint in OUT loads whole (a hidden temporary file may be left)."""
    for f in out.glob("*.safetensors"):
        ckpt.load_checkpoint(f)


def _finished(d: Path) -> bool:
    try:
        meta = ckpt.read_meta(d / "final.safetensors")
    except CheckpointError:
        return False
    return meta.complete and meta.result is not None


def soak(args: list[str], out: Path, rounds: int, rng: random.Random, plan: list[tuple[str, int]]) -> int:
    """Launch ``args --out out`` up to ``rounds`` times, SIGKILLing all but the last at a random instant;
    returns the kills. ``plan``: the run's stage directories (relative to OUT, in order) and their steps."""
    kills = 0
    for r in range(rounds):
        since = time.time_ns()
        p = _launch([*args, "--out", str(out)])
        try:
            if r == rounds - 1:
                assert p.wait(900) == 0, p.stderr.read()
                break
            # the steps still to run, of every stage not finished yet
            todo = [(d, s) for d, total in plan if not _finished(out / d)
                    for s in range((ckpt.step_of(out / d / "last.safetensors") or 0) + 1, total + 1)]
            where = rng.random()
            if where < 0.15 or not todo:  # while starting (imports, data, model, resume) or closing (report)
                killed = _kill_when(p, lambda: True, rng.uniform(0.3, 6.0))
            else:  # at a step soon to run (mid-step or mid-checkpoint), or after a stage's last (its closing evaluation)
                d, step = todo[min(len(todo) - 1, int(rng.expovariate(1.0)))]  # mostly the next step or the one after
                if where < 0.22:  # the end of the stage running now
                    step = dict(plan)[d]
                delay = rng.uniform(0.0, 0.5) if step == dict(plan)[d] else rng.uniform(0.0, 0.03)
                killed = _kill_when(p, lambda: any(x.get("step", 0) >= step for x in _fresh_rows(out / d, since)), delay)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if not killed:
            break  # it finished before its kill: nothing left to interrupt
        kills += 1
        for d, _ in plan:
            _loadable(out / d)
    return kills


def check_same_run(ref: Path, out: Path, what: str) -> None:
    """The soaked run ended exactly as the uninterrupted one: checkpoints, metrics, result."""
    for name in ("final.safetensors", "last.safetensors"):
        a, b = ckpt.load_checkpoint(ref / name)[0], ckpt.load_checkpoint(out / name)[0]
        assert a.keys() == b.keys(), (what, name)
        for k in a:
            assert torch.equal(a[k], b[k]), (what, name, k)
    ra = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rb] == [x["step"] for x in ra] == list(range(1, len(ra) + 1)), what
    assert [x["loss"] for x in rb] == [x["loss"] for x in ra], what
    res_a = ckpt.read_meta(ref / "final.safetensors").result
    res_b = ckpt.read_meta(out / "final.safetensors").result
    assert {k: v for k, v in res_a.items() if k != "seconds"} == {k: v for k, v in res_b.items() if k != "seconds"}, what
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists(), what


@pytest.mark.slow
def test_soak_random_sigkill_and_rerun_every_stage(tmp_path):
    import threading

    cases = soak_cases(tmp_path / "inputs")
    kills: dict[str, int] = {}
    errors: dict[str, BaseException] = {}

    def victim(name: str) -> None:
        try:
            rng = random.Random(f"soak/{name}/{SOAK}")
            kills[name] = soak(cases[name], tmp_path / name / "soaked", SOAK, rng, [(".", SOAK_STEPS)])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[name] = e

    threads = [threading.Thread(target=victim, args=(name,), daemon=True) for name in cases]
    for t in threads:
        t.start()
    for name, args in cases.items():  # the uninterrupted references, meanwhile
        rc, text = run(*args, "--out", str(tmp_path / name / "reference"))
        assert rc == 0, (name, text)
    for t in threads:
        t.join(3600)
    assert not errors, errors
    for name in cases:
        check_same_run(tmp_path / name / "reference", tmp_path / name / "soaked", name)
    print(f"\nsoak ({SOAK} launches per stage, {SOAK_STEPS} steps): SIGKILLs survived, bit-identical ends: {kills}")
    assert sum(kills.values()) >= len(cases) * (SOAK - 1) // 2  # most launches were interrupted, not finished first


@pytest.mark.slow
def test_soak_random_sigkill_and_rerun_the_pipeline(tmp_path):
    args = ["pipeline", "--preset", "tiny", "--set", "pretrain.epochs=1", "--set", "supervised.epochs=2",
            "--set", "finetune.epochs=2", "--set", "linear_eval.epochs=1", "--set", "distill.epochs=0.3",
            "--set", "checkpoint_every=1", "--set", "min_steps=0"]
    ref = tmp_path / "reference"
    rc, text = run(*args, "--out", str(ref))
    assert rc == 0, text
    order = ["pretrain", "labels_0.1/supervised", "labels_0.1/linear_eval", "labels_0.1/finetune",
             "labels_0.1/distill_self", "labels_0.1/distill_small"]
    stage_dirs = sorted(str(p.parent.relative_to(ref)) for p in ref.rglob("final.safetensors"))
    assert stage_dirs == sorted(order)
    plan = [(d, ckpt.read_meta(ref / d / "final.safetensors").total_steps) for d in order]
    out = tmp_path / "soaked"
    kills = soak(args, out, SOAK, random.Random(f"soak/pipeline/{SOAK}"), plan)
    a = json.loads((ref / "report.json").read_text())["results"]
    b = json.loads((out / "report.json").read_text())["results"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a] == [{k: v for k, v in r.items() if k != "seconds"} for r in b]
    for d in stage_dirs:
        check_same_run(ref / d, out / d, str(d))
    print(f"\nsoak ({SOAK} launches): pipeline SIGKILLs survived, bit-identical end: {kills}")
    assert kills >= (SOAK - 1) // 2
