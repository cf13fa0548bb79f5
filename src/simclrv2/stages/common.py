"""What the stages share: data preparation, checkpointed models, evaluation, stage results."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.config import RunConfig
from simclrv2.data import (ImageDataset, concat, hide_labels, load_dataset, split_labeled, subset, validation_indices,
                           write_subset_file)
from simclrv2.data.augment import EvalTransform
from simclrv2.data.folders import load_folders
from simclrv2.distributed import broadcast_object
from simclrv2.engine import predict, topk_accuracy
from simclrv2.errors import CheckpointError, ConfigError, DataError
from simclrv2.rundir import StageRun
from simclrv2.runtime import Runtime, log


@dataclass
class Data:
    train: ImageDataset  # the whole training split, labels intact (image folders: the labelled folder, maybe empty)
    test: ImageDataset | None  # None: no test images (image folders without --test-dir)
    labeled: ImageDataset  # the class-balanced labeled subset
    unlabeled: ImageDataset  # everything else, labels hidden (-1): the rest of train + any unlabeled split
    image_size: int
    channels: int
    classes: list[str]
    val: ImageDataset | None = None  # the validation split (--val-size), labels intact; its images are in the pool
    stem: str = "auto"  # --stem: auto | small | imagenet
    bit_depth: int | None = None  # image folders: the bit depth images of more than 8 bits were scaled by

    @property
    def small_images(self) -> bool:
        """The small-image stem (docs/method.md §1): --stem small, or auto at <= 32 px."""
        return self.stem == "small" or (self.stem == "auto" and self.image_size <= 32)

    @property
    def has_knn(self) -> bool:
        """Labelled training images and test images: the kNN monitor can run."""
        return self.test is not None and len(self.train) > 0

    def all_images(self) -> ImageDataset:
        """Labeled subset + unlabeled pool: what pretraining and distillation see."""
        return concat([self.labeled, self.unlabeled])


def prepare_data(cfg: RunConfig, out_dir: Path | None = None, with_unlabeled_split: bool = True) -> Data:
    """Load the splits (image folders: checked and configured, :func:`simclrv2.data.folders.load_folders`)
    and split the training images into the labeled subset and the unlabeled pool."""
    folders = None
    if cfg.dataset == "imagefolder":
        folders = load_folders(cfg, _stage_of(cfg), with_unlabeled_split)
        train, test, extra = folders.train, folders.test, folders.unlabeled
    else:
        train = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.image_size)
        test = load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.image_size)
        extra = None
        if with_unlabeled_split:
            try:
                extra = load_dataset(cfg.dataset, "unlabeled", cfg.data_dir, cfg.image_size)
            except DataError:
                pass  # this dataset has no separate unlabeled split
    val_idx = validation_indices(train.labels, cfg.val_size, cfg.seed) if cfg.val_size else None
    if not len(train):  # image folders without labelled images: only the unlabeled ones
        labeled, unlabeled = train, None
    elif cfg.label_fraction == 1.0 and cfg.labels_per_class is None and cfg.subset_file is None:
        if val_idx is None:
            labeled, unlabeled = train, None
        else:  # every label but the validation split's; its images stay in the pool, labels hidden
            labeled = subset(train, np.setdiff1d(np.arange(len(train)), val_idx))
            unlabeled = hide_labels(subset(train, val_idx))
    else:
        fraction = None if cfg.labels_per_class is not None else cfg.label_fraction  # a count overrides the fraction
        labeled, unlabeled = split_labeled(train, fraction, cfg.labels_per_class, cfg.seed, cfg.subset_file, val_idx)
        how = (f"the subset file {cfg.subset_file}" if cfg.subset_file else f"{cfg.labels_per_class} per class"
               if cfg.labels_per_class else f"{fraction:g} of each class")
        log.info(f"{_stage_of(cfg)}: labelled subset ({how}, seed {cfg.seed}): {len(labeled)} of the {len(train)} "
                 "labelled training images; the others are used as unlabeled images")
    if cfg.subset_file is not None:
        _require_every_class(labeled, f"subset file {cfg.subset_file}")
    pools = [unlabeled] if unlabeled is not None and len(unlabeled) else []
    if extra is not None:
        pools.append(extra)
    unl = concat(pools) if pools else _empty_like(labeled)
    if out_dir is not None:
        write_subset_file(Path(out_dir) / "labeled_subset.txt", list(labeled.ids))
    size = folders.image_size if folders is not None else cfg.image_size or train.image_size
    if size is None:
        raise DataError(f"{cfg.dataset}: images have no fixed size; pass --image-size")
    if out_dir is not None and val_idx is not None:
        write_subset_file(Path(out_dir) / "validation_split.txt", [train.ids[i] for i in val_idx])
    val = subset(train, val_idx) if val_idx is not None else None
    return Data(train, test, labeled, unl, int(size), train.channels, list(train.classes), val,
                getattr(cfg, "stem", "auto"), folders.bit_depth if folders is not None else None)


def _stage_of(cfg: RunConfig) -> str:
    from simclrv2.config import STAGE_CONFIGS

    return next((name for name, cls in STAGE_CONFIGS.items() if type(cfg) is cls), "stage")


def _require_every_class(labeled: ImageDataset, source: str) -> None:
    labels = np.asarray(labeled.labels)
    counts = np.bincount(labels[labels >= 0], minlength=len(labeled.classes))
    empty = [c for c, n in zip(labeled.classes, counts) if n == 0]
    if empty:
        raise DataError(f"{source} gives class '{empty[0]}' no labeled images ({len(empty)} of {len(labeled.classes)} "
                        "classes have none); every class needs at least one labeled image")


def _empty_like(ds: ImageDataset) -> ImageDataset:
    from simclrv2.data import subset

    return subset(ds, [])


def check_compatible(meta: ckpt.CheckpointMeta, data: Data, source: str | Path) -> None:
    """The checkpointed model fits the dataset: channels, and classes for a classifier."""
    spec = meta.model
    source = meta.pretrained or source  # name the file the model came from
    if spec.in_channels != data.channels:
        raise CheckpointError(f"{source}: the model takes {spec.in_channels}-channel images; "
                              f"expected {data.channels} channels for this dataset")
    if spec.kind == "classifier" and spec.num_classes != len(data.classes):
        raise CheckpointError(f"{source}: the classifier has {spec.num_classes} classes; expected {len(data.classes)} for this dataset")


def evaluate_classifier(model: nn.Module, data: ImageDataset, rt: Runtime, image_size: int, batch_size: int = 500,
                        workers: int = 0) -> dict[str, float]:
    """Top-1 / top-5 on ``data``; under torchrun every process evaluates its share (call it on all)."""
    logits, labels = predict(model.to(rt.device), data, rt, EvalTransform(image_size), batch_size, workers=workers)
    return topk_accuracy(logits, labels)


def stage_done(out_dir: Path) -> ckpt.CheckpointMeta | None:
    """The final checkpoint's metadata if this stage already completed in ``out_dir``."""
    final = Path(out_dir) / "final.safetensors"
    if not final.exists():
        return None
    try:
        meta = ckpt.read_meta(final)
    except CheckpointError:
        return None
    return meta if meta.complete and meta.result is not None else None


def require(value: Any, option: str, stage: str) -> None:
    if not value:
        raise ConfigError(f"{stage}: --{option} is required")


def stage_function(stage: str, *required: str):
    """Makes ``body(cfg, rt, run)`` a stage function ``(cfg, rt=None) -> result``: required options
    checked, then the run directory (:class:`simclrv2.rundir.StageRun`: lock, reuse / continue /
    fresh, clean-up of a failed start), the seed, and the body."""
    def wrap(body):
        @functools.wraps(body)
        def stage_fn(cfg, rt: Runtime | None = None) -> dict[str, Any]:
            require(cfg.out, "out", stage)
            for option in required:
                require(getattr(cfg, option), option, stage)
            with StageRun(stage, cfg, rt) as run:
                if run.reused:
                    return run.decision.result
                torch.manual_seed(cfg.seed)
                return body(cfg, run.rt, run)
        del stage_fn.__wrapped__  # its signature is (cfg, rt=None), not the body's
        return stage_fn
    return wrap


def log_result(stage: str, result: dict[str, Any]) -> None:
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k in ("top1", "top5", "knn", "seconds")]
    log.info(f"{stage}: " + " ".join(parts))


def to_device(model: nn.Module, rt: Runtime, channels_last: bool) -> nn.Module:
    model = model.to(rt.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if rt.device.type == "cpu":
            keep_onednn_exceptions_nchw(model)
    return model


def _narrow_strided_1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8


def _nchw_input(module: nn.Module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


def keep_onednn_exceptions_nchw(model: nn.Module) -> list[str]:
    """Run the convolutions that oneDNN gets wrong in channels_last on the CPU in NCHW instead.

    oneDNN (seen with torch 2.13 on an Intel Xeon with AMX) intermittently computed wrong weight
    gradients (errors of 10-100%) for channels_last 1x1 strided convolutions with fewer than 8
    input channels: the projection shortcuts of very narrow ResNets (width 1/16). Those few
    convolutions keep an NCHW weight and get their input as NCHW (a forward pre-hook), every
    other layer stays channels_last. Returns the names of the convolutions changed."""
    names = []
    for name, m in model.named_modules():
        if _narrow_strided_1x1(m) and not getattr(m, "nchw_on_cpu", False):
            m.weight.data = m.weight.data.contiguous()
            m.register_forward_pre_hook(_nchw_input)
            m.nchw_on_cpu = True
            names.append(name)
    return names


def finish(out: Path, rt: Runtime, result: dict[str, Any]) -> None:
    """Store the stage result in final.json/final.safetensors metadata (rewritten atomically).

    Under torchrun only rank 0 writes, and ``result`` is replaced in place by rank 0's on every
    rank (the accuracies agree already; the timings differ), so that every process returns the same result.
    """
    if rt.is_main:
        tensors, meta = ckpt.load_checkpoint(out / "final.safetensors")
        ckpt.save_checkpoint(out / "final", tensors, meta.replace(result=result))
    if rt.distributed:
        main_result = broadcast_object(result)  # on rank 0: ``result`` itself
        if not rt.is_main:
            result.clear()
            result.update(main_result)
