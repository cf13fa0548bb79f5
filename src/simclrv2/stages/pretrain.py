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
from simclrv2.engine import Accumulation, Task, batch_rows, fit, knn_accuracy, micro_batch_rows, predict
from simclrv2.losses import NTXentLoss
from simclrv2.models import (SimCLRModel, build_model, count_params, frozen_batchnorm_statistics, model_spec,
                             set_activation_checkpointing)
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
    """Two augmented views per image -> encoder + head -> NT-Xent; optional EMA memory queue and online probe.
    With ``--accumulate K`` a step is :class:`CachedEmbeddings`' two passes over K micro-batches."""

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
        keys = None
        if self.memory is not None:
            # the keys first: their forward's buffers are freed before the main forward's activations
            # pile up (after it, this forward was ~30% slower on the CPU); the results are the same
            keys = self._pending_keys = self.memory.keys(v)
        h, z, probe_logits = self.net(v, probe=True)
        z_a, z_b = z.float().chunk(2)
        loss, parts = self.contrastive(z_a, z_b, keys)
        if probe_logits is not None:
            y = torch.cat([labels, labels])
            probe_loss = self.probe_loss(probe_logits, y, global_count_share(y >= 0))
            loss = loss + probe_loss
            parts["probe_loss"] = probe_loss.detach()
        return loss, parts

    def contrastive(self, z_a: torch.Tensor, z_b: torch.Tensor, keys: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The NT-Xent of the batch's projections ``z_a`` (view 1 of every image) and ``z_b`` (view 2),
        and with the memory queue its second term (``keys``: the EMA keys, [view 1; view 2])."""
        loss = self.criterion(z_a, z_b)
        parts = {"contrastive": loss.detach()}
        if self.memory is not None:
            # the queue's negatives enter a second NT-Xent whose positive is the EMA key of the other view, so
            # that no softmax mixes online and EMA outputs (when it did, the encoder learned to tell the two apart
            # instead of the images: see losses.NTXentLoss); the two terms averaged
            memory = self.criterion(z_a, z_b, self.memory.negatives(), keys=keys.chunk(2))
            parts["memory"] = memory.detach()
            loss = (loss + memory) / 2
        return loss, parts

    @staticmethod
    def probe_loss(logits: torch.Tensor, y: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The online probe's cross-entropy summed over the labelled views (label >= 0) and divided by
        ``count``: the (global) batch's count of them, per process, so that DDP's average is its mean.
        A masked sum keeps the probe in the graph even when a batch has no labels (DDP needs that)."""
        ce = F.cross_entropy(logits.float(), y.clamp_min(0), reduction="none")
        return (ce * (y >= 0)).sum() / count

    def accumulation(self, images, labels, generator, k):
        return CachedEmbeddings(self, images, labels, generator, k)

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


class CachedEmbeddings(Accumulation):
    """Pretraining's step as ``k`` micro-batches with the NT-Xent of the whole batch (``--accumulate K``,
    docs/method.md §4): the cached-embedding two-pass step of GradCache (Gao et al. 2021, "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup").

    Every view's negatives are all the other views of the (global) batch, so the loss is no sum of
    per-micro-batch terms. Pass 1 (here, without gradients) computes the projections z of every
    micro-batch (and their EMA keys with the memory queue); the NT-Xent of the whole batch on them
    (with the queue's negatives, and under DDP the other processes' views) gives dL/dz, kept. Pass 2
    (:meth:`micro_loss`) runs each micro-batch's forward again, with gradients, and backpropagates its
    slice of dL/dz (the loss ``Σ z_j · dL/dz_j``, whose gradient is the chain rule's), plus its part of
    the online probe's loss (the probe's cross-entropy is a mean over the batch's labelled views).
    The gradients sum to those of one pass over the whole batch, but for BatchNorm: each micro-batch
    is normalised by its own statistics, as on K devices without global BN (global BN's statistics
    of the whole batch cannot be had without holding every micro-batch's activations). Running
    statistics are updated once per micro-batch, in pass 1 (pass 2 runs under
    :func:`frozen_batchnorm_statistics`). The views of the whole batch are drawn once, as in one pass,
    and the EMA keys are queued once per batch (``after_step``). The cost: one more forward, about
    1/3 more compute than one pass.
    """

    def __init__(self, task: ContrastiveTask, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 k: int):
        self.task, self.labels = task, labels
        self.views = task.views(images, generator)  # [view 1 of every image; view 2]
        self.rows = micro_batch_rows(images.shape[0], k)
        m = images.shape[0] // k
        # pass 1: every micro-batch's projections (the running BN statistics updated here, once per micro-batch)
        zs, micro_keys = [], []
        with torch.no_grad(), task.rt.autocast():
            for j in range(k):
                x = self.micro_views(j)
                if task.memory is not None:
                    micro_keys.append(task.memory.keys(x))
                _, z, _ = task.net(x, probe=True)
                zs.append(z.float())
        z_a = torch.cat([z[:m] for z in zs]).requires_grad_()
        z_b = torch.cat([z[m:] for z in zs]).requires_grad_()
        keys = None
        if task.memory is not None:  # in one pass's order, [view 1 of every image; view 2], for the loss and the queue
            keys = task._pending_keys = torch.cat([key[:m] for key in micro_keys] + [key[m:] for key in micro_keys])
        # the whole batch's loss and its gradient with respect to the projections
        loss, self.parts = task.contrastive(z_a, z_b, keys)
        self.grad_a, self.grad_b = torch.autograd.grad(loss, [z_a, z_b])
        self.loss = loss.detach()
        y = torch.cat([labels, labels])
        self.probe_count = global_count_share(y >= 0) if task.model.probe is not None else None
        self.probe_sum = None

    def micro_views(self, j: int) -> torch.Tensor:
        """Both views of micro-batch j's images, [view 1; view 2]: one BatchNorm population, as in one pass."""
        rows, n = self.rows[j], self.labels.shape[0]
        x = torch.cat([self.views[rows], self.views[n:][rows]])
        return x.contiguous(memory_format=torch.channels_last) if self.task.channels_last else x

    def micro_loss(self, j: int) -> torch.Tensor:
        """Pass 2 of micro-batch j: its forward again, with gradients; its slice of dL/dz and its part of the probe's loss."""
        task, rows = self.task, self.rows[j]
        with frozen_batchnorm_statistics(task.model):
            _, z, probe_logits = task.net(self.micro_views(j), probe=True)
        z_a, z_b = z.float().chunk(2)
        loss = (z_a * self.grad_a[rows]).sum() + (z_b * self.grad_b[rows]).sum()
        if probe_logits is not None:
            y = self.labels[rows]
            probe_loss = task.probe_loss(probe_logits, torch.cat([y, y]), self.probe_count)
            self.probe_sum = probe_loss.detach() if self.probe_sum is None else self.probe_sum + probe_loss.detach()
            loss = loss + probe_loss
        return loss

    def result(self):
        loss, parts = self.loss, dict(self.parts)
        if self.probe_sum is not None:
            loss = loss + self.probe_sum
            parts["probe_loss"] = self.probe_sum
        return loss, parts


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
