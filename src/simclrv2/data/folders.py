"""A user's own image folders: the layouts, the up-front check, and what is decided from the images.

Two layouts (README "Your own images" draws each):

* **separate folders** (``--unlabeled-dir``, ``--labeled-dir``, ``--test-dir``): a plain folder of
  unlabeled images (any nesting; subfolder names are not classes), a labelled folder
  ``DIR/CLASS/**`` (the labelled set, all of it unless a fraction is asked for) and a held-out
  labelled folder ``DIR/CLASS/**`` (evaluation). Pretraining needs the unlabeled or the labelled
  folder; the classifier stages need the labelled one; without a test folder no test accuracy is
  reported.
* **one root** (``--dataset imagefolder --data-dir ROOT``): ``ROOT/train/CLASS/**``,
  ``ROOT/val/CLASS/**`` (or ``test/``) and optionally ``ROOT/unlabeled/**``, as before.

Every image folder of the run is checked before training (:func:`check_folders`, the image check
of :mod:`simclrv2.data.image_check`: every file decoded once, cached per file) -- all of them,
whatever the stage uses, so that every stage of a recipe decides the same:

* **channels**: 1 when every image of every folder is gray (one channel, or three equal ones),
  else 3 (gray images repeated);
* **bit depth** of images of more than 8 bits (16-bit PNG/TIFF): ``--bit-depth auto`` takes the
  smallest of 8, 10, 12, 14, 16 bits that holds the largest value found (a 12-bit camera's images
  stored as 16-bit files are scaled by 4095, not 65535); with ``--no-check-images`` only the
  headers are read and auto means 16;
* **image size** (separate folders, no ``--image-size``): the median shorter side of the images,
  rounded to a multiple of 8, within 32..224 px (one root: 224, as before).

A stage that starts from a checkpoint (fine-tuning, linear evaluation: ``--pretrained``;
distillation: ``--teacher``) takes these from it instead (the model's channels; the image size and
bit depth unless given), so that it sees the images as the model's run did.

Images are then decoded whole (:func:`~simclrv2.data.sources.read_image`: shorter side at most
``--decode-scale`` x the image size, aspect ratio kept: the crops are cut from the whole image,
docs/method.md §5) and, when they fit in
``--image-cache-gb``, decoded once and kept in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from simclrv2.data.image_check import FolderSummary, scan_images
from simclrv2.data.sources import (ImageDataset, ImageFolderDataset, bits_for, decode_side, load_dataset, subset)
from simclrv2.config import FOLDER_OPTIONS, flag
from simclrv2.errors import ConfigError, DataError
from simclrv2.runtime import log

DEFAULT_FOLDER_SIZE = 224  # the one-root layout's image size, and the separate folders' largest default
MIN_AUTO_SIZE = 32


def uses_folders(cfg) -> bool:
    """Whether ``cfg`` names separate image folders (--unlabeled-dir / --labeled-dir / --test-dir)."""
    return any(getattr(cfg, name, None) for name in FOLDER_OPTIONS)


@dataclass
class FolderData:
    """The image folders of a run after the check: the labelled training images (``train``; empty
    with no labelled folder), the test images (None without), the unlabeled ones (None without),
    and the decisions (image size, channels, bit depth)."""

    train: ImageDataset
    test: ImageDataset | None
    unlabeled: ImageDataset | None
    image_size: int
    channels: int
    bit_depth: int


def _layout(cfg, size: int) -> tuple[ImageDataset | None, ImageDataset | None, ImageDataset | None]:
    """(labelled, test, unlabeled) image folders of ``cfg``, at image size ``size`` (unchecked)."""
    if not uses_folders(cfg):  # one root: ROOT/train, ROOT/val|test, ROOT/unlabeled if there
        train = load_dataset("imagefolder", "train", cfg.data_dir, size)
        test = load_dataset("imagefolder", "test", cfg.data_dir, size)
        unlabeled = None
        if os.path.isdir(os.path.join(train.root, "unlabeled")):
            unlabeled = load_dataset("imagefolder", "unlabeled", cfg.data_dir, size)
        return train, test, unlabeled
    labeled = test = unlabeled = None
    if cfg.labeled_dir:
        labeled = ImageFolderDataset.labeled(cfg.labeled_dir, "train", size, option="--labeled-dir")
    classes = labeled.classes if labeled is not None else None
    if cfg.test_dir:
        test = ImageFolderDataset.labeled(cfg.test_dir, "test", size, classes, option="--test-dir")
        if classes is None:
            classes = test.classes
    if cfg.unlabeled_dir:
        unlabeled = ImageFolderDataset.unlabeled(cfg.unlabeled_dir, size, classes or [], option="--unlabeled-dir")
    return labeled, test, unlabeled


def load_folders(cfg, stage: str, with_unlabeled: bool = True, workers: int | None = None) -> FolderData:
    """The image folders of ``cfg`` checked, configured (channels, bit depth, image size) and, when
    small enough, decoded into memory. ``with_unlabeled=False``: the unlabeled images are checked
    (every stage decides alike) but not returned."""
    labeled, test, unlabeled = _layout(cfg, cfg.image_size or DEFAULT_FOLDER_SIZE)
    if uses_folders(cfg):
        if labeled is None and stage in ("finetune", "supervised", "linear_eval"):
            raise ConfigError(f"{stage}: --labeled-dir is required (the labelled images, DIR/CLASS/*)")
        if labeled is None and unlabeled is None:
            raise ConfigError(f"{stage}: give --unlabeled-dir (images, any nesting) and/or --labeled-dir "
                              "(DIR/CLASS/*) to train on")
    folders = [d for d in (labeled, test, unlabeled) if d is not None]
    summary = check_folders(folders, cfg)
    size = cfg.image_size or (auto_image_size(summary) if uses_folders(cfg) else DEFAULT_FOLDER_SIZE)
    channels = 1 if summary.gray else 3
    bits = resolve_bit_depth(cfg.bit_depth, summary)
    source = _input_checkpoint(cfg)
    if source is not None:  # a stage that starts from a model sees its images as that model's run did
        size, channels, bits, classes = _inherit(source, cfg, size, channels, bits)
        if labeled is None and test is None and unlabeled is not None:  # distilling unlabeled images alone
            unlabeled.classes = classes
    for d in folders:
        d.configure(image_size=size, channels=channels, bit_depth=bits, decode_scale=cfg.decode_scale)
    keep = [d for d in folders if with_unlabeled or d is not unlabeled]
    _maybe_into_memory(keep, summary, size, channels, cfg, workers)
    notes = [f"{channels} channel{'s' if channels > 1 else ''}", f"{size} px views"]
    if summary.high_bit:
        notes.append(f"{bits}-bit images scaled by {2 ** bits - 1}")
    log.info(f"{stage}: image folders: " + ", ".join(f"{d.root} ({len(d)} images)" for d in folders)
             + f"; {', '.join(notes)}")
    train = labeled if labeled is not None else subset(unlabeled, [])  # no labelled images: an empty set
    return FolderData(train, test, unlabeled if with_unlabeled else None, size, channels, bits)


def _input_checkpoint(cfg) -> str | None:
    """The checkpoint a stage starts from (fine-tuning / linear evaluation: --pretrained; distillation:
    --teacher), when it exists."""
    from simclrv2.checkpoint import resolve

    path = getattr(cfg, "pretrained", None) or getattr(cfg, "teacher", None)
    if not path:
        return None
    try:
        return str(resolve(path))
    except Exception:  # noqa: BLE001 - a missing checkpoint is reported by the stage, naming it
        return None


def _inherit(source: str, cfg, size: int, channels: int, bits: int) -> tuple[int, int, int, list[str]]:
    """(image size, channels, bit depth, classes) of the run that wrote ``source``, where it recorded
    them and the options leave them open (--image-size, --bit-depth auto): its folders may be others
    than this stage's (e.g. fine-tuning given only --labeled-dir after pretraining on more images)."""
    from simclrv2.checkpoint import read_meta

    meta = read_meta(source)
    if cfg.image_size is None and meta.image_size:
        size = int(meta.image_size)
    channels = int(meta.model.in_channels)
    if str(cfg.bit_depth) == "auto" and meta.bit_depth:
        bits = int(meta.bit_depth)
    return size, channels, bits, list(meta.classes or [])


def auto_image_size(summary: FolderSummary) -> int:
    """The median shorter side of the images, rounded to a multiple of 8, within 32..224 px."""
    sides = np.repeat([min(hw) for hw in summary.sizes], list(summary.sizes.values()))
    median = float(np.median(sides)) if sides.size else DEFAULT_FOLDER_SIZE
    return int(min(DEFAULT_FOLDER_SIZE, max(MIN_AUTO_SIZE, 8 * round(median / 8))))


def resolve_bit_depth(option: str, summary: FolderSummary) -> int:
    """``--bit-depth`` as a number: the option's, or (auto) what the images' largest value needs (16
    when only headers were read), 8 when no image has more than 8 bits."""
    if str(option) != "auto":
        return int(option)
    if not summary.high_bit:
        return 8
    return bits_for(summary.max_value) if summary.max_value >= 0 else 16


def _maybe_into_memory(datasets: list[ImageFolderDataset], summary: FolderSummary, size: int, channels: int, cfg,
                       workers: int | None) -> None:
    """Decode every image of ``datasets`` once and keep it, when the decoded images take at most
    ``cfg.image_cache_gb`` (estimated from the check's image sizes; all folders or none)."""
    if cfg.image_cache_gb <= 0 or not datasets:
        return
    side = decode_side(size, cfg.decode_scale)
    per_image = {hw: _decoded_pixels(hw, side) for hw in summary.sizes}
    pixels = sum(per_image[hw] * n for hw, n in summary.sizes.items())
    if pixels * channels > cfg.image_cache_gb * 2**30:
        log.info(f"image folders: {pixels * channels / 2**30:.1f} GB decoded, more than --image-cache-gb "
                 f"{cfg.image_cache_gb:g}: decoded from disk every epoch")
        return
    for d in datasets:
        d.load_into_memory(cfg.workers if workers is None else workers)


def _decoded_pixels(hw: tuple[int, int], side: int) -> int:
    h, w = hw
    if min(h, w) <= side:
        return h * w
    s = side / min(h, w)
    return max(side, round(h * s)) * max(side, round(w * s))


# ------------------------------------------------------------------ checking image folders up front

def _drop(ds: ImageFolderDataset, ids: set[str]) -> None:
    keep = [i for i, name in enumerate(ds.ids) if name not in ids]
    if not keep:
        raise DataError(f"the {ds.split} split of image folder {ds.root} has no readable images")
    ds.ids = [ds.ids[i] for i in keep]
    ds.labels = ds.labels[np.asarray(keep, dtype=np.int64)]
    if ds.split != "unlabeled":
        counts = np.bincount(ds.labels, minlength=len(ds.classes))
        empty = [c for c, n in zip(ds.classes, counts) if n == 0]
        if empty:
            raise DataError(f"class '{empty[0]}' of image folder {ds.root} {ds.split} has no readable images left "
                            f"after skipping {len(ids)} unreadable ones")


def check_folders(folders: list[ImageFolderDataset], cfg) -> FolderSummary:
    """Decode every image of ``folders`` before training (:mod:`simclrv2.data.image_check`: sharded
    over processes, cached per file), so that no DataLoader worker meets a bad file hours later,
    and sum up what they are. Unreadable files stop the stage with a DataError naming the first
    one, or with ``cfg.skip_bad_images`` are dropped (count and first names logged). With
    ``cfg.check_images`` off only the headers are read (a warning says what that risks)."""
    summary = FolderSummary()
    if folders and not cfg.check_images:
        log.warning("image check skipped (--no-check-images): an unreadable image will stop training "
                    "when a data loader meets it")
    for ds in folders:
        bad, _, found = scan_images(ds, cfg.workers, decode=cfg.check_images)
        summary.merge(found)
        if not bad:
            continue
        if not cfg.skip_bad_images:
            raise DataError(f"{bad[0][1]}; {len(bad)} unreadable image(s) in {ds.root} {ds.split} "
                            "(fix or remove them, or pass --skip-bad-images to skip them)")
        names = ", ".join(i for i, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
        log.warning(f"skipping {len(bad)} unreadable image(s) of {ds.root} {ds.split}: {names}")
        _drop(ds, {i for i, _ in bad})
    return summary


def folder_dataset(config: dict, split: str, image_size: int | None, channels: int | None,
                   bit_depth: int | None) -> ImageDataset:
    """One split of a run's image folders, configured as the run decided (for ``evaluate`` and the
    report, from a checkpoint's config: the separate folders' --test-dir / --labeled-dir, else the
    one-root layout); no check, nothing kept in memory."""
    size = image_size or DEFAULT_FOLDER_SIZE
    if any(config.get(k) for k in FOLDER_OPTIONS):
        option = {"test": "test_dir", "val": "test_dir", "train": "labeled_dir", "unlabeled": "unlabeled_dir"}.get(split)
        if option is None or not config.get(option):
            raise ConfigError(f"the run has no {split} images ({flag(option or split)} was not given)")
        if option == "unlabeled_dir":
            ds = ImageFolderDataset.unlabeled(config[option], size, option=flag(option))
        else:
            classes = None
            if config.get("labeled_dir") and option == "test_dir":
                classes = ImageFolderDataset.labeled(config["labeled_dir"], "train", size, option="--labeled-dir").classes
            ds = ImageFolderDataset.labeled(config[option], split, size, classes, option=flag(option))
    else:
        ds = load_dataset("imagefolder", split, config.get("data_dir"), size)
    ds.configure(channels=channels, bit_depth=bit_depth, decode_scale=config.get("decode_scale"))
    return ds


__all__ = ["FolderData", "auto_image_size", "check_folders", "folder_dataset", "load_folders", "resolve_bit_depth",
           "uses_folders"]
