"""What the stages share: data preparation, checkpointed models, evaluation, stage results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.config import RunConfig
from simclrv2.data import ImageDataset, concat, load_dataset, split_labeled, write_subset_file
from simclrv2.data.augment import EvalTransform
from simclrv2.engine import predict, topk_accuracy
from simclrv2.errors import CheckpointError, ConfigError, DataError
from simclrv2.models import build_model
from simclrv2.runtime import Runtime, log


@dataclass
class Data:
    train: ImageDataset  # the whole training split, labels intact
    test: ImageDataset
    labeled: ImageDataset  # the class-balanced labeled subset
    unlabeled: ImageDataset  # everything else, labels hidden (-1): the rest of train + any unlabeled split
    image_size: int
    channels: int
    classes: list[str]

    @property
    def small_images(self) -> bool:
        return self.image_size <= 32

    def all_images(self) -> ImageDataset:
        """Labeled subset + unlabeled pool: what pretraining and distillation see."""
        return concat([self.labeled, self.unlabeled])


def prepare_data(cfg: RunConfig, out_dir: Path | None = None, with_unlabeled_split: bool = True) -> Data:
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.image_size)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.image_size)
    if cfg.label_fraction == 1.0 and cfg.labels_per_class is None and cfg.subset_file is None:
        labeled, unlabeled = train, None
    else:
        labeled, unlabeled = split_labeled(train, cfg.label_fraction, cfg.labels_per_class, cfg.seed, cfg.subset_file)
    pools = [unlabeled] if unlabeled is not None and len(unlabeled) else []
    if with_unlabeled_split:
        try:
            pools.append(load_dataset(cfg.dataset, "unlabeled", cfg.data_dir, cfg.image_size))
        except DataError:
            pass  # this dataset has no separate unlabeled split
    unl = concat(pools) if pools else _empty_like(labeled)
    if out_dir is not None:
        write_subset_file(Path(out_dir) / "labeled_subset.txt", list(labeled.ids))
    size = cfg.image_size or train.image_size
    if size is None:
        raise DataError(f"{cfg.dataset}: images have no fixed size; pass --image-size")
    return Data(train, test, labeled, unl, int(size), train.channels, list(train.classes))


def _empty_like(ds: ImageDataset) -> ImageDataset:
    from simclrv2.data import subset

    return subset(ds, [])


def load_model(path: str | Path, kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its checkpoint metadata; ``kind`` ('simclr' / 'classifier') is checked if given."""
    tensors, meta = ckpt.load_checkpoint(path)
    source = ckpt.resolve(path)
    spec = meta.get("model")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{source}: checkpoint JSON has no model spec")
    if kind is not None and spec.get("kind") != kind:
        expected = {"simclr": "a pretrained (pretrain/import-tf) checkpoint",
                    "classifier": "a classifier (finetune/distill/supervised) checkpoint"}[kind]
        raise CheckpointError(f"{source}: is a {spec.get('kind')!r} checkpoint of stage {meta.get('stage')!r}; expected {expected}")
    model = build_model(spec)
    ckpt.load_state(model, ckpt.subdict(tensors, "model."), source, f"{spec['kind']} model (depth {spec['depth']}, width {spec['width']})")
    return model, meta


def check_compatible(meta: dict[str, Any], data: Data, source: str | Path) -> None:
    spec = meta["model"]
    if spec.get("in_channels") != data.channels:
        raise CheckpointError(f"{source}: model takes {spec.get('in_channels')}-channel images but {data.classes and 'the dataset'} has {data.channels} channels")
    n = spec.get("num_classes")
    if spec.get("kind") == "classifier" and n != len(data.classes):
        raise CheckpointError(f"{source}: classifier has {n} classes but the dataset has {len(data.classes)}")


def evaluate_classifier(model: nn.Module, data: ImageDataset, rt: Runtime, image_size: int, batch_size: int = 500) -> dict[str, float]:
    logits, labels = predict(model.to(rt.device), data, rt, EvalTransform(image_size), batch_size)
    return topk_accuracy(logits, labels)


def stage_done(out_dir: Path) -> dict[str, Any] | None:
    """The final checkpoint's metadata if this stage already completed in ``out_dir``."""
    final = Path(out_dir) / "final.safetensors"
    if not final.exists():
        return None
    try:
        meta = ckpt.read_meta(final)
    except CheckpointError:
        return None
    return meta if meta.get("complete") and "result" in meta else None


def require(value: Any, option: str, stage: str) -> None:
    if not value:
        raise ConfigError(f"{stage}: --{option} is required")


def log_result(stage: str, result: dict[str, Any]) -> None:
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k in ("top1", "top5", "knn", "seconds")]
    log.info(f"{stage}: " + " ".join(parts))


def to_device(model: nn.Module, rt: Runtime, channels_last: bool) -> nn.Module:
    model = model.to(rt.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def finish(out: Path, rt: Runtime, result: dict[str, Any]) -> None:
    """Store the stage result in final.json/final.safetensors metadata (rewritten atomically)."""
    if not rt.is_main:
        return
    tensors, meta = ckpt.load_checkpoint(out / "final.safetensors")
    meta["result"] = result
    ckpt.save_checkpoint(out / "final", tensors, meta)
