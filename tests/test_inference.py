"""`simclrv2 embed / predict / export / import-tf` (simclrv2.inference), run through the CLI as a user would."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.cli import main
from simclrv2.data import load_dataset, subset
from simclrv2.data.augment import EvalTransform
from simclrv2.engine import predict as engine_predict
from simclrv2.runtime import Runtime
from simclrv2.checkpoint import load_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf_r50_tiny"
TF1 = FIXTURES / "tf1_r50_w1-16_sk1" / "model.ckpt-8"
N = 24  # test images written as PNG files


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny digits classifier (seconds to train) and the first N test images as PNGs in nested folders."""
    import simclrv2

    root = tmp_path_factory.mktemp("inference")
    out = root / "sup"
    # the Python API: the CLI's option names as keyword arguments (make_config + the stage function)
    result = simclrv2.supervised(out=str(out), dataset="digits", depth=18, width=0.0625, epochs=1, batch_size=64,
                                 precision="fp32", label_fraction=0.5, log_every=1000)
    assert result["stage"] == "supervised" and (out / "final.safetensors").exists()
    assert "optimizer: sgd" in (out / "config.yaml").read_text()  # the supervised defaults, as on the CLI
    test = load_dataset("digits", "test")
    images = root / "images"
    files = []
    for i in range(N):
        folder = images / ("a" if i < N // 2 else "b/deeper")
        folder.mkdir(parents=True, exist_ok=True)
        f = folder / f"{i:03d}.png"
        Image.fromarray(test.images[i, 0].numpy(), mode="L").save(f)
        files.append(str(f))
    return out, images, files, subset(test, np.arange(N))


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simclrv2: error:") and needle in err[0], err
    return err[0]


def _reference_outputs(ckpt_dir, data, fn=None):
    """Model outputs the way `simclrv2 evaluate` computes them (dataset tensors, EvalTransform, fp32)."""
    model, meta = load_model(ckpt_dir, "classifier")
    rt = Runtime(torch.device("cpu"), None)
    out, labels = engine_predict(model, data, rt, EvalTransform(meta.image_size), 500, fn=fn)
    return out, meta


def test_embed_folder_recursive_with_sidecar(classifier, tmp_path):
    ckpt_dir, images, files, data = classifier
    feats_path = tmp_path / "feats.npy"
    assert main(["-q", "embed", str(ckpt_dir), str(images), "--out", str(feats_path), "--batch-size", "10"]) == 0
    feats = np.load(feats_path)
    paths = (tmp_path / "feats.paths.txt").read_text().splitlines()
    assert paths == sorted(files) == files  # recursive, sorted, in row order
    assert feats.shape == (N, 32) and feats.dtype == np.float32  # ResNet-18 at width 1/16: 512/16 features
    ref, _ = _reference_outputs(ckpt_dir, data, fn=lambda m, x: m.features(x))
    assert np.allclose(feats, ref.numpy(), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left nothing behind

    # a list of files (in the order given), an RGB copy converts to the model's single channel
    rgb = tmp_path / "rgb.png"
    Image.open(files[3]).convert("RGB").save(rgb)
    out2 = tmp_path / "two.npy"
    assert main(["-q", "embed", str(ckpt_dir), files[5], str(rgb), "--out", str(out2)]) == 0
    two = np.load(out2)
    assert (tmp_path / "two.paths.txt").read_text().splitlines() == [files[5], str(rgb)]
    assert np.allclose(two, feats[[5, 3]], atol=1e-5)


def test_predict_matches_evaluate_logic(classifier, tmp_path):
    ckpt_dir, images, files, data = classifier
    out = tmp_path / "preds.csv"
    assert main(["-q", "predict", str(ckpt_dir), str(images), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "class", "probability", "top5"] and len(rows) == N
    logits, meta = _reference_outputs(ckpt_dir, data)
    probs = logits.softmax(1)
    classes = meta.classes
    assert [r["path"] for r in rows] == files
    assert [r["class"] for r in rows] == [classes[i] for i in logits.argmax(1).tolist()]
    for r, p in zip(rows, probs):
        top = [(name, float(v)) for name, v in (item.rsplit(":", 1) for item in r["top5"].split(";"))]
        assert len(top) == 5 and top[0][0] == r["class"]
        assert math.isclose(float(r["probability"]), p.max().item(), abs_tol=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:])) and sum(v for _, v in top) <= 1 + 1e-3

    import simclrv2

    api = simclrv2.predict(str(ckpt_dir), files[:4])  # the Python API: same numbers, full probabilities
    assert np.allclose(api["probabilities"].sum(1), 1, atol=1e-5)
    assert np.allclose(api["probabilities"], probs[:4].numpy(), atol=1e-5)


def test_errors_are_one_line(classifier, tmp_path, capsys):
    ckpt_dir, images, files, _ = classifier
    out = str(tmp_path / "x.npy")
    _one_line_error(capsys, ["embed", str(ckpt_dir), str(tmp_path / "missing.png"), "--out", out], "no such file")
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    _one_line_error(capsys, ["embed", str(ckpt_dir), files[0], str(bad), "--out", out], "cannot decode image")
    _one_line_error(capsys, ["predict", str(tmp_path / "nowhere"), files[0], "--out", out], "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["embed", str(ckpt_dir), str(empty), "--out", out], "contains no images")
    _one_line_error(capsys, ["embed", str(ckpt_dir), files[0], "--out", out, "--head-layer", "2"], "--head-layer 2")
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.paths.txt").exists()


def test_export_onnx_matches_onnxruntime(classifier, tmp_path):
    import onnxruntime as ort  # the test extra installs it
    ckpt_dir = classifier[0]
    path = tmp_path / "model.onnx"
    assert main(["-q", "export", str(ckpt_dir), "--onnx", str(path)]) == 0
    assert (tmp_path / "model.classes.txt").read_text().split() == [str(i) for i in range(10)]
    model, meta = load_model(ckpt_dir, "classifier")
    x = torch.rand(7, 1, meta.image_size, meta.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"images": x.numpy()})
    assert got.shape == (7, 10) and np.abs(got - expected).max() <= 1e-4


def test_export_metadata_lets_a_user_reproduce_predict(classifier, tmp_path):
    """The ONNX file carries the class names and the preprocessing; README's recipe (Pillow + numpy +
    onnxruntime, no simclrv2) on image files of other sizes and modes gives predict's classes."""
    import json

    import onnx
    from test_user_folders import readme_onnx_recipe

    ckpt_dir, _, files, _ = classifier
    path = tmp_path / "m.onnx"
    assert main(["-q", "export", str(ckpt_dir), "--onnx", str(path)]) == 0
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["simclrv2.classes"]) == [str(i) for i in range(10)]
    pre = json.loads(props["simclrv2.preprocessing"])
    size = load_model(ckpt_dir, "classifier")[1].image_size
    assert (pre["image_size"], pre["channels"], pre["mode"], pre["crop_fraction"], pre["crop_above"]) == (size, 1, "L", 0.875, 32)
    assert "round(0.875 * side)" in props["simclrv2.recipe"]
    # the digits as users have them: bigger, not square, RGB / RGBA / palette / 16-bit, PNG and JPEG
    rng = np.random.default_rng(1)
    mine = []
    for i, f in enumerate(files[:12]):
        gray = Image.open(f).resize((int(rng.integers(9, 90)), int(rng.integers(9, 90))), Image.Resampling.BILINEAR)
        kind = i % 5
        img = (gray.convert("RGB") if kind == 0 else gray.convert("RGBA") if kind == 1 else gray.convert("P")
               if kind == 2 else Image.fromarray((np.asarray(gray, np.uint16) * 257)) if kind == 3 else gray)
        name = tmp_path / f"u{i}.{'jpg' if kind in (0, 4) else 'png'}"
        img.save(name)
        mine.append(str(name))
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(ckpt_dir), *mine, "--out", str(out)]) == 0
    with open(out, newline="") as f:
        expected = [r["class"] for r in csv.DictReader(f)]
    assert readme_onnx_recipe(path)(mine) == expected


def test_predict_view_is_the_evaluation_crop(tmp_path):
    """decode_eval_image cuts the same central square as EvalTransform (same box for every size) and
    resizes it with Pillow: within rounding of the PyTorch resize."""
    from simclrv2.data.augment import eval_crop_box
    from simclrv2.data.sources import decode_eval_image

    for h, w in [(40, 40), (33, 100), (36, 52), (100, 37), (32, 90), (20, 30), (224, 224), (301, 200)]:
        x = torch.zeros(1, 1, h, w)
        top, left, bh, bw = eval_crop_box(h, w)
        x[:, :, top:top + bh, left:left + bw] = 1  # EvalTransform's crop without resizing sees only ones
        s = min(bh, bw)
        assert (bh, bw) == ((h, w) if min(h, w) <= 32 else (s, s))
        if min(h, w) > 32:
            assert EvalTransform(s)(x).min() == 1
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.Resampling.BICUBIC)
    f = tmp_path / "a.png"
    smooth.save(f)
    ours = decode_eval_image(str(f), 48, 3).float() / 255
    whole = torch.from_numpy(np.array(smooth)).permute(2, 0, 1)[None]
    reference = EvalTransform(48)(whole)[0]  # crop 105 px of 120, torch's antialiased bilinear to 48
    assert ours.shape == (3, 48, 48) and (ours - reference).abs().max() < 0.02


def test_export_without_onnx_names_the_extra(classifier, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    err = _one_line_error(capsys, ["export", str(classifier[0]), "--onnx", str(tmp_path / "m.onnx")], "simclrv2[onnx]")
    assert "export needs the onnx package" in err and not (tmp_path / "m.onnx").exists()


def test_import_tf_then_embed_and_wrong_kind(tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["-q", "import-tf", str(TF1), "--out", str(out)]) == 0
    assert (out / "final.safetensors").exists()
    capsys.readouterr()
    imgs = []
    rng = np.random.default_rng(0)
    for i in range(3):  # RGB images of other sizes: resized (shorter side) and centre-cropped to 224
        f = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (180 + 40 * i, 250, 3), dtype=np.uint8)).save(f)
        imgs.append(str(f))
    for layer, dim in ((None, 128), ("3", 128)):  # encoder 2048/16 = 128; head output 128
        feats = tmp_path / "tf.npy"
        args = ["-q", "embed", str(out), *imgs, "--out", str(feats), "--batch-size", "2"]
        assert main(args + (["--head-layer", layer] if layer else [])) == 0
        f = np.load(feats)
        assert f.shape == (3, dim) and np.isfinite(f).all()
    # a pretrained (simclr) checkpoint is not a classifier: predict and export say so in one line
    _one_line_error(capsys, ["predict", str(out), imgs[0], "--out", str(tmp_path / "p.csv")], "expected a classifier")
    _one_line_error(capsys, ["export", str(out), "--onnx", str(tmp_path / "m.onnx")], "expected a classifier")
    _one_line_error(capsys, ["import-tf", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "nothing")


def test_python_api_names_match_the_cli(monkeypatch):
    import inspect

    import simclrv2
    from simclrv2.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for cmd in commands - {"presets", "summary"}:
        fn = getattr(simclrv2, cmd.replace("-", "_"))
        assert callable(fn) and fn.__doc__, cmd
    # pipeline / export are also submodules: importing them keeps the functions, attributes reach the modules
    import simclrv2.export
    from simclrv2.pipeline import parse_overrides

    assert callable(simclrv2.pipeline) and callable(simclrv2.export)
    assert simclrv2.pipeline.parse_overrides is parse_overrides and simclrv2.export.export_onnx
    assert "label_fractions" in inspect.signature(simclrv2.pipeline).parameters
    monkeypatch.setattr("simclrv2.pipeline.run_pipeline", lambda *a, **k: {"patched": True})
    assert simclrv2.pipeline(out="x") == {"patched": True}
    with pytest.raises(Exception, match="unknown option"):
        simclrv2.pretrain(out="x", dataset="digits", no_such_option=1)
