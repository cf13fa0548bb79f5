"""Labeled subsets: class balance, seed stability, subset files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.data import (
    SubsetDataset,
    TensorImageDataset,
    labeled_subset,
    load_dataset,
    read_subset_file,
    split_labeled,
    write_subset_file,
)
from simclrv2.errors import ConfigError, DataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
OFFICIAL_1PCT = os.path.join(os.path.dirname(__file__), "fixtures", "imagenet_1percent.txt")  # the official file, verbatim


def _reference_subset(labels, fraction=None, per_class=None, seed=0):
    """Independent reimplementation of the documented sampling rule."""
    rng = np.random.default_rng(seed)
    out = []
    for c in sorted(set(int(v) for v in labels if v >= 0)):
        members = [i for i, v in enumerate(labels) if v == c]  # ascending
        k = per_class if per_class is not None else max(1, int(np.floor(fraction * len(members) + 0.5)))
        order = rng.permutation(len(members))
        out.extend(members[j] for j in order[:k])
    return np.array(sorted(out), dtype=np.int64)


def _toy(labels, classes=None, name="toy"):
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).contiguous()
    classes = classes or [f"c{i}" for i in range(int(labels.max()) + 1)]
    return TensorImageDataset(images, labels, classes, name, "train")


def _err_line(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.fixture(scope="module")
def fashion():
    if not os.path.isdir(FASHION_DIR):
        # scripts/setup.sh (README's commands, CI) installs it: a missing dataset is a broken setup, not a skip
        pytest.fail(f"Fashion-MNIST not found in {FASHION_DIR}: run `bash scripts/setup.sh`")
    return load_dataset("fashion-mnist", "train")


def test_fashion_one_percent_balanced(fashion):
    idx = labeled_subset(fashion.labels, fraction=0.01, seed=0)
    assert idx.dtype == np.int64 and len(idx) == 600
    assert np.all(np.diff(idx) > 0)  # sorted, unique
    assert np.bincount(fashion.labels[idx], minlength=10).tolist() == [60] * 10
    ten = labeled_subset(fashion.labels, fraction=0.1, seed=0)
    assert np.bincount(fashion.labels[ten]).tolist() == [600] * 10
    # stability: equals the independent reimplementation (numpy PCG64 stream, class order)
    np.testing.assert_array_equal(idx, _reference_subset(fashion.labels, fraction=0.01, seed=0))
    np.testing.assert_array_equal(
        labeled_subset(fashion.labels, per_class=5, seed=3), _reference_subset(fashion.labels, per_class=5, seed=3)
    )
    # the rest of the training split is the unlabeled pool
    lab, pool = split_labeled(fashion, fraction=0.01, seed=0)
    assert len(lab) == 600 and len(pool) == 59400
    assert set(lab.ids).isdisjoint(pool.ids) and len(set(lab.ids) | set(pool.ids)) == 60000
    assert (pool.labels == -1).all() and lab.labels.tolist() == fashion.labels[idx].tolist()
    assert torch.equal(lab.images, fashion.images[torch.from_numpy(idx)])


def test_seed_reproducibility():
    labels = np.repeat(np.arange(4), [50, 30, 20, 7])
    a = labeled_subset(labels, fraction=0.1, seed=5)
    b = labeled_subset(labels.copy(), fraction=0.1, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, labeled_subset(labels, fraction=0.1, seed=6))
    # per-class counts: round half up, at least 1 (7 * 0.1 = 0.7 -> 1; 50 * 0.1 = 5)
    assert np.bincount(labels[a]).tolist() == [5, 3, 2, 1]
    np.testing.assert_array_equal(a, _reference_subset(labels, fraction=0.1, seed=5))
    # hard-coded values pin the stream across numpy versions and machines
    small = labeled_subset(np.array([0, 1, 0, 1, 0, 1, 0, 1]), per_class=2, seed=0)
    rng = np.random.default_rng(0)
    p0, p1 = rng.permutation(4), rng.permutation(4)
    expect = sorted([[0, 2, 4, 6][j] for j in p0[:2]] + [[1, 3, 5, 7][j] for j in p1[:2]])
    assert small.tolist() == expect


def test_subset_options():
    labels = np.array([2, 0, 1, 2, 0, 1, -1, 2, 0, 1, -1])
    np.testing.assert_array_equal(labeled_subset(labels, fraction=1.0), np.flatnonzero(labels >= 0))
    one = labeled_subset(labels, per_class=1, seed=1)
    assert sorted(labels[one].tolist()) == [0, 1, 2]
    assert -1 not in labels[labeled_subset(labels, per_class=3)].tolist()
    assert len(labeled_subset(labels, fraction=0.01)) == 3  # at least one per class


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"fraction": 0.0}, "(0, 1]"),
        ({"fraction": 1.5}, "(0, 1]"),
        ({"fraction": -0.1}, "(0, 1]"),
        ({"fraction": float("nan")}, "(0, 1]"),
        ({"fraction": "half"}, "(0, 1]"),
        ({"per_class": 0}, "per_class"),
        ({"per_class": 2.5}, "per_class"),
        ({}, "exactly one"),
        ({"fraction": 0.5, "per_class": 2}, "exactly one"),
        ({"per_class": 4}, "class 1 has only 3"),
    ],
)
def test_subset_errors(kwargs, fragment):
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    with pytest.raises(ConfigError) as e:
        labeled_subset(labels, **kwargs)
    _err_line(e, fragment)


def test_split_labeled_class_without_images():
    ds = _toy([0, 0, 1, 1], classes=["a", "b", "ghost"])
    with pytest.raises(ConfigError) as e:
        split_labeled(ds, fraction=0.5)
    _err_line(e, "ghost", "zero")
    with pytest.raises(ConfigError):
        labeled_subset(np.array([-1, -1]), fraction=0.5)


def test_split_labeled_full_and_lazy(tmp_path):
    ds = _toy(np.arange(12) % 3)
    lab, pool = split_labeled(ds, fraction=1.0)
    assert len(lab) == 12 and len(pool) == 0
    for cls in ("cat", "dog"):
        for i in range(3):
            p = tmp_path / "train" / cls / f"{cls}_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), (i, 0, 0)).save(p)
    folder = load_dataset("imagefolder", data_dir=tmp_path, image_size=4)
    lab, pool = split_labeled(folder, per_class=1, seed=0)
    assert isinstance(lab, SubsetDataset) and len(lab) == 2 and len(pool) == 4
    assert sorted(lab.labels.tolist()) == [0, 1] and pool.labels.tolist() == [-1] * 4
    x, y = pool.get_batch([0, 3])
    assert x.shape == (2, 3, 6, 6) and x.sizes.tolist() == [[6, 6]] * 2 and y.tolist() == [-1, -1]  # whole images


def test_subset_file_round_trip(tmp_path, fashion):
    lab, _ = split_labeled(fashion, fraction=0.01, seed=0)
    path = tmp_path / "sub" / "fmnist_1pct.txt"
    write_subset_file(path, lab.ids)
    assert path.read_text().splitlines() == lab.ids
    assert [p.name for p in path.parent.iterdir()] == ["fmnist_1pct.txt"]  # no temporary left behind
    idx = read_subset_file(path, fashion)
    np.testing.assert_array_equal(idx, labeled_subset(fashion.labels, fraction=0.01, seed=0))
    lab2, pool2 = split_labeled(fashion, subset_file=path)
    assert lab2.ids == lab.ids and len(pool2) == 59400
    write_subset_file(path, lab.ids[:3])  # overwrite atomically
    assert len(read_subset_file(path, fashion)) == 3
    with pytest.raises(ValueError):
        write_subset_file(path, ["two\nlines"])


def test_read_subset_file_matching_and_errors(tmp_path):
    ids = ["train/n01/n01_1.JPEG", "train/n01/n01_2.JPEG", "train/n02/n02_1.JPEG", "train/x/dup.png", "train/y/dup.png"]
    ds = TensorImageDataset(torch.zeros(5, 1, 1, 1, dtype=torch.uint8), [0, 0, 1, 2, 3], list("abcd"), "tiny", "train", ids)
    f = tmp_path / "s.txt"
    f.write_text("  n02_1.JPEG \n\ntrain/n01/n01_1.JPEG\nx/dup.png\n")  # basename, exact, trailing path
    assert read_subset_file(f, ds).tolist() == [0, 2, 3]

    def fails(text, *fragments):
        f.write_text(text)
        with pytest.raises(DataError) as e:
            read_subset_file(f, ds)
        _err_line(e, str(f), *fragments)

    fails("n01_1.JPEG\nnope_1.JPEG\nnope_2.JPEG\n", "2 of 3", "nope_1.JPEG", "nope_2.JPEG")
    fails("../etc/passwd\n", "'..'")
    fails("train/../n01_1.JPEG\n", "'..'")
    fails("/abs/n01_1.JPEG\n", "absolute")
    fails("n01_1.JPEG\nn01_1.JPEG\n", "duplicates")
    fails("n01_1.JPEG\ntrain/n01/n01_1.JPEG\n", "more than once")
    fails("dup.png\n", "matches 2")
    fails("\n  \n", "no images")
    with pytest.raises(DataError) as e:
        read_subset_file(tmp_path / "missing.txt", ds)
    _err_line(e, "missing.txt", "not found")
    f.write_text("a..b.JPEG\n")  # '..' inside a name is not a path escape: just unmatched
    with pytest.raises(DataError) as e:
        read_subset_file(f, ds)
    _err_line(e, "match no image")


def test_official_imagenet_1percent_file():
    with open(OFFICIAL_1PCT) as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    assert len(lines) == 12811
    ids = [f"train/{ln.split('_')[0]}/{ln}" for ln in lines]
    n = len(ids)
    ds = TensorImageDataset(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), np.zeros(n, dtype=np.int64), ["x"], "imagenet", "train", ids)
    idx = read_subset_file(OFFICIAL_1PCT, ds)
    assert idx.tolist() == list(range(n))
    # against a bigger pool where the subset is a strict part
    extra = [f"train/n99999999/n99999999_{i}.JPEG" for i in range(1000)]
    ds2 = TensorImageDataset(
        torch.zeros(n + 1000, 1, 1, 1, dtype=torch.uint8), np.zeros(n + 1000, dtype=np.int64), ["x"], "imagenet", "train", extra + ids
    )
    assert read_subset_file(OFFICIAL_1PCT, ds2).tolist() == list(range(1000, 1000 + n))
