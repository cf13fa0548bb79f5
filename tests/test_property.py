"""Property-based: whatever the options, checkpoint bytes or image bytes, the command ends with exit
code 0, 2 (bad input) or 1 (OS-level failure), one ``simclrv2: error:`` line and no traceback, and
leaves no half-written output (every .safetensors loads, no .tmp files)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from test_reliability import _write_model, assert_outputs_whole, error_line, folder_args, one_thread, run  # noqa: F401

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ option values

NUMBERS = ["-1", "0", "-0.0", "1e-300", "1e300", "99999999999999999999999", "nan", "inf", "-inf", "abc", "", "0x10", "1_0"]
VALID = {  # option: values that keep a run tiny
    "--lr": ["0.1"], "--temperature": ["0.5"], "--label-fraction": ["0.5"], "--labels-per-class": ["3"],
    "--width": ["0.0625"], "--depth": ["18", "34"], "--epochs": ["0.05"], "--batch-size": ["16"],
    "--warmup-fraction": ["0.1"], "--weight-decay": ["0.001"], "--crop-min": ["0.5"], "--seed": ["3"],
    "--checkpoint-every": ["1"], "--memory-size": ["0", "40"], "--memory-decay": ["0.9"], "--head-layers": ["2"],
    "--proj-dim": ["8"], "--image-size": ["16", "12"], "--knn-k": ["5"], "--knn-every": ["1"], "--color-strength": ["0.5"],
    "--head-layer": ["1"], "--pad-crop": ["2"], "--workers": ["1"], "--eval-batch-size": ["7"],
}
CHOICES = {
    "--lr-scaling": ["none", "cubic"], "--optimizer": ["sgd", "adam"], "--precision": ["fp32", "fp16"],
    "--dataset": ["digits", "mnist", "cifar10"], "--preset": ["tiny", "nope", "cpu-demo"], "--device": ["cpu", "quantum"],
}
BASE = {
    "pretrain": ["--epochs", "0.05", "--batch-size", "64", "--knn-every", "0", "--no-blur", "--knn-train-size", "200"],
    "supervised": ["--epochs", "0.2", "--batch-size", "16", "--label-fraction", "0.1"],
}


@st.composite
def argument_lists(draw):
    stage = draw(st.sampled_from(sorted(BASE)))
    names = draw(st.lists(st.sampled_from(sorted(VALID) + sorted(CHOICES)), min_size=1, max_size=4, unique=True))
    args = [stage, "--dataset", "digits", "--depth", "18", "--width", "0.0625", "--precision", "fp32",
            "--log-every", "1000", *BASE[stage]]
    for name in names:
        values = CHOICES.get(name) or VALID[name] + NUMBERS
        args += [name, draw(st.sampled_from(values))]
    return args


def check(rc: int, text: str, out: Path) -> None:
    assert rc in (0, 1, 2), (rc, text)
    if rc:
        error_line(rc, text, rc)
    assert_outputs_whole(out)


@settings(max_examples=30, **SETTINGS)
@given(argument_lists())
def test_any_option_values_end_cleanly(args):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        rc, text = run(*args, "--out", str(out))
        check(rc, text, out)
        if rc == 0:
            assert (out / "final.safetensors").exists()


# ------------------------------------------------------------------ corrupted checkpoints

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    return {"classifier": _write_model(d / "c" / "final", "classifier").read_bytes(),
            "simclr": _write_model(d / "s" / "final", "simclr").read_bytes()}


mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4)),
    st.tuples(st.just("overwrite"), st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=64))),
)


def mutate(data: bytes, mutation) -> bytes:
    kind, how = mutation
    if kind == "truncate":
        return data[: int(how * len(data))]
    b = bytearray(data)
    if kind == "flip":
        for pos, bit in how:
            b[int(pos * len(b))] ^= 1 << bit
    else:
        pos, chunk = how
        i = int(pos * len(b))
        b[i:i + len(chunk)] = chunk
    return bytes(b)


@settings(max_examples=30, **SETTINGS)
@given(st.sampled_from(["evaluate", "finetune", "distill"]), mutations)
def test_corrupted_checkpoints_are_one_line_errors(checkpoints, command, mutation):
    data = checkpoints["simclr" if command == "finetune" else "classifier"]
    bad = mutate(data, mutation)
    if bad == data:
        return
    with tempfile.TemporaryDirectory() as d:
        path, out = Path(d) / "model.safetensors", Path(d) / "out"
        path.write_bytes(bad)
        if command == "evaluate":
            args = ["evaluate", str(path)]
        else:
            flag = "--pretrained" if command == "finetune" else "--teacher"
            args = [command, "--out", str(out), "--dataset", "digits", "--precision", "fp32", flag, str(path)]
        line = error_line(*run(*args))  # every change is detected: the header checksum covers it all
        assert str(path) in line, line
        assert not out.exists() or not list(out.rglob("*.safetensors"))


# ------------------------------------------------------------------ corrupted images

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (12 + 3 * i, 14, 3), dtype=np.uint8))
                img.save(root / split / c / f"{c}{i}.{'jpg' if i % 2 else 'png'}")
    return root


@settings(max_examples=12, **SETTINGS)
@given(st.integers(0, 11), mutations, st.booleans())
def test_corrupted_images_end_cleanly(image_folder, which, mutation, skip):
    with tempfile.TemporaryDirectory() as d:
        root, out = Path(d) / "data", Path(d) / "out"
        shutil.copytree(image_folder, root)
        target = sorted((root / "train").rglob("*.*"))[which]
        target.write_bytes(mutate(target.read_bytes(), mutation))
        args = folder_args(root, out, "--batch-size", "4", *(["--skip-bad-images"] if skip else []))
        rc, text = run(*args)
        check(rc, text, out)
        if rc:
            assert str(target) in text.strip().splitlines()[-1], text
        else:
            assert (out / "final.safetensors").exists()
