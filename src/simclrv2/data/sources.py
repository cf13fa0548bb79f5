"""Image data sources: readers for the standard on-disk formats, plus dataset views.

Every dataset yields images as ``uint8`` tensors ``[C, H, W]`` and labels as ``int64``
(``-1`` where the label is unknown, i.e. the unlabeled split).  Two kinds exist:

* in-memory (:class:`TensorImageDataset`, ``in_memory = True``): the whole split is one
  ``uint8`` tensor ``images [N, C, H, W]``; the training loop reads it with the fast,
  vectorised :meth:`ImageDataset.get_batch`.
* lazy (:class:`ImageFolderDataset`, :class:`MemmapImageDataset`, ``in_memory = False``):
  images are decoded / read on access; read them through a ``torch.utils.data.DataLoader``
  with worker processes (the datasets are picklable and hold no open file handles).

Image folders (``variable_size = True``) keep each image whole, its aspect ratio kept (decoded to a
bounded size, :func:`read_image`), so their images differ in size and their batches are
:class:`~simclrv2.data.batch.ImageBatch` es (padded, with each image's size); a small folder can be
decoded once and kept in memory (:meth:`ImageFolderDataset.load_into_memory`).

Sources: ``fashion-mnist`` (gzipped or raw IDX files), ``cifar10`` / ``cifar100`` (the
official python pickle batches), ``stl10`` (the official binary files; the 100k unlabeled
split is memory-mapped), ``imagefolder`` (ROOT/train/CLASS/*, ROOT/val/CLASS/*,
ROOT/unlabeled/**, or separate folders: :mod:`simclrv2.data.folders`) and ``digits``
(scikit-learn's bundled 8x8 digits, upsampled).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from simclrv2.data.batch import ImageBatch
from simclrv2.errors import ConfigError, DataError

__all__ = [
    "ImageDataset",
    "TensorImageDataset",
    "ImageFolderDataset",
    "ImageBatch",
    "MemmapImageDataset",
    "SubsetDataset",
    "ConcatImageDataset",
    "DatasetInfo",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "dataset_info",
    "load_dataset",
    "read_image",
    "subset",
    "hide_labels",
    "concat",
]

SPLITS = ("train", "test", "unlabeled")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _one_line(err: object) -> str:
    """An exception's text squeezed onto one line (user-facing messages are one line)."""
    return " ".join(str(err).split()) or type(err).__name__


def _as_index_array(indices, n: int) -> np.ndarray:
    """Indices (list / numpy / tensor / range) -> int64 numpy array in [0, n); IndexError otherwise."""
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().cpu().numpy()
    else:
        idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if idx.min() < -n or idx.max() >= n:
        raise IndexError(f"index out of range for a dataset of {n} images")
    return np.where(idx < 0, idx + n, idx)


# ----------------------------------------------------------------------------- base classes


class ImageDataset(torch.utils.data.Dataset):
    """Base: images as uint8 CHW tensors, labels int64 (-1 = unknown)."""

    name: str = ""
    split: str = "train"
    classes: list[str]
    labels: np.ndarray
    ids: list[str]
    channels: int = 3
    image_size: int | None = None
    in_memory: bool = False
    variable_size: bool = False  # images of different sizes (image folders): batches are ImageBatch es

    def __len__(self) -> int:
        return int(len(self.labels))

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_batch(self, indices) -> tuple[torch.Tensor | ImageBatch, torch.Tensor]:
        """uint8 [B, C, H, W] images (an :class:`ImageBatch` for ``variable_size`` datasets) and
        int64 [B] labels for ``indices``."""
        idx = _as_index_array(indices, len(self))
        if idx.size == 0:
            return self._empty_batch(), torch.zeros(0, dtype=torch.int64)
        images = [self[int(i)][0] for i in idx]
        batch = ImageBatch.from_images(images) if self.variable_size else torch.stack(images)
        return batch, torch.from_numpy(self.labels[idx].astype(np.int64))

    def _empty_batch(self) -> torch.Tensor | ImageBatch:
        if self.variable_size:
            return ImageBatch.from_images([], self.channels)
        s = self.image_size or 0
        return torch.zeros((0, self.channels, s, s), dtype=torch.uint8)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        size = f"{self.image_size}x{self.image_size}" if self.image_size else "?"
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, shape={self.channels}x{size}, in_memory={self.in_memory})"
        )


class TensorImageDataset(ImageDataset):
    """In-memory dataset: ``images`` is a uint8 tensor [N, C, H, W]."""

    in_memory = True

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: np.ndarray | Sequence[int] | torch.Tensor,
        classes: Sequence[str],
        name: str = "tensor",
        split: str = "train",
        ids: Sequence[str] | None = None,
    ):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.ids = list(ids) if ids is not None else [f"{split}_{i:05d}" for i in range(len(labels))]
        if len(self.ids) != len(labels):
            raise ValueError(f"{len(labels)} images but {len(self.ids)} ids")
        self.channels = int(images.shape[1])
        h, w = int(images.shape[2]), int(images.shape[3])
        self.image_size = h if h == w else None

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_index_array(indices, len(self))
        images = self.images.index_select(0, torch.from_numpy(idx))
        return images, torch.from_numpy(self.labels[idx])


# ----------------------------------------------------------------------------- helpers


def _resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize of uint8 [N, C, H, W] to [N, C, size, size] (antialiased when shrinking)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    shrink = size < min(h, w)
    for s in range(0, n, chunk):
        x = images[s : s + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _check_image_size(image_size, name: str) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"image_size for dataset '{name}' must be a positive integer, got {image_size!r}")
    return int(image_size)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    default_data_dir: str | None  # None: the data directory must be given (digits needs none)
    image_size: int  # default square side of the images it yields
    channels: int
    num_classes: int | None  # None for imagefolder (read from the folder names)
    splits: tuple[str, ...]


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", FASHION_MNIST_DIR, 28, 1, 10, ("train", "test")),
    "cifar10": DatasetInfo("cifar10", None, 32, 3, 10, ("train", "test")),
    "cifar100": DatasetInfo("cifar100", None, 32, 3, 100, ("train", "test")),
    "stl10": DatasetInfo("stl10", None, 96, 3, 10, ("train", "test", "unlabeled")),
    "imagefolder": DatasetInfo("imagefolder", None, 224, 3, None, ("train", "test", "unlabeled")),
    "digits": DatasetInfo("digits", None, 16, 1, 10, ("train", "test")),
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "stl-10": "stl10",
    "image-folder": "imagefolder",
    "image_folder": "imagefolder",
}


def dataset_info(name: str) -> DatasetInfo:
    """Registry entry for ``name``; ConfigError listing the valid names otherwise."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}': expected one of {', '.join(DATASETS)}")
    return DATASETS[key]


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> ImageDataset:
    """Load one split of a dataset.

    ``data_dir`` is where the files are (defaults exist only for fashion-mnist; digits is
    bundled with scikit-learn and ignores it). ``image_size`` resizes fixed-size datasets
    (bilinear) and sets the output side of imagefolder (default 224) and digits (default 16).
    """
    info = dataset_info(name)
    split = str(split).strip().lower()
    if split == "val":
        split = "test"
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' for dataset '{info.name}': expected one of {', '.join(SPLITS)}")
    if split not in info.splits:
        raise DataError(
            f"dataset '{info.name}' has no {split} split (available: {', '.join(info.splits)})"
        )
    image_size = _check_image_size(image_size, info.name)
    if info.name == "digits":
        return _load_digits(split, image_size or info.image_size)
    if data_dir is None:
        data_dir = info.default_data_dir
    if data_dir is None:
        raise ConfigError(f"dataset '{info.name}' needs a data directory (data_dir) containing its files")
    data_dir = os.fspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory for dataset '{info.name}' not found: {data_dir}")
    if info.name == "fashion-mnist":
        ds: ImageDataset = _load_fashion_mnist(data_dir, split)
    elif info.name in ("cifar10", "cifar100"):
        ds = _load_cifar(info.name, data_dir, split)
    elif info.name == "stl10":
        return _load_stl10(data_dir, split, image_size)
    else:
        return ImageFolderDataset(data_dir, split, image_size or info.image_size)
    if image_size is not None and image_size != ds.image_size:
        ds.images = _resize_images(ds.images, image_size)
        ds.image_size = image_size
    return ds


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _find_file(data_dir: str, base: str) -> str:
    """``base`` (e.g. 'train-images-idx3-ubyte') as .gz or raw, also the 'train-images.idx3-ubyte' spelling."""
    names = [base, base.replace("-idx", ".idx")]
    for n in names:
        for cand in (n + ".gz", n):
            p = os.path.join(data_dir, cand)
            if os.path.isfile(p):
                return p
    raise DataError(f"missing file in {data_dir}: expected {base}.gz (or uncompressed {base})")


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
    """Parse an IDX file (unsigned-byte data) with numpy."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {_one_line(e)}") from None
    if len(raw) < 4:
        raise DataError(f"bad IDX file {path}: too short ({len(raw)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        magic = int.from_bytes(raw[0:4], "big")
        want = 0x00000800 + expected_ndim
        raise DataError(f"bad IDX file {path}: magic number 0x{magic:08x}, expected 0x{want:08x} (unsigned bytes, {expected_ndim}-d)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"bad IDX file {path}: truncated header")
    dims = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DataError(f"bad IDX file {path}: header says {dims} = {count} bytes of data, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _load_fashion_mnist(data_dir: str, split: str) -> TensorImageDataset:
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_file(data_dir, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_file(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{img_path} contains no images")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"bad labels in {lab_path}: values must be 0..9, found {int(labels.max())}")
    # np.frombuffer over immutable bytes is read-only: copy once into a writable tensor.
    imgs = torch.from_numpy(images.copy()).unsqueeze(1)
    return TensorImageDataset(imgs, labels.astype(np.int64), FASHION_MNIST_CLASSES, "fashion-mnist", split)


# ----------------------------------------------------------------------------- CIFAR (python pickles)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR batches: only dicts/lists/bytes/numpy arrays are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")


def _read_cifar_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"missing CIFAR batch file: {path}")
    try:
        with open(path, "rb") as f:
            # The official CIFAR batches are Python-2 pickles with byte-string keys
            # (b'data', b'labels', ...): encoding="bytes" is how the dataset authors load them.
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"cannot read CIFAR batch file {path}: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"bad CIFAR batch file {path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_dir(data_dir: str, folder: str, marker: str) -> str:
    if os.path.isfile(os.path.join(data_dir, marker)):
        return data_dir
    sub = os.path.join(data_dir, folder)
    if os.path.isfile(os.path.join(sub, marker)):
        return sub
    raise DataError(f"no CIFAR data in {data_dir}: expected {marker} there or in {folder}/")


def _load_cifar(name: str, data_dir: str, split: str) -> TensorImageDataset:
    if name == "cifar10":
        root = _cifar_dir(data_dir, "cifar-10-batches-py", "batches.meta")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, names_key, label_key, n_classes = "batches.meta", "label_names", "labels", 10
    else:
        root = _cifar_dir(data_dir, "cifar-100-python", "meta")
        files = ["train"] if split == "train" else ["test"]
        meta_file, names_key, label_key, n_classes = "meta", "fine_label_names", "fine_labels", 100
    meta_path = os.path.join(root, meta_file)
    meta = _read_cifar_pickle(meta_path)
    if names_key not in meta:
        raise DataError(f"bad CIFAR meta file {meta_path}: no '{names_key}' entry")
    classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    if len(classes) != n_classes:
        raise DataError(f"bad CIFAR meta file {meta_path}: {len(classes)} class names, expected {n_classes}")
    all_x, all_y = [], []
    for fn in files:
        path = os.path.join(root, fn)
        batch = _read_cifar_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"bad CIFAR batch file {path}: expected 'data' and '{label_key}' entries")
        x = np.asarray(batch["data"])
        y = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataError(f"bad CIFAR batch file {path}: data must be uint8 [N, 3072], got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise DataError(f"bad CIFAR batch file {path}: {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise DataError(f"bad CIFAR batch file {path}: labels must be 0..{n_classes - 1}")
        all_x.append(x.reshape(-1, 3, 32, 32))
        all_y.append(y)
    images = np.concatenate(all_x) if len(all_x) > 1 else np.ascontiguousarray(all_x[0])
    labels = np.concatenate(all_y)
    if len(labels) == 0:
        raise DataError(f"CIFAR {split} split in {root} contains no images")
    return TensorImageDataset(torch.from_numpy(images), labels, classes, name, split)


# ----------------------------------------------------------------------------- STL-10 (binary)

STL10_SIDE = 96
_STL10_BYTES = 3 * STL10_SIDE * STL10_SIDE
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _stl10_dir(data_dir: str) -> str:
    for d in (data_dir, os.path.join(data_dir, "stl10_binary")):
        if any(os.path.isfile(os.path.join(d, f)) for f in ("train_X.bin", "test_X.bin", "unlabeled_X.bin")):
            return d
    raise DataError(f"no STL-10 data in {data_dir}: expected train_X.bin etc. there or in stl10_binary/")


def _stl10_count(path: str) -> int:
    if not os.path.isfile(path):
        raise DataError(f"missing STL-10 file: {path}")
    size = os.path.getsize(path)
    if size == 0 or size % _STL10_BYTES:
        raise DataError(f"bad STL-10 image file {path}: size {size} is not a positive multiple of 3*96*96 bytes")
    return size // _STL10_BYTES


class MemmapImageDataset(ImageDataset):
    """Lazy STL-10-style binary images (column-major 3xSxS uint8 records), memory-mapped on first use.

    Picklable for DataLoader workers: the memory map is re-opened in each process.
    """

    in_memory = False

    def __init__(
        self,
        path: str,
        count: int,
        classes: Sequence[str],
        name: str,
        split: str,
        side: int = STL10_SIDE,
        channels: int = 3,
        image_size: int | None = None,
        column_major: bool = True,
    ):
        self.path = path
        self.count = int(count)
        self.side = int(side)
        self.channels = int(channels)
        self.column_major = column_major
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.labels = np.full(self.count, -1, dtype=np.int64)
        self.ids = [f"{split}_{i:05d}" for i in range(self.count)]
        self.image_size = int(image_size) if image_size else self.side
        self._mm: np.memmap | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def _map(self) -> np.memmap:
        if self._mm is None:
            try:
                self._mm = np.memmap(
                    self.path, dtype=np.uint8, mode="r", shape=(self.count, self.channels, self.side, self.side)
                )
            except (OSError, ValueError) as e:
                raise DataError(f"cannot memory-map {self.path}: {_one_line(e)}") from None
        return self._mm

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        if self.column_major:  # stored [C, W, H] (Fortran order per channel), as the official reader transposes
            arr = arr.swapaxes(-1, -2)
        x = torch.from_numpy(np.ascontiguousarray(arr))
        if self.image_size != self.side:
            x = _resize_images(x if x.dim() == 4 else x[None], self.image_size)
            if arr.ndim == 3:
                x = x[0]
        return x

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = int(_as_index_array([i], self.count)[0])
        return self._to_tensor(self._map()[i]), int(self.labels[i])

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_index_array(indices, self.count)
        if idx.size == 0:
            return self._empty_batch(), torch.zeros(0, dtype=torch.int64)
        return self._to_tensor(self._map()[idx]), torch.from_numpy(self.labels[idx])


def _load_stl10(data_dir: str, split: str, image_size: int | None) -> ImageDataset:
    root = _stl10_dir(data_dir)
    names_path = os.path.join(root, "class_names.txt")
    if os.path.isfile(names_path):
        with open(names_path, encoding="utf-8") as f:
            classes = [ln.strip() for ln in f if ln.strip()]
        if len(classes) != 10:
            raise DataError(f"bad STL-10 class list {names_path}: {len(classes)} names, expected 10")
    else:
        classes = list(STL10_CLASSES)
    x_path = os.path.join(root, f"{split}_X.bin")
    n = _stl10_count(x_path)
    if split == "unlabeled":  # 100k images (2.7 GB): memory-mapped, never read eagerly
        return MemmapImageDataset(x_path, n, classes, "stl10", split, image_size=image_size)
    y_path = os.path.join(root, f"{split}_y.bin")
    if not os.path.isfile(y_path):
        raise DataError(f"missing STL-10 file: {y_path}")
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n:
        raise DataError(f"{x_path} has {n} images but {y_path} has {len(labels)} labels")
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"bad STL-10 labels in {y_path}: values must be 1..10")
    raw = np.fromfile(x_path, dtype=np.uint8).reshape(n, 3, STL10_SIDE, STL10_SIDE)
    images = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 1, 3, 2)))  # column-major -> [C, H, W]
    if image_size is not None and image_size != STL10_SIDE:
        images = _resize_images(images, image_size)
    return TensorImageDataset(images, labels - 1, classes, "stl10", split)


# ----------------------------------------------------------------------------- digits (scikit-learn)

DIGITS_TRAIN = 1437
DIGITS_SEED = 0


def _load_digits(split: str, image_size: int) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.asarray(d.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    y = np.asarray(d.target, dtype=np.int64)
    perm = np.random.default_rng(DIGITS_SEED).permutation(len(y))
    idx = np.sort(perm[:DIGITS_TRAIN] if split == "train" else perm[DIGITS_TRAIN:])
    imgs = np.clip(np.rint(x[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = _resize_images(torch.from_numpy(imgs).unsqueeze(1), image_size)
    return TensorImageDataset(images, y[idx], [str(i) for i in range(10)], "digits", split)


# ----------------------------------------------------------------------------- image folders


def _is_image(fn: str) -> bool:
    return not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: str) -> list[str]:
    """All image files under ``top`` (recursive, sorted, hidden entries skipped), as absolute paths.

    Symbolic links to folders are followed, each real folder once: a link to ``top`` or a folder
    above it (a loop), or to a folder already read, is skipped with a warning naming it."""
    import logging

    out = []
    seen = set()
    d = os.path.realpath(top)
    while True:  # top and the folders above it: a link to any of them is a loop
        try:
            st = os.stat(d)
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        if os.path.dirname(d) == d:
            break
        d = os.path.dirname(d)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, d)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link
            if (st.st_dev, st.st_ino) in seen:
                logging.getLogger("simclrv2").warning(
                    f"skipping {path}: it links to {os.path.realpath(path)}, a folder already read or one above "
                    "it (a symbolic link loop or a second link to one folder)")
                continue
            seen.add((st.st_dev, st.st_ino))
            keep.append(d)
        dirnames[:] = keep
        out.extend(os.path.join(dirpath, fn) for fn in filenames if _is_image(fn))
    return sorted(out)


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


# single-channel Pillow modes; "I" (32-bit integer) and "I;16*" hold more than 8 bits, "F" floats
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
BIT_DEPTHS = (8, 10, 12, 14, 16)


def _high_bit(mode: str) -> bool:
    return mode == "I" or mode.startswith("I;16")


def bits_for(max_value: int) -> int:
    """The bit depth of integer images whose largest value is ``max_value``: the smallest of 8, 10,
    12, 14, 16 bits that holds it (a 12-bit camera's images, stored as 16-bit PNG/TIFF, give 12)."""
    return next((b for b in BIT_DEPTHS if max_value < 2**b), 16)


def _to_array(img, channels: int = 3, bit_depth: int | None = None) -> np.ndarray:
    """A Pillow image -> uint8 array [H, W, channels].

    Integer images of more than 8 bits (modes I;16*, and I as Pillow opens some 16-bit files) are
    scaled by their bit depth: value * 255 / (2**bit_depth - 1), clipped to 0..255 (``bit_depth``
    None: 16, the container's); floating-point images (F) from [0, 1] (or 0..255 when larger).
    Gray images are repeated to 3 channels, colour ones converted to luma for 1 channel."""
    mode = img.mode
    if _high_bit(mode) or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            finite = a[np.isfinite(a)]
            a = np.nan_to_num(a) * (255.0 if finite.size and finite.max() <= 1.0 else 1.0)
        else:
            a = a / ((2 ** (bit_depth or 16) - 1) / 255.0)  # 16 bits: a / 257
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)[:, :, None]
        return np.repeat(a, 3, axis=2) if channels == 3 else a
    if mode == "P":
        img = img.convert("RGBA")  # palette transparency is resolved via RGBA (avoids Pillow's warning)
    want = "RGB" if channels == 3 else "L"
    if img.mode != want:
        img = img.convert(want)
    a = np.asarray(img)
    return a if channels == 3 else a[:, :, None]


def _open_error(path: str, label: str | None, err: object) -> DataError:
    return DataError(f"cannot decode image {label or path}: {_one_line(err)}")


def read_image(path: str, decode_side: int | None = None, channels: int = 3, bit_depth: int | None = None,
               label: str | None = None) -> torch.Tensor:
    """The whole image as uint8 ``[channels, h, w]``, its aspect ratio kept.

    With ``decode_side``, an image whose shorter side is longer is reduced to that shorter side
    (bilinear, antialiased; JPEGs decode at a reduced scale first, Pillow's draft mode); smaller
    images are returned as they are. ``bit_depth``, ``channels``: see :func:`_to_array`."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if decode_side and img.format == "JPEG":
                img.draft("RGB" if channels == 3 else "L", (decode_side, decode_side))  # DCT-domain, stays >= side
            img.load()  # first frame of animated GIF/WebP/TIFF
            arr = _to_array(img, channels, bit_depth)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on malformed files; all mean unreadable
        raise _open_error(path, label, e) from None
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise DataError(f"cannot decode image {label or path}: empty image")
    if decode_side and min(h, w) > decode_side:
        s = decode_side / min(h, w)
        arr = _resize_array(arr, max(decode_side, round(h * s)), max(decode_side, round(w * s)))
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # arrays viewing Pillow's buffer are read-only
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _resize_array(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] resized with Pillow's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    im = Image.fromarray(arr if arr.shape[2] == 3 else arr[:, :, 0])
    out = np.asarray(im.resize((width, height), Image.Resampling.BILINEAR))
    return out if out.ndim == 3 else out[:, :, None]


def decode_eval_image(path: str, image_size: int, channels: int = 3, bit_depth: int | None = None,
                      label: str | None = None) -> torch.Tensor:
    """The evaluation view of one image file as uint8 ``[channels, S, S]``, with Pillow only.

    This is the preprocessing that ``predict`` / ``embed`` use and that an exported ONNX model's
    metadata and README describe, step by step: decode the whole image (first frame), convert it
    (:func:`_to_array`: ``bit_depth`` scaling of images of more than 8 bits, luma for 1 channel);
    cut the evaluation crop (:func:`~simclrv2.data.augment.eval_crop_box`: the central square of
    87.5% of the shorter side, or the whole image when that side is at most 32 px); resize it to
    S x S with Pillow's bilinear filter unless it has that size already."""
    from simclrv2.data.augment import eval_crop_box

    arr = read_image(path, None, channels, bit_depth, label).permute(1, 2, 0).numpy()
    top, left, bh, bw = eval_crop_box(*arr.shape[:2])
    arr = arr[top : top + bh, left : left + bw]
    if (bh, bw) != (image_size, image_size):
        arr = _resize_array(np.ascontiguousarray(arr), image_size, image_size)
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()  # Pillow's arrays are read-only


def probe_image(path: str, decode_side: int | None = None, decode: bool = True) -> dict:
    """What the image check records of one file: ``{"h", "w"}`` (its full size), ``"gray"`` (one
    channel, or three equal ones), ``"bits"`` (8, or 16 for images of more than 8 bits) and
    ``"max"`` (their largest value; -1 when not decoded). It decodes the image as training does
    (``decode=False``: reads the header only). A DataError names an unreadable file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            mode = img.mode
            info = {"h": int(h), "w": int(w), "gray": mode in _GRAY_MODES, "bits": 16 if _high_bit(mode) else 8,
                    "max": -1}
            if decode:
                if decode_side and img.format == "JPEG":
                    img.draft("L" if mode == "L" else "RGB", (decode_side, decode_side))
                img.load()
                if _high_bit(mode):
                    info["max"] = int(np.asarray(img).max()) if w and h else 0
                elif not info["gray"]:
                    a = _to_array(img)
                    info["gray"] = bool((a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all())
    except Exception as e:  # noqa: BLE001 - any failure makes the image unreadable
        raise _open_error(path, None, e) from None
    if h == 0 or w == 0:
        raise DataError(f"cannot decode image {path}: empty image")
    return info


def decode_side(image_size: int, decode_scale: float = 2.0) -> int:
    """The shorter side folder images are decoded to (at most): ``decode_scale`` x the training side."""
    return max(int(image_size), int(round(decode_scale * image_size)))


def _class_files(split_dir: str, classes: list[str], what: str) -> tuple[list[str], list[int]]:
    """Image files and labels of ``split_dir/CLASS/**``; every CLASS must be one of ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for c in _subdirs(split_dir):
        if c not in index:
            raise DataError(f"class folder {os.path.join(split_dir, c)} is not a class of {what}")
        found = _walk_images(os.path.join(split_dir, c))
        if not found:
            raise DataError(
                f"class folder {os.path.join(split_dir, c)} contains no images "
                f"(extensions: {' '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
            )
        files.extend(found)
        labels.extend([index[c]] * len(found))
    return files, labels


class ImageFolderDataset(ImageDataset):
    """Lazy image folder: the layout ROOT/train/CLASS/*, ROOT/val|test/CLASS/*, ROOT/unlabeled/**
    (labels -1), or one folder (:meth:`labeled`: FOLDER/CLASS/**; :meth:`unlabeled`: FOLDER/**).

    ``__getitem__`` decodes an image whole (:func:`read_image`): uint8 ``[channels, h, w]``, its
    aspect ratio kept, its shorter side at most ``decode_side`` (default 2 x ``image_size``, the side
    of the training views); batches are :class:`~simclrv2.data.batch.ImageBatch` es. ``channels``
    (3, or 1 for an all-gray dataset) and ``bit_depth`` (of images of more than 8 bits) are set by
    :meth:`configure` (the stages decide them from the image check: :mod:`simclrv2.data.folders`).
    :meth:`load_into_memory` decodes every image once and keeps them (small datasets).
    ``ids`` are paths relative to the folder with '/' separators, e.g. ``train/cat/img1.png``.
    Holds only paths and labels until then: picklable for DataLoader worker processes.
    """

    in_memory = False
    variable_size = True

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 224, name: str = "imagefolder"):
        root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.isdir(root):
            raise DataError(f"image folder root not found: {root}")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise DataError(f"image folder {root} has no train/ directory (expected ROOT/train/CLASS/*)")
        classes = _subdirs(train_dir)
        if not classes:
            raise DataError(f"image folder {train_dir} has no class subfolders (expected train/CLASS/*)")
        if split == "unlabeled":
            split_dir = os.path.join(root, "unlabeled")
            if not os.path.isdir(split_dir):
                raise DataError(f"image folder {root} has no unlabeled split (expected ROOT/unlabeled/)")
            files = _walk_images(split_dir)
            labels = [-1] * len(files)
        else:
            if split == "train":
                split_dir = train_dir
            elif split == "test":
                split_dir = next(
                    (os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), ""
                )
                if not split_dir:
                    raise DataError(f"image folder {root} has no val/ (or test/) directory for the test split")
            else:
                raise ConfigError(f"unknown split '{split}' for an image folder: expected train, test or unlabeled")
            files, labels = _class_files(split_dir, classes, f"{train_dir} (classes are the subfolders of train/)")
        if not files:
            raise DataError(f"the {split} split of image folder {root} is empty: no images in {split_dir}")
        self._setup(root, files, labels, classes, split, name, image_size)

    @classmethod
    def labeled(cls, folder: str | os.PathLike, split: str, image_size: int, classes: Sequence[str] | None = None,
                name: str = "imagefolder", option: str = "folder") -> ImageFolderDataset:
        """FOLDER/CLASS/** (any nesting under each class). ``classes``: the class list it must keep to
        (default: its own subfolders, sorted). ``option`` names the folder in errors (e.g. --test-dir)."""
        folder = _existing_folder(folder, option)
        own = _subdirs(folder)
        if classes is None:
            if not own:
                raise DataError(f"{option} {folder} has no class subfolders (expected {option} DIR with DIR/CLASS/*)")
            classes = own
        files, labels = _class_files(folder, list(classes), f"the labelled images ({', '.join(classes)})")
        if not files:
            raise DataError(f"{option} {folder} has no images in class subfolders (expected DIR/CLASS/*)")
        ds = cls.__new__(cls)
        ds._setup(folder, files, labels, list(classes), split, name, image_size)
        return ds

    @classmethod
    def unlabeled(cls, folder: str | os.PathLike, image_size: int, classes: Sequence[str] = (),
                  name: str = "imagefolder", option: str = "folder") -> ImageFolderDataset:
        """Every image under FOLDER, any nesting, labels -1 (subfolder names are not classes)."""
        folder = _existing_folder(folder, option)
        files = _walk_images(folder)
        if not files:
            raise DataError(f"{option} {folder} contains no images (extensions: "
                            f"{' '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
        ds = cls.__new__(cls)
        ds._setup(folder, files, [-1] * len(files), list(classes), "unlabeled", name, image_size)
        return ds

    def _setup(self, root: str, files: list[str], labels: list[int], classes: list[str], split: str, name: str,
               image_size: int) -> None:
        broken = next((p for p in files if "\n" in p or "\r" in p), None)
        if broken is not None:  # ids are written one per line (labeled_subset.txt, subset files)
            raise DataError(f"image file {broken!r} has a line break in its path; rename it (image names are "
                            "written one per line)")
        self.root = root
        self.name = name
        self.split = split
        self.classes = classes
        self.image_size = int(image_size)
        self.ids = [os.path.relpath(p, root).replace(os.sep, "/") for p in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.channels = 3
        self.bit_depth: int | None = None  # None: images of more than 8 bits are scaled as 16-bit
        self.decode_side = decode_side(self.image_size)
        self._images: list[torch.Tensor] | None = None

    def configure(self, image_size: int | None = None, channels: int | None = None, bit_depth: int | None = None,
                  decode_scale: float | None = None) -> None:
        """How images are decoded: the views' side (the decoded shorter side is ``decode_scale`` x it,
        default 2), 1 or 3 channels, the bit depth of images of more than 8 bits."""
        if self._images is not None:
            raise RuntimeError("configure() an image folder before load_into_memory()")
        if image_size is not None:
            self.image_size = int(image_size)
        if channels is not None:
            self.channels = int(channels)
        if bit_depth is not None:
            self.bit_depth = int(bit_depth)
        self._decode_scale = decode_scale if decode_scale is not None else getattr(self, "_decode_scale", 2.0)
        self.decode_side = decode_side(self.image_size, self._decode_scale)

    def path(self, i: int) -> str:
        return os.path.join(self.root, *self.ids[i].split("/"))

    def decode(self, i: int) -> torch.Tensor:
        return read_image(self.path(i), self.decode_side, self.channels, self.bit_depth, self.path(i))

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = int(_as_index_array([i], len(self))[0])
        image = self._images[i] if self._images is not None else self.decode(i)
        return image, int(self.labels[i])

    def load_into_memory(self, workers: int = 0) -> None:
        """Decode every image once (``workers`` processes) and keep them: the dataset is then
        in-memory (batches without DataLoader workers). The same images as decoding on access."""
        loader = torch.utils.data.DataLoader(_Decoder(self), batch_size=32, num_workers=workers if len(self) >= 256 else 0,
                                             collate_fn=list, generator=torch.Generator())
        self._images = [im for chunk in loader for im in chunk]
        self.in_memory = True

    def __getstate__(self):
        state = self.__dict__.copy()
        if state.get("in_memory"):
            return state
        state["_images"] = None
        return state


class _Decoder(torch.utils.data.Dataset):
    """Image i of a folder, decoded (for load_into_memory's workers)."""

    def __init__(self, ds: ImageFolderDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds.decode(i)


def _existing_folder(folder: str | os.PathLike, option: str) -> str:
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(folder):
        raise DataError(f"{option} {folder}: no such folder")
    return folder


# ----------------------------------------------------------------------------- views


class SubsetDataset(ImageDataset):
    """A view of ``base`` restricted to ``indices`` (optionally with replaced labels)."""

    def __init__(self, base: ImageDataset, indices, labels: np.ndarray | None = None):
        idx = _as_index_array(indices, len(base))
        self.base = base
        self.indices = idx
        self.labels = np.asarray(base.labels[idx] if labels is None else labels, dtype=np.int64)
        if len(self.labels) != len(idx):
            raise ValueError(f"{len(idx)} indices but {len(self.labels)} labels")
        self.ids = [base.ids[i] for i in idx]
        self.classes = list(base.classes)
        self.name = base.name
        self.split = base.split
        self.channels = base.channels
        self.image_size = base.image_size
        self.in_memory = base.in_memory
        self.variable_size = base.variable_size

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = int(_as_index_array([i], len(self))[0])
        return self.base[int(self.indices[i])][0], int(self.labels[i])

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_index_array(indices, len(self))
        if idx.size == 0:
            return self._empty_batch(), torch.zeros(0, dtype=torch.int64)
        images, _ = self.base.get_batch(self.indices[idx])
        return images, torch.from_numpy(self.labels[idx])


class ConcatImageDataset(ImageDataset):
    """Several datasets (same channels, image size and classes) read as one."""

    def __init__(self, datasets: Sequence[ImageDataset]):
        self.datasets = list(datasets)
        first = self.datasets[0]
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).astype(np.int64)
        self.labels = np.concatenate([np.asarray(d.labels, dtype=np.int64) for d in self.datasets])
        self.ids = [i for d in self.datasets for i in d.ids]
        self.classes = list(first.classes)
        self.name = _join_unique(d.name for d in self.datasets)
        self.split = _join_unique(d.split for d in self.datasets)
        self.channels = first.channels
        self.image_size = first.image_size
        self.in_memory = all(d.in_memory for d in self.datasets)
        self.variable_size = any(d.variable_size for d in self.datasets)

    def _locate(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, idx, side="right") - 1

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = int(_as_index_array([i], len(self))[0])
        k = int(self._locate(np.asarray([i]))[0])
        return self.datasets[k][i - int(self.offsets[k])][0], int(self.labels[i])

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_index_array(indices, len(self))
        if idx.size == 0:
            return self._empty_batch(), torch.zeros(0, dtype=torch.int64)
        which = self._locate(idx)
        if self.variable_size:  # images of different sizes: gathered one by one into one padded batch
            images = [self.datasets[k][int(i - self.offsets[k])][0] for k, i in zip(which, idx)]
            return ImageBatch.from_images(images), torch.from_numpy(self.labels[idx])
        out = None
        for k in np.unique(which):
            pos = np.flatnonzero(which == k)
            imgs, _ = self.datasets[k].get_batch(idx[pos] - self.offsets[k])
            if out is None:
                out = torch.empty((len(idx),) + tuple(imgs.shape[1:]), dtype=torch.uint8)
            out[torch.from_numpy(pos)] = imgs
        return out, torch.from_numpy(self.labels[idx])


def _join_unique(values) -> str:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return "+".join(seen)


def subset(ds: ImageDataset, indices) -> ImageDataset:
    """The images of ``ds`` at ``indices``, with the same API.

    For an in-memory dataset the selected images are copied into a new
    :class:`TensorImageDataset` (so ``.images`` stays a plain tensor); otherwise a view.
    """
    idx = _as_index_array(indices, len(ds))
    if isinstance(ds, TensorImageDataset):
        t = torch.from_numpy(idx)
        return TensorImageDataset(
            ds.images.index_select(0, t), ds.labels[idx], ds.classes, ds.name, ds.split, [ds.ids[i] for i in idx]
        )
    if isinstance(ds, SubsetDataset):  # flatten nested views
        return SubsetDataset(ds.base, ds.indices[idx], ds.labels[idx])
    return SubsetDataset(ds, idx)


def hide_labels(ds: ImageDataset) -> ImageDataset:
    """The same images with every label set to -1 (the unlabeled pool). Images are shared, not copied."""
    unknown = np.full(len(ds), -1, dtype=np.int64)
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds.images, unknown, ds.classes, ds.name, ds.split, ds.ids)
    if isinstance(ds, SubsetDataset):
        return SubsetDataset(ds.base, ds.indices, unknown)
    return SubsetDataset(ds, np.arange(len(ds)), unknown)


def concat(datasets: Sequence[ImageDataset]) -> ImageDataset:
    """Datasets read one after another, with the same API. In-memory inputs give an in-memory result."""
    datasets = [d for d in datasets]
    if not datasets:
        raise ValueError("concat needs at least one dataset")
    first = datasets[0]
    for d in datasets[1:]:
        if d.channels != first.channels or d.image_size != first.image_size:
            raise DataError(
                f"cannot concatenate {d.name} {d.split} ({d.channels}x{d.image_size}) with "
                f"{first.name} {first.split} ({first.channels}x{first.image_size}): image shapes differ"
            )
        if list(d.classes) != list(first.classes):
            raise DataError(f"cannot concatenate {d.name} {d.split} with {first.name} {first.split}: class lists differ")
    if len(datasets) == 1:
        return first
    if all(isinstance(d, TensorImageDataset) for d in datasets):
        return TensorImageDataset(
            torch.cat([d.images for d in datasets]),
            np.concatenate([d.labels for d in datasets]),
            first.classes,
            _join_unique(d.name for d in datasets),
            _join_unique(d.split for d in datasets),
            [i for d in datasets for i in d.ids],
        )
    return ConcatImageDataset(datasets)
