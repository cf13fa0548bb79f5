"""Data sources: each format written in its exact on-disk layout, read back through load_dataset."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.data import (
    DATASETS,
    ConcatImageDataset,
    ImageFolderDataset,
    MemmapImageDataset,
    SubsetDataset,
    TensorImageDataset,
    concat,
    dataset_info,
    hide_labels,
    load_dataset,
    subset,
)
from simclrv2.data.batch import ImageBatch, collate_images
from simclrv2.data.image_check import unreadable_images
from simclrv2.errors import ConfigError, DataError, UserError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert isinstance(excinfo.value, UserError)
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ----------------------------------------------------------------------------- registry


def test_registry_and_unknown_name():
    assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder", "digits"}
    info = dataset_info("fashion-mnist")
    assert (info.image_size, info.channels, info.num_classes) == (28, 1, 10)
    assert info.default_data_dir == FASHION_DIR
    assert dataset_info("imagefolder").num_classes is None
    assert dataset_info("CIFAR-10").name == "cifar10"
    with pytest.raises(ConfigError) as e:
        dataset_info("mnist-ish")
    _one_line_error(e, "mnist-ish", "fashion-mnist", "cifar10", "imagefolder")
    with pytest.raises(ConfigError) as e:
        load_dataset("cifar10")  # no default data dir
    _one_line_error(e, "cifar10", "data_dir")
    with pytest.raises(ConfigError):
        load_dataset("digits", split="validation")


# ----------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, arr: np.ndarray, compress=True):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def _write_fashion(root, n_train=20, n_test=10, compress=True):
    rng = np.random.default_rng(1)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", x, compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", y, compress)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_format(tmp_path, compress):
    data = _write_fashion(tmp_path, compress=compress)
    ds = load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    assert isinstance(ds, TensorImageDataset) and ds.in_memory
    assert ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), data["train"][0])
    np.testing.assert_array_equal(ds.labels, data["train"][1])
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10
    assert ds.ids[3] == "train_00003" and len(set(ds.ids)) == len(ds)
    assert (ds.channels, ds.image_size, ds.name, ds.split) == (1, 28, "fashion-mnist", "train")
    img, label = ds[4]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and label == 4 and isinstance(label, int)
    xb, yb = ds.get_batch(np.array([3, 0, 7]))
    assert xb.shape == (3, 1, 28, 28) and yb.dtype == torch.int64 and yb.tolist() == [3, 0, 7]
    assert torch.equal(xb[1], ds.images[0])
    te = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert len(te) == 10 and te.ids[0] == "test_00000" and te.classes == ds.classes
    up = load_dataset("fashion-mnist", "train", data_dir=tmp_path, image_size=32)
    assert up.images.shape == (20, 1, 32, 32) and up.image_size == 32


def test_fashion_mnist_bad_files(tmp_path):
    _write_fashion(tmp_path)
    # wrong magic number in the image file
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2049, 1, 28, 28) + bytes(784))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    _one_line_error(e, "train-images-idx3-ubyte.gz", "magic")
    # truncated data
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 20, 28, 28) + bytes(784 * 3))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    _one_line_error(e, "train-images-idx3-ubyte.gz")
    # not gzip at all
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    _one_line_error(e, "t10k-images-idx3-ubyte.gz")
    # missing files / dir
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    _one_line_error(e, "t10k-images-idx3-ubyte")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path / "nope")
    _one_line_error(e, "nope", "not found")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "unlabeled", data_dir=tmp_path)
    _one_line_error(e, "fashion-mnist", "no unlabeled split")


def test_real_fashion_mnist():
    # scripts/setup.sh installs the Debian package; without it load_dataset's own error names the directory
    tr = load_dataset("fashion-mnist")  # default data dir
    te = load_dataset("fashion-mnist", "test")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == np.int64
    assert np.bincount(tr.labels).tolist() == [6000] * 10
    assert np.bincount(te.labels).tolist() == [1000] * 10
    assert tr.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the official first training labels
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0


# ----------------------------------------------------------------------------- CIFAR


def _write_cifar10(root, n_per_batch=4, protocol=2):
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, f, protocol)
    batches = {}
    for fn in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n_per_batch).tolist()
        d = {b"batch_label": fn.encode(), b"labels": y, b"data": x, b"filenames": [b"f%d.png" % i for i in range(n_per_batch)]}
        with open(root / fn, "wb") as f:
            pickle.dump(d, f, protocol)
        batches[fn] = (x, y)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches(tmp_path, protocol):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the batch folder itself
        ds = load_dataset("cifar10", "train", data_dir=data_dir)
        assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
        x1, y1 = batches["data_batch_1"]
        x5, y5 = batches["data_batch_5"]
        # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
        np.testing.assert_array_equal(ds.images[0].numpy(), x1[0].reshape(3, 32, 32))
        assert int(ds.images[0, 1, 2, 5]) == int(x1[0][1024 + 2 * 32 + 5])
        np.testing.assert_array_equal(ds.images[-1].numpy(), x5[-1].reshape(3, 32, 32))
        assert ds.labels[:4].tolist() == y1 and ds.labels[-4:].tolist() == y5
        assert ds.classes[1] == "automobile" and len(ds.classes) == 10
    te = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(te) == 4 and te.labels.tolist() == batches["test_batch"][1] and te.split == "test"


def test_cifar100_and_errors(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    fine = [f"class{i:02d}".encode() for i in range(100)]
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": fine, b"coarse_label_names": [b"c%d" % i for i in range(20)]}, f, 2)
    rng = np.random.default_rng(3)
    for split, n in (("train", 6), ("test", 3)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        d = {b"data": x, b"fine_labels": [99, 0, 5, 7, 8, 9][:n], b"coarse_labels": [0] * n, b"filenames": [b"x"] * n}
        with open(root / split, "wb") as f:
            pickle.dump(d, f, 2)
    ds = load_dataset("cifar100", "train", data_dir=tmp_path)
    assert ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == [99, 0, 5, 7, 8, 9]
    assert ds.classes[99] == "class99" and len(ds.classes) == 100
    assert len(load_dataset("cifar100", "test", data_dir=root)) == 3
    # a corrupt batch and a pickle carrying arbitrary objects are refused with a one-line DataError
    (root / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", "test", data_dir=root)
    _one_line_error(e, str(root / "test"))
    with open(root / "test", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f)  # a global outside the allowed set
    with pytest.raises(DataError):
        load_dataset("cifar100", "test", data_dir=root)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    _one_line_error(e, "batches.meta")


# ----------------------------------------------------------------------------- STL-10


def _pattern(n, side=96):
    c, h, w = np.meshgrid(np.arange(3), np.arange(side), np.arange(side), indexing="ij")
    base = (c * 60 + h * 3 + w * 7) % 256  # asymmetric in h/w: a transpose error is visible
    return np.stack([(base + 11 * i) % 256 for i in range(n)]).astype(np.uint8)  # [N, C, H, W]


def _write_stl(root, n_train=3, n_test=2, n_unlab=5):
    root.mkdir(parents=True)
    imgs = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlab)):
        x = _pattern(n)
        # official layout: each channel stored column-major
        (root / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        imgs[split] = x
    (root / "train_y.bin").write_bytes(bytes([1, 10, 4][:n_train]))
    (root / "test_y.bin").write_bytes(bytes([2, 3][:n_test]))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    return imgs


def test_stl10_binary(tmp_path):
    imgs = _write_stl(tmp_path / "stl10_binary")
    tr = load_dataset("stl10", "train", data_dir=tmp_path)
    assert isinstance(tr, TensorImageDataset)
    assert tr.images.shape == (3, 3, 96, 96) and tr.images.dtype == torch.uint8
    np.testing.assert_array_equal(tr.images.numpy(), imgs["train"])
    assert int(tr.images[0, 0, 1, 0]) == 3 and int(tr.images[0, 0, 0, 1]) == 7  # row step 3, column step 7
    assert tr.labels.tolist() == [0, 9, 3]
    assert tr.classes[7] == "monkey"
    te = load_dataset("stl10", "test", data_dir=tmp_path / "stl10_binary")
    assert te.labels.tolist() == [1, 2]
    small = load_dataset("stl10", "train", data_dir=tmp_path, image_size=32)
    assert small.images.shape == (3, 3, 32, 32)


def test_stl10_unlabeled_is_memory_mapped(tmp_path):
    imgs = _write_stl(tmp_path / "stl10_binary")
    un = load_dataset("stl10", "unlabeled", data_dir=tmp_path)
    assert isinstance(un, MemmapImageDataset) and not un.in_memory
    assert len(un) == 5 and un.labels.tolist() == [-1] * 5 and un.split == "unlabeled"
    img, label = un[2]
    assert label == -1 and img.shape == (3, 96, 96)
    np.testing.assert_array_equal(img.numpy(), imgs["unlabeled"][2])
    assert isinstance(un._mm, np.memmap)
    xb, yb = un.get_batch([4, 0])
    np.testing.assert_array_equal(xb.numpy(), imgs["unlabeled"][[4, 0]])
    assert yb.tolist() == [-1, -1]
    clone = pickle.loads(pickle.dumps(un))  # DataLoader workers re-open the map
    assert clone._mm is None and torch.equal(clone[1][0], un[1][0])
    # a file whose size is not a multiple of one image is refused
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").write_bytes(bytes(1000))
    with pytest.raises(DataError) as e:
        load_dataset("stl10", "unlabeled", data_dir=tmp_path)
    _one_line_error(e, "unlabeled_X.bin")


# ----------------------------------------------------------------------------- digits


def test_digits():
    tr = load_dataset("digits")
    te = load_dataset("digits", "test")
    assert len(tr) == 1437 and len(te) == 360
    assert tr.images.shape == (1437, 1, 16, 16) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and sorted(set(tr.labels.tolist())) == list(range(10))
    assert not set(tr.ids) & set(te.ids)
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    test_idx = np.sort(perm[1437:])
    np.testing.assert_array_equal(te.labels, d.target[test_idx])
    native = load_dataset("digits", "test", image_size=8)
    np.testing.assert_array_equal(native.images[:, 0].numpy(), np.rint(d.images[test_idx] * 255 / 16).astype(np.uint8))
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, te.images)


# ----------------------------------------------------------------------------- image folders


def _save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _make_folder(root):
    """A small image folder with every mode and container the reader must handle."""
    red_blue = np.zeros((20, 40, 3), np.uint8)
    red_blue[:, :20] = (255, 0, 0)
    red_blue[:, 20:] = (0, 0, 255)
    _save(root / "train/cat/a_rgb.png", Image.fromarray(red_blue))
    _save(root / "train/cat/b.jpg", Image.new("RGB", (50, 50), (0, 200, 0)), quality=95)
    _save(root / "train/cat/c_rgba.png", Image.new("RGBA", (17, 23), (10, 20, 30, 128)))
    _save(root / "train/cat/deeper/d.webp", Image.new("RGB", (30, 30), (90, 90, 90)))
    p = Image.new("P", (33, 21))
    p.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    p.paste(1, (0, 0, 33, 21))
    _save(root / "train/dog/e_pal.gif", p)
    _save(root / "train/dog/f_gray.bmp", Image.new("L", (16, 16), 77))
    _save(root / "train/dog/g_16bit.PNG", Image.fromarray(np.full((24, 18), 40000, np.uint16)))
    _save(root / "train/dog/h.TIFF", Image.new("CMYK", (20, 20), (0, 0, 0, 0)))
    _save(root / "train/dog/i_int.tif", Image.fromarray(np.full((19, 19), 65535, np.int32)))
    (root / "train/dog/notes.txt").write_text("not an image")
    (root / "train/dog/.hidden.png").write_bytes(b"")
    _save(root / "val/cat/v1.jpeg", Image.new("RGB", (64, 48), (255, 255, 255)))
    _save(root / "val/dog/v2.png", Image.new("LA", (12, 40), (200, 255)))
    _save(root / "unlabeled/u1.png", Image.new("RGB", (20, 20), (1, 2, 3)))
    _save(root / "unlabeled/sub/u2.jpg", Image.new("RGB", (20, 20), (4, 5, 6)))


def test_imagefolder_reads_all_modes(tmp_path):
    _make_folder(tmp_path)
    ds = load_dataset("imagefolder", "train", data_dir=tmp_path, image_size=16)
    assert isinstance(ds, ImageFolderDataset) and not ds.in_memory
    assert ds.classes == ["cat", "dog"] and ds.channels == 3 and ds.image_size == 16
    assert ds.ids == [
        "train/cat/a_rgb.png", "train/cat/b.jpg", "train/cat/c_rgba.png", "train/cat/deeper/d.webp",
        "train/dog/e_pal.gif", "train/dog/f_gray.bmp", "train/dog/g_16bit.PNG", "train/dog/h.TIFF",
        "train/dog/i_int.tif",
    ]  # fmt: skip
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1] and ds.labels.dtype == np.int64
    pix = {}
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dim() == 3 and img.shape[0] == 3 and img.dtype == torch.uint8 and label == ds.labels[i]
        pix[ds.ids[i].rsplit("/", 1)[1]] = img
    # whole images, aspect ratio kept, shorter side reduced to at most 2 x 16 = 32 px (never enlarged)
    sizes = {k: tuple(v.shape[1:]) for k, v in pix.items()}
    assert sizes == {"a_rgb.png": (20, 40), "b.jpg": (32, 32), "c_rgba.png": (23, 17), "d.webp": (30, 30),
                     "e_pal.gif": (21, 33), "f_gray.bmp": (16, 16), "g_16bit.PNG": (24, 18), "h.TIFF": (20, 20),
                     "i_int.tif": (19, 19)}
    # 40x20 red|blue, whole: left half red, right half blue, to the border
    assert pix["a_rgb.png"][:, 10, 0].tolist() == [255, 0, 0] and pix["a_rgb.png"][:, 10, 19].tolist() == [255, 0, 0]
    assert pix["a_rgb.png"][:, 10, 20].tolist() == [0, 0, 255] and pix["a_rgb.png"][:, 10, 39].tolist() == [0, 0, 255]
    assert (pix["b.jpg"][1].float().mean() - 200).abs() < 3 and pix["b.jpg"][0].max() < 10
    assert pix["c_rgba.png"][:, 5, 5].tolist() == [10, 20, 30]
    assert pix["e_pal.gif"][:, 3, 3].tolist() == [250, 100, 50]
    assert pix["f_gray.bmp"][:, 0, 0].tolist() == [77, 77, 77]
    assert pix["g_16bit.PNG"][:, 4, 4].tolist() == [156, 156, 156]  # 40000 / 257 (16 bits), not clipped to 255
    assert pix["h.TIFF"][:, 0, 0].tolist() == [255, 255, 255]
    assert pix["i_int.tif"][:, 0, 0].tolist() == [255, 255, 255]
    xb, yb = ds.get_batch([6, 0])
    assert isinstance(xb, ImageBatch) and xb.shape == (2, 3, 24, 40) and yb.tolist() == [1, 0]
    assert xb.sizes.tolist() == [[24, 18], [20, 40]]
    assert torch.equal(xb.image(0), pix["g_16bit.PNG"]) and torch.equal(xb.image(1), pix["a_rgb.png"])
    ds.configure(bit_depth=16, channels=1)  # the same 16-bit image, gray, and read as 12-bit
    assert ds[6][0].shape == (1, 24, 18) and ds[6][0][0, 4, 4] == 156 and ds[0][0].shape == (1, 20, 40)
    ds.configure(bit_depth=12)
    assert ds[6][0][0, 4, 4] == 255  # 40000 > 4095: clipped

    te = load_dataset("imagefolder", "test", data_dir=tmp_path, image_size=16)
    assert te.ids == ["val/cat/v1.jpeg", "val/dog/v2.png"] and te.labels.tolist() == [0, 1] and te.classes == ds.classes
    assert te[1][0][:, 8, 8].tolist() == [200, 200, 200] and te[0][0].shape == (3, 32, 43)  # 64x48 -> 43x32
    un = load_dataset("imagefolder", "unlabeled", data_dir=tmp_path, image_size=16)
    assert un.ids == ["unlabeled/sub/u2.jpg", "unlabeled/u1.png"] and un.labels.tolist() == [-1, -1]
    assert un.classes == ["cat", "dog"]
    assert un[1][0][:, 0, 0].tolist() == [1, 2, 3]
    assert load_dataset("imagefolder", data_dir=tmp_path).image_size == 224  # default side


def test_imagefolder_test_dir_and_dataloader(tmp_path):
    _make_folder(tmp_path)
    os.rename(tmp_path / "val", tmp_path / "test")
    te = load_dataset("imagefolder", "test", data_dir=tmp_path, image_size=8)
    assert te.ids == ["test/cat/v1.jpeg", "test/dog/v2.png"]
    ds = load_dataset("imagefolder", "train", data_dir=tmp_path, image_size=8)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids == ds.ids and torch.equal(clone[3][0], ds[3][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False, collate_fn=collate_images)
    xs, ys = zip(*loader)
    assert [x.image(i).shape for x in xs for i in range(len(x))] == [ds[i][0].shape for i in range(len(ds))]
    assert all(torch.equal(x.image(i), ds[4 * k + i][0]) for k, x in enumerate(xs) for i in range(len(x)))
    assert torch.cat(ys).tolist() == ds.labels.tolist()


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", data_dir=tmp_path / "missing")
    _one_line_error(e, "missing")
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", data_dir=tmp_path / "root")
    _one_line_error(e, "train")

    root = tmp_path / "f"
    _save(root / "train/cat/a.png", Image.new("RGB", (8, 8)))
    (root / "train/empty_class").mkdir()
    (root / "train/empty_class/readme.txt").write_text("x")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", data_dir=root)
    _one_line_error(e, "empty_class", "no images")
    (root / "train/empty_class/readme.txt").unlink()
    (root / "train/empty_class").rmdir()

    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", "test", data_dir=root)
    _one_line_error(e, "val")
    (root / "val").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", "test", data_dir=root)
    _one_line_error(e, "test split", "empty")
    _save(root / "val/zebra/z.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", "test", data_dir=root)
    _one_line_error(e, "zebra")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", "unlabeled", data_dir=root)
    _one_line_error(e, "unlabeled")


def test_imagefolder_bad_image(tmp_path):
    root = tmp_path / "f"
    _save(root / "train/cat/good.png", Image.new("RGB", (8, 8), (5, 5, 5)))
    _save(root / "train/cat/trunc.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    data = (root / "train/cat/trunc.jpg").read_bytes()
    (root / "train/cat/trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "train/cat/junk.png").write_bytes(b"\x89PNG not really")
    ds = load_dataset("imagefolder", data_dir=root, image_size=8)
    assert len(ds) == 3  # checked lazily
    with pytest.raises(DataError) as e:
        ds[ds.ids.index("train/cat/trunc.jpg")]
    _one_line_error(e, "trunc.jpg")
    bad, _ = unreadable_images(ds, workers=0)  # the up-front check of the stages (data/image_check.py)
    assert [name for name, _ in bad] == ["train/cat/junk.png", "train/cat/trunc.jpg"]
    assert all("\n" not in message and name in message for name, message in bad)


# ----------------------------------------------------------------------------- views


def _tensor_ds(n=10, split="train"):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorImageDataset(images, np.arange(n) % 3, ["a", "b", "c"], "toy", split)


def test_subset_hide_concat_in_memory():
    ds = _tensor_ds()
    s = subset(ds, [7, 2, 5])
    assert isinstance(s, TensorImageDataset) and s.in_memory
    assert s.ids == ["train_00007", "train_00002", "train_00005"] and s.labels.tolist() == [1, 2, 2]
    x, y = s.get_batch([2, 0])
    assert x[:, 0, 0, 0].tolist() == [5, 7] and y.tolist() == [2, 1]
    h = hide_labels(s)
    assert h.labels.tolist() == [-1, -1, -1] and h.ids == s.ids and h.images.data_ptr() == s.images.data_ptr()
    assert s.labels.tolist() == [1, 2, 2]  # the original keeps its labels
    c = concat([s, _tensor_ds(4, "test")])
    assert isinstance(c, TensorImageDataset) and len(c) == 7 and c.split == "train+test"
    assert c.ids[3] == "test_00000" and c.get_batch([6])[0][0, 0, 0, 0] == 3
    empty = subset(ds, [])
    assert len(empty) == 0 and empty.get_batch([])[0].shape[0] == 0
    with pytest.raises(DataError):
        concat([ds, TensorImageDataset(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0], ["a", "b", "c"])])


def test_views_of_lazy_datasets(tmp_path):
    _make_folder(tmp_path)
    ds = load_dataset("imagefolder", data_dir=tmp_path, image_size=8)
    s = subset(ds, [6, 1])
    assert isinstance(s, SubsetDataset) and not s.in_memory
    assert s.ids == [ds.ids[6], ds.ids[1]] and s.labels.tolist() == [1, 0]
    assert torch.equal(s[0][0], ds[6][0])
    ss = subset(s, [1])
    assert ss.ids == [ds.ids[1]] and isinstance(ss, SubsetDataset) and ss.base is ds
    h = hide_labels(s)
    assert h.labels.tolist() == [-1, -1] and h[1][1] == -1 and torch.equal(h[1][0], ds[1][0])
    un = load_dataset("imagefolder", "unlabeled", data_dir=tmp_path, image_size=8)
    mem = TensorImageDataset(torch.full((2, 3, 8, 8), 9, dtype=torch.uint8), [0, 1], ["cat", "dog"], "mem")
    c = concat([h, un, mem])
    assert isinstance(c, ConcatImageDataset) and len(c) == 6 and not c.in_memory
    x, y = c.get_batch([5, 0, 3])
    assert isinstance(x, ImageBatch) and len(x) == 3 and y.tolist() == [1, -1, -1]
    assert torch.equal(x.image(0), mem.images[1]) and torch.equal(x.image(1), ds[6][0])
    assert torch.equal(x.image(2), un[1][0])
    assert c.ids[2] == "unlabeled/sub/u2.jpg"
    with pytest.raises(DataError):
        concat([ds, load_dataset("imagefolder", data_dir=tmp_path, image_size=16)])
