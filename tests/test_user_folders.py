"""A user's own images (issue 16): separate folders, views from the whole image, bit depth and gray,
the stem option, view transforms, schedules that fit the data, and the recipe end to end on real images."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _digit_folders import make_digit_folders
from simclrv2 import checkpoint as ckpt
from simclrv2.config import load_preset, make_config, stage_values
from simclrv2.data.augment import (EvalTransform, FinetuneAugment, PretrainAugment, random_resized_crop_params,
                                   rotations_and_flips)
from simclrv2.data.batch import ImageBatch
from simclrv2.data.folders import auto_image_size, resolve_bit_depth
from simclrv2.data.image_check import FolderSummary
from simclrv2.data.sources import ImageFolderDataset, bits_for, read_image
from simclrv2.errors import ConfigError
from simclrv2.optim import plan_steps


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """unlabeled/ (300 images, nested, no classes), labeled/D (10 a class), test/D (15 a class): real digits at
    24..64 px, aspect 3:4..4:3, PNG, JPEG and 16-bit PNG of 12-bit values."""
    return make_digit_folders(tmp_path_factory.mktemp("digits"))


ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(os.path.abspath(p) for p in sys.path if p))


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "simclrv2", *args], capture_output=True, text=True, cwd=cwd, timeout=900,
                       env=ENV)
    return p.returncode, p.stdout, p.stderr


def folders(root: Path, *names: str) -> list[str]:
    return [a for n in names for a in (f"--{n}-dir", str(root / n))]


# ------------------------------------------------------------------ layouts and decisions


def test_layout_options_resolve_the_dataset_and_use_every_label(tmp_path):
    cfg = make_config("finetune", load_preset("cpu-demo"), out="x", pretrained="p", labeled_dir="L")
    assert cfg.dataset == "imagefolder" and cfg.label_fraction == 1.0  # cpu-demo is fashion-mnist at 1%
    cfg = make_config("finetune", None, out="x", pretrained="p", labeled_dir="L", label_fraction=0.5)
    assert cfg.label_fraction == 0.5
    with pytest.raises(ConfigError, match="--dataset digits cannot be combined with --unlabeled-dir"):
        make_config("pretrain", None, out="x", unlabeled_dir="U", dataset="digits")
    with pytest.raises(ConfigError, match="--data-dir .* cannot be combined with --labeled-dir"):
        make_config("pretrain", None, out="x", labeled_dir="L", data_dir="D")
    for option, value, needle in (("bit_depth", "9", "--bit-depth must be one of auto, 8, 10, 12, 14, 16"),
                                  ("stem", "tiny", "--stem must be one of auto, small, imagenet"),
                                  ("decode_scale", 0.5, "--decode-scale must be between 1 and 8"),
                                  ("min_steps", -1, "--min-steps must be >= 0")):
        with pytest.raises(ConfigError, match=needle):
            make_config("supervised", None, out="x", **{option: value})
    assert make_config("pretrain", None, out="x", bit_depth=12).bit_depth == "12"  # a YAML number (--set) is fine


def test_folder_datasets_read_their_layouts(digits, tmp_path):
    lab = ImageFolderDataset.labeled(digits / "labeled", "train", 32)
    assert lab.classes == [str(d) for d in range(10)] and len(lab) == 100 and np.bincount(lab.labels).tolist() == [10] * 10
    assert lab.ids[0].startswith("0/") and lab.variable_size and not lab.in_memory
    un = ImageFolderDataset.unlabeled(digits / "unlabeled", 32, lab.classes)
    assert len(un) == 300 and set(un.labels.tolist()) == {-1} and any(i.startswith("a/b/") for i in un.ids)
    shapes = {tuple(un[i][0].shape[1:]) for i in range(20)}
    assert len(shapes) > 10  # mixed sizes and aspect ratios, each image whole
    for c in ("0", "zebra"):
        (tmp_path / "t" / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "t" / c / "x.png")
    with pytest.raises(Exception, match="zebra is not a class of the labelled images"):
        ImageFolderDataset.labeled(tmp_path / "t", "test", 32, lab.classes, option="--test-dir")
    with pytest.raises(Exception, match="--unlabeled-dir .*nothing: no such folder"):
        ImageFolderDataset.unlabeled(tmp_path / "nothing", 32, option="--unlabeled-dir")


def test_bit_depth_and_gray_are_decided_from_the_images(tmp_path):
    """12-bit values in 16-bit PNGs are scaled by 4095 (auto), not 65535, and never clipped by an 8-bit
    conversion; all-gray folders stay 1 channel; one colour image makes the folder RGB."""
    ramp = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "r12.png")
    assert Image.open(tmp_path / "r12.png").mode.startswith("I")
    x = read_image(str(tmp_path / "r12.png"), None, 1, 12)
    np.testing.assert_array_equal(x[0].numpy(), np.clip(np.rint(ramp / (4095 / 255)), 0, 255).astype(np.uint8))
    assert int(x.max()) == 255 and read_image(str(tmp_path / "r12.png"), None, 1, 16).max() == 16  # 4095/257
    assert [bits_for(v) for v in (255, 256, 1023, 4095, 4096, 16383, 65535)] == [8, 10, 10, 12, 14, 14, 16]
    s = FolderSummary()
    s.add({"h": 48, "w": 64, "gray": True, "bits": 16, "max": 4095})
    s.add({"h": 30, "w": 30, "gray": True, "bits": 8, "max": -1})
    assert (s.gray, resolve_bit_depth("auto", s), resolve_bit_depth("16", s)) == (True, 12, 16)
    header_only = FolderSummary()
    header_only.add({"h": 48, "w": 64, "gray": True, "bits": 16, "max": -1})
    assert resolve_bit_depth("auto", header_only) == 16 and resolve_bit_depth("auto", FolderSummary()) == 8
    assert auto_image_size(s) == 40 and auto_image_size(FolderSummary()) == 224  # median 39 -> 40

    root = tmp_path / "f"
    for c in ("a", "b"):
        for i in range(3):
            (root / "labeled" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray((ramp * (i + 1) // 3).astype(np.uint16)).save(root / "labeled" / c / f"{i}.png")
            Image.new("L", (40, 30), 100 + i).save(root / "labeled" / c / f"{i}g.jpg")
    Image.fromarray(np.full((20, 20, 3), 77, np.uint8)).save(root / "labeled" / "a" / "rgb_but_gray.png")
    rc, out, err = run("supervised", "--labeled-dir", str(root / "labeled"), "--depth", "18", "--width", "0.0625",
                       "--epochs", "1", "--min-steps", "1", "--batch-size", "4", "--precision", "fp32",
                       "--out", str(tmp_path / "sup"), cwd=tmp_path)
    assert rc == 0, err
    meta = ckpt.read_meta(tmp_path / "sup" / "final.safetensors")
    assert meta.model.in_channels == 1 and meta.bit_depth == 12 and meta.image_size == 32
    assert "1 channel, 32 px views, 12-bit images scaled by 4095" in err
    assert "no test images" in err and "top1" not in json.loads(out)
    Image.fromarray(np.dstack([ramp.astype(np.uint8)] * 2 + [np.zeros_like(ramp, np.uint8)])).save(
        root / "labeled" / "b" / "colour.png")
    rc, out, err = run("supervised", "--labeled-dir", str(root / "labeled"), "--depth", "18", "--width", "0.0625",
                       "--epochs", "1", "--min-steps", "1", "--batch-size", "4", "--precision", "fp32",
                       "--out", str(tmp_path / "sup3"), cwd=tmp_path)
    assert rc == 0, err
    assert ckpt.read_meta(tmp_path / "sup3" / "final.safetensors").model.in_channels == 3


# ------------------------------------------------------------------ views from the whole image


def test_crops_are_drawn_against_each_image_and_cut_from_the_whole_image():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 64), (64, 40), (30, 30), (9, 50))]
    batch = ImageBatch.from_images(images)
    aug = PretrainAugment(24, crop_scale=(0.08, 1.0), color_strength=0.0, gray_p=0.0, blur=False)
    params = aug.sample_params(4, batch.sizes[:, 0], batch.sizes[:, 1], torch.Generator().manual_seed(3))
    # the same draws as one image at a time: each box drawn against its own image
    g = torch.Generator().manual_seed(3)
    u_boxes = [random_resized_crop_params(4, h, w, generator=torch.Generator().manual_seed(3))[i]
               for i, (h, w) in enumerate(batch.sizes.tolist())]
    assert torch.equal(params["boxes"], torch.stack(u_boxes))
    boxes = params["boxes"]
    assert ((boxes[:, 0] + boxes[:, 2] <= batch.sizes[:, 0]) & (boxes[:, 1] + boxes[:, 3] <= batch.sizes[:, 1])).all()
    views = aug(batch, g)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):  # reference: crop the box, resize, flip
        crop = images[i][None, :, top:top + h, left:left + w].float()
        ref = F.interpolate(crop, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)[0] / 255
        ref = ref.flip(-1) if params["flip"][i] else ref
        torch.testing.assert_close(views[i], ref, atol=1e-6, rtol=0)
    # a crop of the whole image reaches its borders: a 30x90 image, full-area crops of aspect 3
    wide = torch.zeros(1, 30, 90, dtype=torch.uint8)
    wide[:, :, :12] = 255
    v = PretrainAugment(16, crop_scale=(1.0, 1.0), crop_ratio=(3.0, 3.0), flip_p=0.0, color_strength=0.0, gray_p=0.0)(
        ImageBatch.from_images([wide]), torch.Generator().manual_seed(0))
    assert v[0, 0, :, 0].min() > 0.9 and v[0, 0, :, -1].max() == 0  # the left border stripe is in the view
    # evaluation: the central 87.5% square of the whole image, resized
    e = EvalTransform(24)(batch)
    ref = F.interpolate(images[0][None, :, 3:38, 15:50].float(), size=(24, 24), mode="bilinear", antialias=True,
                        align_corners=False)[0] / 255
    torch.testing.assert_close(e[0], ref, atol=1e-6, rtol=0)
    assert FinetuneAugment(24, pad_crop=2)(batch, torch.Generator()).shape == (4, 3, 24, 24)


def test_views_of_a_slice_are_the_rows_of_the_whole_batch():
    """Under torchrun each process holds a slice: its views are those rows of one process's views."""
    images = [torch.randint(0, 256, (1, 20 + 7 * i, 50 - 5 * i), dtype=torch.uint8) for i in range(6)]
    batch = ImageBatch.from_images(images)
    aug = PretrainAugment(16, blur=True)
    full = aug.views(batch, torch.Generator().manual_seed(1))
    part = aug.views(batch[2:4], torch.Generator().manual_seed(1), rows=(2, 6))
    torch.testing.assert_close(part, torch.cat([full[2:4], full[8:10]]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ view transforms


def test_view_transforms_change_the_views_and_stay_deterministic():
    x = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    plain = PretrainAugment(16)
    rotated = PretrainAugment(16, extra=[rotations_and_flips])
    a = plain(x, torch.Generator().manual_seed(0))
    b = rotated(x, torch.Generator().manual_seed(0))
    assert torch.equal(b, rotated(x, torch.Generator().manual_seed(0)))  # a function of the seed
    assert not torch.equal(a, b)
    # each view is its plain view turned by a multiple of 90 degrees and maybe flipped vertically
    for i in range(8):
        turns = [torch.rot90(a[i], k, dims=(1, 2)) for k in range(4)]
        assert any(torch.equal(b[i], t) or torch.equal(b[i], t.flip(1)) for t in turns)
    assert torch.equal(a, plain(x, torch.Generator().manual_seed(0)))  # nothing drawn without them
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        PretrainAugment(16, extra=[lambda v, g: v[:, :, :8]])(x, torch.Generator())
    with pytest.raises(ConfigError):
        FinetuneAugment(16, extra=["not callable"])


def test_view_transforms_reach_the_stages(tmp_path):
    import simclrv2

    seen = []

    def spy(views, generator):
        seen.append(tuple(views.shape))
        return rotations_and_flips(views, generator)

    opts = dict(dataset="digits", depth=18, width=0.0625, epochs=1, batch_size=128, precision="fp32", knn_every=0,
                log_every=1000)
    simclrv2.pretrain(out=str(tmp_path / "a"), view_transforms=[spy], **opts)
    simclrv2.pretrain(out=str(tmp_path / "b"), view_transforms=[spy], **opts)
    simclrv2.pretrain(out=str(tmp_path / "c"), **opts)
    assert seen and seen[0] == (256, 1, 16, 16) and len(seen) == 2 * 11  # 2 runs x 11 steps, both views at once
    a, b, c = (ckpt.load_checkpoint(tmp_path / n / "final.safetensors")[0] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed: the same run
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------ the stem


def test_stem_option_is_recorded_in_the_model(tmp_path):
    opts = ["--dataset", "digits", "--precision", "fp32", "--log-every", "1000"]
    model = ["--depth", "18", "--width", "0.0625"]
    from test_reliability import run as run_here  # in this process: no interpreter and torch start per command

    rc, err = run_here("pretrain", *opts, *model, "--epochs", "1", "--knn-every", "0", "--stem", "imagenet",
                     "--out", str(tmp_path / "pre"))
    assert rc == 0, err
    spec = ckpt.read_meta(tmp_path / "pre" / "final.safetensors").model
    assert spec.stem_type == "default"  # 16 px digits would get the small stem by default
    rc, err = run_here("finetune", *opts, "--epochs", "1", "--min-steps", "2", "--pretrained", str(tmp_path / "pre"),
                     "--out", str(tmp_path / "ft"))
    assert rc == 0, err
    assert ckpt.read_meta(tmp_path / "ft" / "final.safetensors").model.stem_type == "default"
    rc, err = run_here("supervised", *opts, *model, "--epochs", "1", "--min-steps", "2", "--out", str(tmp_path / "sup"))
    assert rc == 0, err
    assert ckpt.read_meta(tmp_path / "sup" / "final.safetensors").model.stem_type == "small"
    rc, out, err = run("pretrain", "--help")
    assert "--stem {auto,small,imagenet}" in out and "--bit-depth {auto,8,10,12,14,16}" in out
    assert "--unlabeled-dir" in out and "--decode-scale" in out and "--image-cache-gb" in out


# ------------------------------------------------------------------ schedules


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_plan_steps_raises_short_schedules_and_caps_the_batch(caplog):
    assert plan_steps("x", _Cfg(batch_size=64, epochs=5, min_steps=150), 144) == (64, 150)  # 2 steps x 5 -> 150
    assert plan_steps("x", _Cfg(batch_size=64, epochs=100, min_steps=150), 600) == (64, 900)  # unchanged
    assert plan_steps("x", _Cfg(batch_size=512, epochs=3, min_steps=150), 100) == (100, 150)  # batch capped
    assert plan_steps("x", _Cfg(batch_size=512, epochs=3, min_steps=150), 101, world_size=2) == (100, 150)
    logger = logging.getLogger("simclrv2")  # (propagates nothing once the CLI has set up logging)
    logger.addHandler(caplog.handler)
    try:
        assert plan_steps("pretrain", _Cfg(batch_size=128, epochs=2), 400) == (128, 6)
    finally:
        logger.removeHandler(caplog.handler)
    assert "pretrain: only 6 optimiser steps" in caplog.text and "too short" in caplog.text


@pytest.mark.parametrize("preset", ["cpu-demo", "cpu-full"])
def test_the_fashion_mnist_presets_train_as_before(preset):
    """Their classifier stages already train more steps than the minimum: the schedules (and results) are
    those of before --min-steps (60,000 training images; 1% = 600 labels, 10% = 6,000)."""
    p = load_preset(preset)
    for fraction in p["label_fractions"]:
        labels = int(round(fraction * 60000))
        for stage, section, n in (("supervised", "supervised", labels), ("finetune", "finetune", labels),
                                  ("linear_eval", "linear_eval", labels), ("distill", "distill", 60000),
                                  ("distill", "distill_small", 60000)):
            if section not in p:
                continue
            values = stage_values(p, stage)
            values.update(p.get(section) or {})
            values.update(((p.get("fractions") or {}).get(fraction) or {}).get(section) or {})
            cfg = make_config(stage, {stage: values}, out="x", label_fraction=fraction)
            before = max(1, int(round(cfg.epochs * (n // cfg.batch_size))))
            assert cfg.batch_size <= n and before >= cfg.min_steps, (preset, fraction, section, before)
            assert plan_steps(stage, cfg, n) == (cfg.batch_size, before)


def test_linear_eval_reads_large_frozen_features_through_a_norm(tiny_pretrained, tmp_path):
    """A frozen encoder whose BN running statistics lag its weights (short pretraining) gives features so large
    that the linear classifier's loss blows up: auto turns the feature norm on; not for a sound encoder."""
    from simclrv2.stages import linear_eval

    base = dict(dataset="digits", precision="fp32", label_fraction=0.1, epochs=3, batch_size=64, log_every=1000,
                pretrained=str(tiny_pretrained[0]))
    tensors, meta = ckpt.load_checkpoint(Path(tiny_pretrained[0]) / "final.safetensors")
    last_bn = [k for k in tensors if k.startswith("model.encoder.") and k.endswith("running_var")][-1]
    blown = {k: (v / 1000 if k == last_bn else v) for k, v in tensors.items()}  # lagging BN statistics
    ckpt.save_checkpoint(tmp_path / "pre_blown" / "final", blown, meta.replace(result=None))
    runs = {}
    for name, pre, norm in (("normal", tiny_pretrained[0], "auto"), ("blown", tmp_path / "pre_blown", "auto"),
                            ("blown_off", tmp_path / "pre_blown", "off")):
        cfg = make_config("linear_eval", None, out=str(tmp_path / name), feature_norm=norm,
                          **dict(base, pretrained=str(pre)))
        runs[name] = linear_eval(cfg)
    spec = {n: ckpt.read_meta(tmp_path / n / "final.safetensors").model for n in runs}
    assert spec["normal"].feature_norm is False and spec["blown"].feature_norm is True
    loss = {n: [json.loads(r)["loss"] for r in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in runs}
    assert max(loss["blown_off"]) > 10 * max(loss["blown"])  # without the norm the loss blows up
    assert runs["blown"]["top1"] > runs["blown_off"]["top1"] + 5


# ------------------------------------------------------------------ the recipe on real images, through the CLI


def test_recipe_on_a_users_folders_through_the_cli(digits, tmp_path):
    """pretrain -> fine-tune -> distill -> export -> onnxruntime on digit images (mixed sizes, aspect ratios,
    PNG / JPEG / 12-bit PNG, an unlabeled folder without classes), through the CLI with nothing but the
    folder paths (the default preset, cpu-demo; about a minute): every label of the labelled folder is used;
    the models land well above chance (10 classes: 10%) and fine-tuning above the supervised baseline;
    README's ONNX recipe on the raw files gives predict's classes."""
    out = tmp_path / "pipe"
    rc, text, err = run("pipeline", *folders(digits, "unlabeled", "labeled", "test"), "--out", str(out), cwd=tmp_path)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    top1 = {r["stage"] if r["stage"] != "distill" else r["variant"]: r["top1"] for r in report["results"]}
    assert report["preset"] == "cpu-demo" and all(r["label_fraction"] == 1.0 for r in report["results"])
    assert len((out / "labels_1" / "finetune" / "labeled_subset.txt").read_text().split()) == 100
    assert top1["finetune"] > 50 and top1["self"] > 50, top1
    assert top1["finetune"] > top1["supervised"], top1
    assert "1 channel, 40 px views, 12-bit images scaled by 4095" in err
    deployed = out / "labels_1" / "distill_self"
    meta = ckpt.read_meta(deployed / "final.safetensors")
    assert meta.image_size == 40 and meta.model.in_channels == 1 and meta.bit_depth == 12
    # evaluate finds the run's own test folder, decoded as the run decoded it, at the run's precision
    rc, text, err = run("evaluate", str(deployed))
    assert rc == 0, err
    assert math.isclose(json.loads(text)["top1"], top1["self"], abs_tol=1e-9)

    # handing the deployed model over: export -> README's recipe with onnxruntime on the raw files == predict
    onnx_file = tmp_path / "model.onnx"
    rc, _, err = run("export", str(deployed), "--onnx", str(onnx_file), cwd=tmp_path)
    assert rc == 0, err
    rc, _, err = run("predict", str(deployed), str(digits / "test"), "--out", str(tmp_path / "preds.csv"), cwd=tmp_path)
    assert rc == 0, err
    with open(tmp_path / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    files = [r["path"] for r in rows]
    assert len(files) == 150 and {Path(f).suffix for f in files} == {".png", ".jpg"}
    classes = readme_onnx_recipe(onnx_file)(files)
    assert classes == [r["class"] for r in rows]  # every image, 12-bit PNGs and JPEGs included
    truth = [Path(f).parent.name for f in files]  # and they are the model's predictions: mostly right
    assert sum(a == b for a, b in zip(classes, truth)) > 0.5 * len(files)


def readme_onnx_recipe(onnx_file: Path):
    """README's "Running an exported model" code, run as written (only the file name replaced): its
    ``classify(files) -> class names``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Running an exported model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count('"model.onnx"') == 1
    namespace: dict = {}
    exec(compile(code.replace('"model.onnx"', repr(str(onnx_file))), "README.md", "exec"), namespace)
    return namespace["classify"]


def test_a_stage_from_a_checkpoint_sees_the_images_as_its_run_did(digits, tmp_path):
    """Fine-tuning given only --labeled-dir after pretraining at another size: the checkpoint's image size,
    channels and bit depth, not those its own folders would give (40 px here)."""
    common = ["--labeled-dir", str(digits / "labeled"), "--precision", "fp32", "--epochs", "1", "--batch-size", "50"]
    rc, _, err = run("pretrain", *common, "--image-size", "24", "--depth", "18", "--width", "0.0625",
                     "--knn-every", "0", "--out", str(tmp_path / "pre"))
    assert rc == 0, err
    rc, _, err = run("finetune", *common, "--min-steps", "1", "--pretrained", str(tmp_path / "pre"),
                     "--out", str(tmp_path / "ft"))
    assert rc == 0, err
    meta = ckpt.read_meta(tmp_path / "ft" / "final.safetensors")
    assert (meta.image_size, meta.model.in_channels, meta.bit_depth) == (24, 1, 12)
