"""A user's own image folders built from real images: scikit-learn's digits (1,797 8x8 scans of
handwritten digits), upscaled to mixed sizes and aspect ratios and written as PNG and JPEG files,
some of them 16-bit PNGs holding 12-bit values (as a 12-bit camera's files do):

    ROOT/unlabeled/**     images without classes, in nested folders (a/, a/b/, c/)
    ROOT/labeled/D/*      the labelled images, D = 0..9
    ROOT/test/D/*         held-out labelled images

The digits are split by a seeded permutation: disjoint parts, balanced classes in labeled/ and test/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digit_image(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8x8 digit (0..16) as a uint8 image of ``height`` x ``width`` (bilinear upscale)."""
    small = Image.fromarray(np.rint(pixels * (255 / 16)).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))


def write_image(path: Path, gray: np.ndarray, kind: str) -> None:
    """``kind``: png (8-bit gray), jpeg (8-bit gray, quality 95), png12 (16-bit PNG of 12-bit values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png12":
        values = np.rint(gray.astype(np.float64) * (4095 / 255)).astype(np.uint16)
        Image.fromarray(values).save(path.with_suffix(".png"))
    elif kind == "jpeg":
        Image.fromarray(gray).save(path.with_suffix(".jpg"), quality=95)
    else:
        Image.fromarray(gray).save(path.with_suffix(".png"))


def make_digit_folders(root: Path, unlabeled: int = 300, labeled_per_class: int = 10, test_per_class: int = 15,
                       seed: int = 0) -> Path:
    """Write the three folders under ``root``; returns ``root``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    by_class = {c: [i for i in order if d.target[i] == c] for c in range(10)}
    labeled = [i for c in range(10) for i in by_class[c][:labeled_per_class]]
    test = [i for c in range(10) for i in by_class[c][labeled_per_class:labeled_per_class + test_per_class]]
    used = set(labeled) | set(test)
    rest = [i for i in order if i not in used][:unlabeled]
    kinds = ("png", "jpeg", "png12")
    nests = ("a", "a/b", "c", "")

    def put(path_base: Path, i: int, k: int) -> None:
        side = int(rng.integers(24, 65))  # 24..64 px
        aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
        h, w = side, max(8, int(round(side * aspect)))
        write_image(path_base, digit_image(d.images[i], h, w), kinds[k % 3])

    for k, i in enumerate(rest):
        put(root / "unlabeled" / nests[k % 4] / f"u{k:04d}", i, k)
    for k, i in enumerate(labeled):
        put(root / "labeled" / str(d.target[i]) / f"l{k:04d}", i, k)
    for k, i in enumerate(test):
        put(root / "test" / str(d.target[i]) / f"t{k:04d}", i, k)
    return root
