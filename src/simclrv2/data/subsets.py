"""Class-balanced labeled subsets and subset files.

A subset is sampled per class, in class order, from one ``np.random.default_rng(seed)``:
for class ``c`` (ascending label value) the generator draws ``permutation(n_c)`` over that
class's indices (ascending) and the first ``k_c`` are kept. This depends only on numpy's
documented PCG64 stream, so the same seed gives the same subset on any machine.

Subset files hold one image identifier per line (the format of the official SimCLR
ImageNet 1% / 10% files, e.g. ``n04235860_14959.JPEG``).
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from simclrv2.checkpoint import atomic_write_text
from simclrv2.data.sources import ImageDataset, hide_labels, subset
from simclrv2.errors import ConfigError, DataError

__all__ = ["labeled_subset", "split_labeled", "validation_indices", "write_subset_file", "read_subset_file"]


class IdentifierError(DataError, ValueError):
    """An image identifier that cannot be written one per line (a DataError: one line for the user;
    a ValueError, as before)."""


def _check_counts(fraction, per_class) -> None:
    if (fraction is None) == (per_class is None):
        raise ConfigError("give exactly one of fraction (share of labels per class) or per_class (labels per class)")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, Real) or not (0.0 < float(fraction) <= 1.0):
            raise ConfigError(f"label fraction must be a number in (0, 1], got {fraction!r}")
    if per_class is not None:
        if isinstance(per_class, bool) or not isinstance(per_class, Integral) or per_class < 1:
            raise ConfigError(f"per_class must be an integer >= 1, got {per_class!r}")


def labeled_subset(
    labels: np.ndarray, fraction: float | None = None, per_class: int | None = None, seed: int = 0,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted int64 indices of a class-balanced labeled subset.

    Per class (labels >= 0; -1 = unknown is never chosen): ``floor(fraction * n_c + 0.5)``
    images (round half up, at least 1) or ``per_class`` images, picked by a seeded permutation.

    ``exclude`` (indices, e.g. a validation split): never chosen; the counts stay those of the
    whole class (1% of Fashion-MNIST is 60 a class with or without a held-out split), drawn by a
    permutation over the class's remaining images. Without it the draw is unchanged.
    """
    if exclude is not None and len(exclude):
        labels = np.asarray(labels).astype(np.int64, copy=True)
        full = labels.copy()
        labels[np.asarray(exclude, dtype=np.int64)] = -1
        return _labeled_subset_excluding(full, labels, fraction, per_class, seed)
    _check_counts(fraction, per_class)
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ConfigError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    classes = np.unique(labels[labels >= 0])
    if classes.size == 0:
        raise ConfigError("cannot choose a labeled subset: the dataset has no labeled images")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        n_c = len(idx)
        if per_class is not None:
            k = int(per_class)
            if k > n_c:
                raise ConfigError(f"per_class={k} but class {int(c)} has only {n_c} images")
        else:
            k = max(1, int(math.floor(float(fraction) * n_c + 0.5)))
            k = min(k, n_c)
        perm = rng.permutation(n_c)
        chosen.append(idx[perm[:k]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _labeled_subset_excluding(full: np.ndarray, labels: np.ndarray, fraction, per_class, seed: int) -> np.ndarray:
    """:func:`labeled_subset` with counts from ``full`` and candidates from ``labels`` (excluded: -1)."""
    _check_counts(fraction, per_class)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(full[full >= 0]):
        n_c = int((full == c).sum())
        idx = np.flatnonzero(labels == c)
        k = int(per_class) if per_class is not None else max(1, int(math.floor(float(fraction) * n_c + 0.5)))
        if k > len(idx):
            raise ConfigError(f"class {int(c)} needs {k} labeled images but only {len(idx)} are outside the validation split")
        chosen.append(idx[rng.permutation(len(idx))[:k]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def validation_indices(labels: np.ndarray, size: int = 5000, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of a class-balanced validation split of ``size`` training images.

    Per class (labels >= 0, ascending), ``size`` is shared out in proportion to the class's count
    (largest remainders first, ties to the lower class), and each class's images are picked by
    ``permutation(n_c)`` from ``np.random.default_rng([seed, 0x7A1])`` -- a stream of its own, so
    that it does not depend on, nor shift, the labeled subset drawn with ``seed``. Fashion-MNIST
    (6,000 a class), ``size`` 5,000: 500 a class.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    if not 0 < size <= counts.sum():
        raise ConfigError(f"validation size must be in 1..{int(counts.sum())}, got {size}")
    share = size * counts / counts.sum()
    k = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - k), kind="stable")[: size - int(k.sum())]:
        k[i] += 1
    rng = np.random.default_rng([seed, 0x7A1])
    chosen = [np.flatnonzero(labels == c)[rng.permutation(n)[:m]] for c, n, m in zip(classes, counts, k)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_labeled(
    ds: ImageDataset,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    subset_file: str | os.PathLike | None = None,
    exclude: np.ndarray | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """(labeled subset, unlabeled pool): the pool is the rest of ``ds`` with labels hidden (-1).

    With ``subset_file`` the labeled images are the ones listed there (fraction/per_class ignored).
    ``exclude`` (a validation split's indices): never labeled (see :func:`labeled_subset`); those
    images stay in the unlabeled pool, labels hidden.
    """
    if subset_file is not None:
        idx = read_subset_file(subset_file, ds)
        if exclude is not None and np.isin(idx, exclude).any():
            raise ConfigError(f"subset file {subset_file} lists {int(np.isin(idx, exclude).sum())} images of the "
                              "validation split; use --val-size 0 with it or a file without them")
    else:
        _check_counts(fraction, per_class)
        labels = np.asarray(ds.labels, dtype=np.int64)
        counts = np.bincount(labels[labels >= 0], minlength=len(ds.classes))
        empty = [ds.classes[i] for i in range(len(ds.classes)) if counts[i] == 0]
        if empty:
            raise ConfigError(
                f"class '{empty[0]}' of {ds.name} {ds.split} has no labeled images, so it would get zero labels"
                + (f" ({len(empty)} such classes)" if len(empty) > 1 else "")
            )
        idx = labeled_subset(labels, fraction=fraction, per_class=per_class, seed=seed, exclude=exclude)
    mask = np.ones(len(ds), dtype=bool)
    mask[idx] = False
    rest = np.flatnonzero(mask)
    return subset(ds, idx), hide_labels(subset(ds, rest))


def write_subset_file(path: str | os.PathLike, ids: Sequence[str]) -> None:
    """Write one identifier per line, atomically (temporary file in the same folder + rename)."""
    path = os.fspath(path)
    lines = []
    for s in ids:
        s = str(s)
        if not s.strip() or "\n" in s or "\r" in s or s != s.strip():
            raise IdentifierError(f"{path}: image identifier {s!r} cannot be written to a subset file (one name per line): "
                            "rename the file so that its name has no line break and no surrounding spaces")
        lines.append(s)
    atomic_write_text(path, "".join(s + "\n" for s in lines))


def _escapes_root(line: str) -> bool:
    if line.startswith(("/", "\\")) or (len(line) >= 2 and line[1] == ":" and line[0].isalpha()):
        return True
    return ".." in line.replace("\\", "/").split("/")


def read_subset_file(path: str | os.PathLike, ds: ImageDataset) -> np.ndarray:
    """Sorted int64 indices into ``ds`` of the identifiers listed in a subset file.

    A line matches an id exactly, or else the trailing path components of exactly one id
    (so ``n01440764_10026.JPEG`` matches ``train/n01440764/n01440764_10026.JPEG``).
    Blank lines and surrounding whitespace are ignored.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"subset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read subset file {path}: {' '.join(str(e).split())}") from None

    entries = []  # (line number, identifier)
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if _escapes_root(line):
            raise DataError(
                f"subset file {path} line {n}: '{line}' is an absolute path or contains '..' "
                f"(identifiers must be relative to the dataset root)"
            )
        entries.append((n, line))
    if not entries:
        raise DataError(f"subset file {path} lists no images")

    exact = {s: i for i, s in enumerate(ds.ids)}
    by_base: dict[str, list[int]] = {}
    for i, s in enumerate(ds.ids):
        by_base.setdefault(s.rsplit("/", 1)[-1], []).append(i)

    found = np.empty(len(entries), dtype=np.int64)
    unmatched, seen_lines = [], {}
    for k, (n, line) in enumerate(entries):
        if line in seen_lines:
            raise DataError(f"subset file {path} line {n}: '{line}' duplicates line {seen_lines[line]}")
        seen_lines[line] = n
        i = exact.get(line)
        if i is None:
            norm = line.replace("\\", "/").strip("/")
            cands = [j for j in by_base.get(norm.rsplit("/", 1)[-1], ()) if ds.ids[j] == norm or ds.ids[j].endswith("/" + norm)]
            if len(cands) > 1:
                raise DataError(
                    f"subset file {path} line {n}: '{line}' matches {len(cands)} images "
                    f"({ds.ids[cands[0]]}, {ds.ids[cands[1]]}, ...); give the path relative to the dataset root"
                )
            if not cands:
                unmatched.append(line)
                continue
            i = cands[0]
        found[k] = i
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        raise DataError(
            f"subset file {path}: {len(unmatched)} of {len(entries)} lines match no image of "
            f"{ds.name} {ds.split} ({len(ds)} images), first: {shown}"
        )
    uniq, counts = np.unique(found, return_counts=True)
    if len(uniq) != len(found):
        dup = ds.ids[int(uniq[counts > 1][0])]
        raise DataError(f"subset file {path}: image {dup} is listed more than once")
    return uniq.astype(np.int64)
