"""Stages that train a classifier: fine-tune, supervised baseline, linear evaluation, distillation.

One task per kind, sharing a base (:class:`SupervisedTask`): a crop + flip view -> classifier ->
cross-entropy on the labels (fine-tuning, the supervised baseline), the same with a frozen encoder
(:class:`LinearEvalTask`), or the distillation loss against a fixed teacher that sees the same
view (:class:`DistillTask`) (docs/method.md §4-§6).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.config import (EVALUATE_DEFAULTS, DistillConfig, FinetuneConfig, LinearEvalConfig, RunConfig,
                             SupervisedConfig, check_sk)
from simclrv2.data import subset
from simclrv2.data.augment import EvalTransform, FinetuneAugment, active_view_transforms
from simclrv2.distributed import global_count_share, wrap_model
from simclrv2.engine import Task, batch_rows, fit
from simclrv2.errors import ConfigError, DataError
from simclrv2.losses import DistillationLoss, part_of_mean
from simclrv2.checkpoint import CheckpointMeta, load_model
from simclrv2.models import Classifier, ModelSpec, build_model, count_params, model_spec, set_activation_checkpointing
from simclrv2.rundir import StageRun
from simclrv2.runtime import Runtime, init_runtime, log
from simclrv2.stages.common import (
    check_compatible, evaluate_classifier, finish, log_result, prepare_data, stage_function, to_device,
)


class SupervisedTask(Task):
    """Cross-entropy on the labels of a crop + flip view of each image (docs/method.md §4): fine-tuning
    and the supervised baseline; the base of the other classifier tasks."""

    global_bn = True  # BatchNorm statistics over all processes (when --sync-bn)

    def __init__(self, model: Classifier, cfg: RunConfig, image_size: int, rt: Runtime):
        self.model, self.cfg, self.rt = model, cfg, rt
        # the student / classifier only: a teacher runs without gradients (checkpointing would do nothing);
        # a frozen encoder runs in eval mode, where it does nothing either
        set_activation_checkpointing(model, cfg.activation_checkpointing)
        self.net = wrap_model(model, rt, cfg.sync_bn and self.global_bn, cfg.compile)
        self.augment = FinetuneAugment(image_size, crop_scale=(cfg.crop_min, 1.0), pad_crop=cfg.pad_crop,
                                       extra=active_view_transforms())

    def inputs(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.augment(images, generator, rows=batch_rows(images.shape[0], self.rt))  # drawn for the global batch
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def loss_of(self, x, labels, batch_labels):
        return part_of_mean(F.cross_entropy(self.net(x).float(), labels), len(labels), len(batch_labels)), {}


class LinearEvalTask(SupervisedTask):
    """The linear classifier alone on a frozen encoder and head, BatchNorm statistics frozen too
    (docs/method.md §4, linear evaluation)."""

    global_bn = False  # frozen BatchNorms normalise with their running statistics: nothing to share

    def __init__(self, model: Classifier, cfg: RunConfig, image_size: int, rt: Runtime):
        model.encoder.requires_grad_(False)
        model.head.requires_grad_(False)
        self.global_bn = model.feature_norm is not None  # (but a feature norm trains: shared, as any training BN)
        super().__init__(model, cfg, image_size, rt)

    def train(self):
        self.model.train()
        self.model.encoder.eval()
        self.model.head.eval()


class DistillTask(SupervisedTask):
    """The distillation loss against a fixed teacher that sees the same view (docs/method.md §6),
    mixed with the labels' cross-entropy when ``distill.alpha < 1``."""

    def __init__(self, model: Classifier, cfg: RunConfig, image_size: int, rt: Runtime, teacher: nn.Module,
                 distill: DistillationLoss, adapt_classifier: bool = False):
        super().__init__(model, cfg, image_size, rt)
        self.teacher = teacher.eval().requires_grad_(False)
        self.distill = distill
        if adapt_classifier:
            # A student that starts as a trained classifier (self-distillation from the teacher's weights): the
            # distillation loss's gradient on the logits is (P_S - P_T) / tau, at tau = 0.1 ten times the
            # cross-entropy's, and a classifier left out of LARS's adaptation then steps 10x too far at the
            # pretraining-sized lr (a student on a pretrained encoder fell to 55% from an 81% teacher). Adapted (and
            # decayed) like every other weight, its step no longer depends on the gradient's scale. A fresh
            # classifier (near-zero weights) stays out: LARS's step is proportional to ||w||, it would barely move.
            self.lars_excluded = ()

    def loss_of(self, x, labels, batch_labels):
        # the teacher first: its forward's buffers are freed before the student's activations pile up
        # (after them, this forward was ~50% slower on the CPU); the results are the same
        with torch.no_grad():
            teacher_logits = self.teacher(x)  # the same augmented view as the student
        logits = self.net(x)
        whole = len(labels) == len(batch_labels)
        # the labels' cross-entropy divides by the (global) batch's count of labelled images
        share = global_count_share(batch_labels >= 0) \
            if self.distill.alpha < 1.0 and (self.rt.distributed or not whole) else None
        return self.distill(logits, teacher_logits, labels, share, len(batch_labels)), {}


def _train_classifier(cfg: RunConfig, model: Classifier, data, rt: Runtime, train_set, out: Path,
                      meta: CheckpointMeta, label_fraction: float | None, run: StageRun | None = None,
                      task_class: type[SupervisedTask] = SupervisedTask, **task_kw) -> dict[str, Any]:
    stage = meta.stage
    check_compatible(meta, data, out)
    task = task_class(model, cfg, data.image_size, rt, **task_kw)
    fitted = fit(task, cfg, rt, train_set, out, meta, run)
    result: dict[str, Any] = {"stage": stage, "params": count_params(model), "seconds": fitted.seconds,
                              "label_fraction": label_fraction, "labeled_images": len(data.labeled)}
    if data.test is not None:
        result.update(evaluate_classifier(model, data.test, rt, data.image_size, cfg.eval_batch_size, cfg.workers))
    else:
        log.info(f"{stage}: no test images (--test-dir): no test accuracy")
    if data.val is not None:  # the split settings are chosen on (RESULTS.md: validation split)
        val = evaluate_classifier(model, data.val, rt, data.image_size, cfg.eval_batch_size, cfg.workers)
        result.update({f"val_{k}": v for k, v in val.items()}, val_images=len(data.val))
    finish(out, rt, result)
    log_result(stage, result)
    return result


def _meta(stage: str, spec, data, cfg, **lineage) -> CheckpointMeta:
    return CheckpointMeta(stage, spec, classes=data.classes, dataset=cfg.dataset, bit_depth=data.bit_depth, **lineage)


def _classifier_of(pretrained: ModelSpec, data, head_layer: int) -> ModelSpec:
    """The spec of a classifier on a pretrained model's encoder and its head up to ``head_layer``."""
    return pretrained.replace(kind="classifier", num_classes=len(data.classes), head_layer=head_layer, probe_norm=False,
                              image_size=data.image_size)


def _label_fraction(cfg: RunConfig, data) -> float:
    if not len(data.train):  # image folders without labelled images (distilling unlabeled images alone)
        return 0.0
    return len(data.labeled) / len(data.train) if cfg.subset_file or cfg.labels_per_class else cfg.label_fraction


def _classes_needed(stage: str, cfg: RunConfig, data, train_set) -> None:
    """Classification needs two classes (a batch larger than the training set is capped: optim.plan_steps)."""
    if len(data.classes) < 2:
        where = cfg.labeled_dir or cfg.data_dir if cfg.dataset == "imagefolder" else cfg.dataset
        layout = "DIR/CLASS" if cfg.labeled_dir else "train/CLASS"
        raise DataError(f"{stage}: {where} has {len(data.classes)} class ({', '.join(data.classes)}); classification "
                        f"needs at least 2 (one {layout} folder per class)")


def _require_head_layer(k: int, pmeta, source) -> None:
    n = pmeta.model.head_layers
    if not 0 <= k <= n:
        raise ConfigError(f"--head-layer {k} is not available: the pretrained model {source} has {n} head layers "
                          f"(0 to {n})")


@stage_function("finetune", "pretrained")
def finetune(cfg: FinetuneConfig, rt: Runtime, run: StageRun) -> dict[str, Any]:
    """Fine-tune a pretrained encoder + head up to layer k + linear classifier on the labeled subset."""
    out = run.out
    pretrained, pmeta = load_model(cfg.pretrained, "simclr")
    data = prepare_data(cfg, out if rt.is_main else None, with_unlabeled_split=False)
    _classes_needed("finetune", cfg, data, data.labeled)
    fraction = _label_fraction(cfg, data)
    k = cfg.head_layer if cfg.head_layer is not None else (1 if fraction <= 0.1 else 0)
    _require_head_layer(k, pmeta, cfg.pretrained)
    model = Classifier.from_pretrained(pretrained, len(data.classes), k)
    spec = _classifier_of(pmeta.model, data, k)
    model = to_device(model, rt, cfg.channels_last)
    meta = _meta("finetune", spec, data, cfg, pretrained=str(ckpt.resolve(cfg.pretrained)))
    return _train_classifier(cfg, model, data, rt, data.labeled, out, meta, fraction, run)


@stage_function("supervised")
def supervised(cfg: SupervisedConfig, rt: Runtime, run: StageRun) -> dict[str, Any]:
    """The baseline: the same encoder + linear classifier trained from scratch on the labeled subset."""
    out = run.out
    data = prepare_data(cfg, out if rt.is_main else None, with_unlabeled_split=False)
    _classes_needed("supervised", cfg, data, data.labeled)
    spec = model_spec("classifier", depth=cfg.depth, width=cfg.width, sk=cfg.sk, small_images=data.small_images,
                      in_channels=data.channels, head_layers=0, num_classes=len(data.classes), head_layer=0,
                      image_size=data.image_size)
    model = to_device(build_model(spec), rt, cfg.channels_last)
    return _train_classifier(cfg, model, data, rt, data.labeled, out, _meta("supervised", spec, data, cfg),
                             _label_fraction(cfg, data), run)


@stage_function("linear_eval", "pretrained")
def linear_eval(cfg: LinearEvalConfig, rt: Runtime, run: StageRun) -> dict[str, Any]:
    """Linear classifier on a frozen pretrained encoder (BN statistics frozen too)."""
    out = run.out
    pretrained, pmeta = load_model(cfg.pretrained, "simclr")
    data = prepare_data(cfg, out if rt.is_main else None, with_unlabeled_split=False)
    _classes_needed("linear-eval", cfg, data, data.labeled)
    _require_head_layer(cfg.head_layer, pmeta, cfg.pretrained)
    norm = _feature_norm(cfg, pretrained, data, rt)
    model = Classifier.from_pretrained(pretrained, len(data.classes), cfg.head_layer, feature_norm=norm)
    spec = _classifier_of(pmeta.model, data, cfg.head_layer).replace(feature_norm=norm)
    model = to_device(model, rt, cfg.channels_last)
    meta = _meta("linear_eval", spec, data, cfg, pretrained=str(ckpt.resolve(cfg.pretrained)))
    return _train_classifier(cfg, model, data, rt, data.labeled, out, meta, _label_fraction(cfg, data),
                             run, LinearEvalTask)


def _feature_norm(cfg: LinearEvalConfig, pretrained: nn.Module, data, rt: Runtime) -> bool:
    """``--feature-norm`` (docs/method.md §8): on, off, or auto: on when BatchNorm's running statistics do not describe the
    frozen encoder, i.e. its features in evaluation mode (running statistics) differ in scale from its
    features in training mode (the batch's statistics) by more than 2x (4x in mean squared norm), on
    the first 256 labelled images (evaluation view). Short pretraining leaves the running statistics
    behind the weights: on a digits folder at 224 px after 10 steps the evaluation-mode features were
    11x too large (mean squared norm 131x), and the linear classifier's loss rose past 200 at the
    presets' learning rates. A converged encoder (Fashion-MNIST, cpu-demo: 0.93x) keeps it off."""
    if cfg.feature_norm != "auto":
        return cfg.feature_norm == "on"
    k = cfg.head_layer
    first = subset(data.labeled, np.arange(min(256, len(data.labeled))))
    x, _ = first.get_batch(np.arange(len(first)))
    views = EvalTransform(data.image_size)(x.to(rt.device))

    def energy(model: nn.Module) -> float:
        with torch.no_grad(), rt.autocast():
            f = model.head.hiddens(model.encoder(views))[k]
        return float(f.double().pow(2).sum(1).mean())

    was_training = pretrained.training
    ratio = energy(pretrained.to(rt.device).eval()) / max(energy(copy.deepcopy(pretrained).train()), 1e-30)
    pretrained.train(was_training)
    on = not 0.25 <= ratio <= 4.0
    if on:
        log.info(f"linear_eval: the frozen features' mean squared norm is {ratio:.3g}x their batch-statistics value "
                 "(BatchNorm's running statistics lag the encoder): the classifier reads them through a BatchNorm "
                 "(--feature-norm auto)")
    return on


@stage_function("distill", "teacher")
def distill(cfg: DistillConfig, rt: Runtime, run: StageRun) -> dict[str, Any]:
    """Distil a fixed fine-tuned teacher into a student on all training images (labeled + unlabeled)."""
    out = run.out
    teacher, tmeta = load_model(cfg.teacher, "classifier")
    tspec = tmeta.model
    depth = cfg.depth or tspec.depth
    check_sk(depth, cfg.sk)  # before any data work: --sk asked for a student of its teacher's depth 18/34
    data = prepare_data(cfg, out if rt.is_main else None)
    _classes_needed("distill", cfg, data, data.all_images())
    check_compatible(tmeta, data, ckpt.resolve(cfg.teacher))
    width = cfg.width or tspec.width
    sk = tspec.selective_kernel if cfg.sk is None else cfg.sk  # the presets' sk: all three SK-ResNet options
    same = (depth, width, sk) == (tspec.depth, tspec.width, tspec.selective_kernel)
    tau = cfg.temperature if cfg.temperature is not None else (0.1 if same else 1.0)
    spec = model_spec("classifier", depth=depth, width=width, sk=sk, small_images=data.small_images,
                      in_channels=data.channels, num_classes=len(data.classes), head_layers=0, head_layer=0,
                      image_size=data.image_size)
    source, smeta = load_model(cfg.init_from) if cfg.init_from else (None, None)
    # A fine-tuned classifier of the student's architecture and classes is copied whole (its kept head
    # layers and classifier too), so the student starts as that model rather than with a fresh
    # classifier on a trained encoder, which the first steps at full lr would wreck; any other
    # source (a pretrained model, a different classifier) gives the encoder only.
    sspec = smeta.model if smeta else None
    whole = (sspec is not None and sspec.kind == "classifier" and sspec.num_classes == len(data.classes)
             and sspec.same_encoder(spec))
    if whole:
        spec = spec.replace(head_layers=sspec.head_layers, proj_dim=sspec.proj_dim, head_layer=sspec.head_layer)
    student = build_model(spec)
    if source is not None:
        try:
            if whole:
                student.load_state_dict(source.state_dict())
            else:
                student.encoder.load_state_dict(source.encoder.state_dict())
        except RuntimeError:
            raise ConfigError(f"--init-from {cfg.init_from}: its encoder does not match the student (depth {depth}, width {width}, sk {sk})") from None
    student = to_device(student, rt, cfg.channels_last)
    teacher = to_device(teacher, rt, cfg.channels_last)
    meta = _meta("distill", spec, data, cfg, teacher=str(ckpt.resolve(cfg.teacher)), temperature=tau,
                 self_distillation=same)
    log.info(f"distill: {'self-distillation' if same else 'big-to-small'} tau={tau} alpha={cfg.alpha} "
             f"on {len(data.all_images())} images")
    result = _train_classifier(cfg, student, data, rt, data.all_images(), out, meta, _label_fraction(cfg, data),
                               run, DistillTask, teacher=teacher, distill=DistillationLoss(tau, cfg.alpha),
                               adapt_classifier=whole)
    return result


def evaluate(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
             split: str = EVALUATE_DEFAULTS["split"], device: str = EVALUATE_DEFAULTS["device"],
             precision: str = EVALUATE_DEFAULTS["precision"], batch_size: int = EVALUATE_DEFAULTS["batch_size"],
             workers: int = EVALUATE_DEFAULTS["workers"]) -> dict[str, Any]:
    """Top-1 / top-5 (percent) of a classifier checkpoint on a dataset split."""
    from simclrv2.data import load_dataset
    from simclrv2.data.folders import folder_dataset

    model, meta = load_model(checkpoint, "classifier")
    source = ckpt.resolve(checkpoint)
    if not (dataset or meta.dataset):
        raise ConfigError(f"{source}: the checkpoint does not name its dataset; pass --dataset")
    rt = init_runtime(device, precision)
    name = dataset or meta.dataset
    if name == "imagefolder":  # decoded as the run decoded them, from its own folders unless --data-dir
        run_config = meta.config or {}
        config = run_config if data_dir is None and run_config else {"data_dir": data_dir,
                                                                      "decode_scale": run_config.get("decode_scale")}
        ds = folder_dataset(config, split, meta.image_size, meta.model.in_channels, meta.bit_depth)
    else:
        ds = load_dataset(name, split, data_dir, meta.image_size)
    spec = meta.model
    if ds.channels != spec.in_channels or len(ds.classes) != spec.num_classes:
        raise ConfigError(f"{source}: model expects {spec.in_channels}-channel images and "
                          f"{spec.num_classes} classes; {ds.name} {split} has {ds.channels} and {len(ds.classes)}")
    size = meta.image_size or ds.image_size
    result = evaluate_classifier(model, ds, rt, size, batch_size, workers)
    result.update(checkpoint=str(source), dataset=ds.name, split=split, images=len(ds))
    return result


__all__ = ["DistillTask", "LinearEvalTask", "SupervisedTask", "distill", "evaluate", "finetune", "linear_eval", "supervised"]
