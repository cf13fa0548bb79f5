"""Every stage in fp32 and bf16 autocast, on 1- and 3-channel data, with and without blur.

bf16 autocast is what ``--precision auto`` picks on CPUs with AVX512-BF16 / AMX and on recent
GPUs; a stage that only ever ran in fp32 on 1-channel data once crashed at its first step on
RGB data in bf16 (the augmentation's luma matmul and blur convolution returned bf16 inside the
model's autocast region). Here each stage runs a couple of real steps in each precision, on
Fashion-MNIST-like 1-channel images (digits at 24 px, in memory) and on an RGB image folder
(24 px PNGs on disk), so that the blur (>= 20 px views) and the colour ops on 3 channels all run.

The stages get a :class:`Runtime` with the autocast dtype directly, so bf16 runs on any CPU
(emulated where it is not native); the CLI test at the end uses ``--precision auto`` as a user does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2 import cli
from simclrv2.config import make_config
from simclrv2.runtime import Runtime, bf16_supported, init_runtime
from simclrv2.stages import distill, evaluate, finetune, linear_eval, pretrain, supervised
from simclrv2.checkpoint import load_model

SIZE = 24  # blur kernel 2 * ((24 // 10) // 2) + 1 = 3 taps: the blur really filters
MODEL = dict(depth=18, width=0.125)
COMMON = dict(seed=0, log_every=1000, workers=0, labels_per_class=4, min_steps=0)  # exactly the epochs: a few steps


def rgb_folder(root: Path, per_class: int = 12, val: int = 4) -> Path:
    """An RGB image folder of 3 classes (coloured digits at 24 px)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    colours = np.array([[255, 60, 40], [40, 200, 60], [50, 80, 255]], dtype=np.float64)
    for split, count, offset in (("train", per_class, 0), ("val", val, 500)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(digits.target == c)[offset // 100: offset // 100 + count]
            for i in idx:
                gray = digits.images[i] / 16.0  # 8x8 in [0, 1]
                rgb = (gray[:, :, None] * colours[c]).astype(np.uint8)
                Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return rgb_folder(tmp_path_factory.mktemp("rgb"))


def _data(channels: int, folder: Path) -> dict:
    if channels == 1:
        return dict(dataset="digits", image_size=SIZE)
    return dict(dataset="imagefolder", data_dir=str(folder), image_size=SIZE)


def _rt(precision: str) -> Runtime:
    return Runtime(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else None)


def _finite_weights(path: Path) -> bool:
    model, _ = load_model(path)
    return all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("blur", [False, True])
def test_pretraining_steps(tmp_path, folder, precision, channels, blur):
    cfg = make_config("pretrain", out=str(tmp_path / "pre"), epochs=0.02, batch_size=16, blur=blur, knn_every=0,
                      knn_train_size=60, precision=precision, **MODEL, **COMMON, **_data(channels, folder))
    result = pretrain(cfg, _rt(precision))
    model, meta = load_model(tmp_path / "pre", "simclr")
    assert meta.model.in_channels == channels
    assert meta.precision == precision  # the precision the run used is recorded
    assert np.isfinite(result["final_loss"]) and result["knn"] is not None
    assert _finite_weights(tmp_path / "pre")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_classifier_stage(tmp_path, folder, precision, channels):
    """pretrain (blur on) -> linear-eval, fine-tune -> self-distil, big-to-small distil; supervised; evaluate."""
    rt, data = _rt(precision), _data(channels, folder)
    kw = dict(precision=precision, **COMMON, **data)
    pretrain(make_config("pretrain", out=str(tmp_path / "pre"), epochs=0.02, batch_size=16, blur=True, knn_every=0,
                         knn_train_size=60, **MODEL, **kw), rt)
    results = {
        "linear": linear_eval(make_config("linear_eval", out=str(tmp_path / "lin"), pretrained=str(tmp_path / "pre"),
                                          epochs=1, batch_size=8, **kw), rt),
        "finetune": finetune(make_config("finetune", out=str(tmp_path / "ft"), pretrained=str(tmp_path / "pre"),
                                         epochs=1, batch_size=8, **kw), rt),
        "supervised": supervised(make_config("supervised", out=str(tmp_path / "sup"), epochs=1, batch_size=8,
                                             **MODEL, **kw), rt),
    }
    results["self"] = distill(make_config("distill", out=str(tmp_path / "self"), teacher=str(tmp_path / "ft"),
                                          init_from=str(tmp_path / "ft"), epochs=0.05, batch_size=16, **kw), rt)
    results["small"] = distill(make_config("distill", out=str(tmp_path / "small"), teacher=str(tmp_path / "ft"),
                                           depth=18, width=0.0625, epochs=0.05, batch_size=16, **kw), rt)
    for name, r in results.items():
        assert 0 <= r["top1"] <= 100 and r["top5"] >= r["top1"], name
        assert _finite_weights(tmp_path / {"linear": "lin", "finetune": "ft", "supervised": "sup", "self": "self",
                                           "small": "small"}[name])
    # evaluate reproduces the stage's own accuracy at the stage's precision
    native = precision == "fp32" or bf16_supported(torch.device("cpu"))
    again = evaluate(str(tmp_path / "small"), data_dir=data.get("data_dir"), precision=precision if native else "fp32",
                     device="cpu")
    if native:
        assert again["top1"] == pytest.approx(results["small"]["top1"])


def test_rgb_pipeline_with_auto_precision(tmp_path, folder, capsys):
    """The user's command: the pipeline on an RGB image folder, --precision auto (bf16 where native)."""
    out = tmp_path / "run"
    code = cli.main(["-q", "pipeline", "--preset", "tiny", "--dataset", "imagefolder", "--data-dir", str(folder),
                     "--out", str(out), "--label-fraction", "0.2",
                     "--set", "precision=auto", "--set", f"image_size={SIZE}", "--set", "workers=0",
                     "--set", "pretrain.blur=true", "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=16",
                     "--set", "pretrain.knn_train_size=36", "--set", "supervised.epochs=1",
                     "--set", "supervised.batch_size=6", "--set", "linear_eval.epochs=1", "--set", "linear_eval.batch_size=6",
                     "--set", "finetune.epochs=1", "--set", "finetune.batch_size=6", "--set", "distill.batch_size=16"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    expected = "bf16" if init_runtime("cpu", "auto").dtype == torch.bfloat16 else "fp32"
    _, meta = load_model(next(out.glob("**/pretrain")))
    assert meta.precision == expected
    assert report  # the report was written: every stage finished
