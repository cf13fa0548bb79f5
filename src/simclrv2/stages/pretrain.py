"""Stage 1: task-agnostic contrastive pretraining (SimCLRv2, docs/method.md §2-§5)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.checkpoint import CheckpointMeta
from simclrv2.config import PretrainConfig
from simclrv2.data.augment import EvalTransform, PretrainAugment, active_view_transforms
from simclrv2.distributed import gather_with_grad, global_count_share, wrap_model
from simclrv2.engine import Task, batch_rows, fit, knn_accuracy, predict
from simclrv2.losses import NTXentLoss
from simclrv2.models import SimCLRModel, build_model, count_params, model_spec, set_activation_checkpointing
from simclrv2.rundir import StageRun
from simclrv2.runtime import Runtime
from simclrv2.stages.common import Data, finish, log_result, prepare_data, stage_function, to_device


class MemoryQueue(nn.Module):
    """The memory of pretraining with ``--memory-size`` (MoCo-style): an EMA copy of the model
    (``ema``, without gradients) and a FIFO queue of its normalised keys (buffers ``queue``,
    ``queue_len``: filled slots, ``queue_ptr``: the next slot to write). Its state_dict is what a
    resume point stores under ``extra.`` (:class:`simclrv2.engine.Task`), so a resumed run
    continues with the same EMA weights and queue."""

    def __init__(self, model: nn.Module, size: int, dim: int, decay: float, device: torch.device):
        super().__init__()
        self.decay = decay
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("queue", torch.zeros(size, dim, device=device))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self._filled, self._ptr = 0, 0  # the same as Python ints: no device sync per step
        self.register_load_state_dict_post_hook(MemoryQueue._read_counters)

    @staticmethod
    def _read_counters(module: MemoryQueue, incompatible_keys) -> None:
        module._filled, module._ptr = int(module.queue_len), int(module.queue_ptr)

    def negatives(self) -> torch.Tensor | None:
        """The filled part of the queue (None while empty)."""
        return self.queue[: self._filled] if self._filled else None

    @torch.no_grad()
    def keys(self, views: torch.Tensor) -> torch.Tensor:
        """The EMA model's normalised projections of ``views``."""
        _, keys = self.ema(views)
        return F.normalize(keys.float(), dim=1)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s weights (its buffers, e.g. BN statistics, copied)."""
        ema_params = list(self.ema.parameters())
        torch._foreach_mul_(ema_params, self.decay)
        torch._foreach_add_(ema_params, list(model.parameters()), alpha=1 - self.decay)
        torch._foreach_copy_(list(self.ema.buffers()), list(model.buffers()))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[0]
        keys = keys[-size:]
        n = keys.shape[0]
        idx = (torch.arange(n, device=keys.device) + self._ptr) % size
        self.queue[idx] = keys
        self._ptr, self._filled = (self._ptr + n) % size, min(size, self._filled + n)
        self.queue_ptr.fill_(self._ptr)
        self.queue_len.fill_(self._filled)


class ContrastiveTask(Task):
    """Two augmented views per image -> encoder + head -> NT-Xent; optional EMA memory queue and online probe."""

    def __init__(self, model: SimCLRModel, cfg: PretrainConfig, data: Data, rt: Runtime):
        self.model, self.cfg, self.data, self.rt = model, cfg, data, rt
        # a training-time switch of the encoder (before the EMA copy: that one runs without gradients, where
        # checkpointing does nothing); the model's structure and state_dict stay the same
        set_activation_checkpointing(model, cfg.activation_checkpointing)
        self.net = wrap_model(model, rt, cfg.sync_bn, cfg.compile)
        self.augment = PretrainAugment(data.image_size, crop_scale=(cfg.crop_min, 1.0), color_strength=cfg.color_strength,
                                       blur=cfg.blur, extra=active_view_transforms())
        self.criterion = NTXentLoss(cfg.temperature, gather_distributed=rt.distributed)
        self.channels_last = cfg.channels_last
        # after wrap_model: the copy shares its global BatchNorm conversion
        self.memory = MemoryQueue(model, cfg.memory_size, cfg.proj_dim, cfg.memory_decay, rt.device) \
            if cfg.memory_size else None
        self.extra = self.memory

    def views(self, images, generator):
        """[view 1; view 2] of this process's images: each view's parameters drawn for the global batch."""
        # both views in one batch (one BN population), as the official code; one augmentation call
        v = self.augment.views(images, generator, rows=batch_rows(images.shape[0], self.rt))
        return v.contiguous(memory_format=torch.channels_last) if self.channels_last else v

    def loss(self, images, labels, generator):
        v = self.views(images, generator)
        negatives = None
        if self.memory is not None:
            negatives = self.memory.negatives()
            # the keys first: their forward's buffers are freed before the main forward's activations
            # pile up (after it, this forward was ~30% slower on the CPU); the results are the same
            self._pending_keys = self.memory.keys(v)
        h, z, probe_logits = self.net(v, probe=True)
        z_a, z_b = z.float().chunk(2)
        contrastive = self.criterion(z_a, z_b)
        parts = {"contrastive": contrastive.detach()}
        if self.memory is not None:
            # the queue's negatives enter a second NT-Xent whose positive is the EMA key of the other view, so
            # that no softmax mixes online and EMA outputs (when it did, the encoder learned to tell the two apart
            # instead of the images: see losses.NTXentLoss); the two terms averaged
            memory = self.criterion(z_a, z_b, negatives, keys=self._pending_keys.chunk(2))
            parts["memory"] = memory.detach()
            contrastive = (contrastive + memory) / 2
        loss = contrastive
        if probe_logits is not None:
            y = torch.cat([labels, labels])
            labelled = y >= 0
            # masked mean keeps the probe in the graph even when a batch has no labels (DDP needs that);
            # the denominator is the global batch's count (per process) so that DDP's average is its mean
            ce = F.cross_entropy(probe_logits.float(), y.clamp_min(0), reduction="none")
            probe_loss = (ce * labelled).sum() / global_count_share(labelled)
            loss = loss + probe_loss
            parts["probe_loss"] = probe_loss.detach()
        return loss, parts

    @torch.no_grad()
    def after_step(self):
        if self.memory is None:
            return
        self.memory.update(self.model)
        # every rank enqueues the keys of all ranks, in the global batch's order [view 1 of all; view 2 of all]
        k1, k2 = self._pending_keys.chunk(2)
        self.memory.enqueue(torch.cat([gather_with_grad(k1)[0], gather_with_grad(k2)[0]]))

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        if not (cfg.knn_every and epoch % max(1, int(cfg.knn_every)) == 0) or not self.data.has_knn:
            return {}
        return {"knn": knn_eval(self.model.encoder, self.data, self.rt, cfg.knn_k, cfg.knn_train_size, cfg.eval_batch_size,
                                cfg.workers)}


def knn_eval(encoder, data: Data, rt: Runtime, k: int = 200, train_size: int = 10000, batch_size: int = 500,
             workers: int = 0) -> float:
    """kNN top-1 on the test split, neighbours from (a fixed subsample of) the labelled training split.

    A monitor of representation quality: it uses the training split's labels, which the
    semi-supervised stages never see. Under torchrun every process embeds its share of the images
    (call it on all processes); each gets the same result.
    """
    from simclrv2.data import subset

    n = len(data.train)
    idx = np.sort(np.random.default_rng(0).permutation(n)[: min(n, train_size)])
    transform = EvalTransform(data.image_size)
    tr, ytr = predict(encoder, subset(data.train, idx), rt, transform, batch_size, workers=workers)
    te, yte = predict(encoder, data.test, rt, transform, batch_size, workers=workers)
    return knn_accuracy(tr, ytr, te, yte, k=k, num_classes=len(data.classes))


@stage_function("pretrain")
def pretrain(cfg: PretrainConfig, rt: Runtime, run: StageRun) -> dict[str, Any]:
    """Pretrain a SimCLRv2 encoder + head on all training images; returns the stage's result."""
    out = run.out
    data = prepare_data(cfg, out if rt.is_main else None)
    spec = model_spec("simclr", depth=cfg.depth, width=cfg.width, sk=cfg.sk, small_images=data.small_images,
                      in_channels=data.channels, head_layers=cfg.head_layers, proj_dim=cfg.proj_dim,
                      num_classes=len(data.classes) if cfg.probe else None, probe_norm=cfg.probe, image_size=data.image_size)
    model = to_device(build_model(spec), rt, cfg.channels_last)
    task = ContrastiveTask(model, cfg, data, rt)
    meta = CheckpointMeta("pretrain", spec, classes=data.classes, dataset=cfg.dataset, bit_depth=data.bit_depth)
    fitted = fit(task, cfg, rt, data.all_images(), out, meta, run)
    # the last epoch's, when fit evaluated it (a run continued from its final checkpoint trained nothing here:
    # its last row is the resumed checkpoint's)
    knn = fitted.last_row.get("knn")
    if knn is None and data.has_knn:
        knn = knn_eval(model.encoder, data, rt, cfg.knn_k, cfg.knn_train_size, cfg.eval_batch_size, cfg.workers)
    result = {"stage": "pretrain", "knn": knn, "params": count_params(model), "seconds": fitted.seconds,
              "final_loss": fitted.last_row.get("loss")}
    finish(out, rt, result)
    log_result("pretrain", result)
    return result
