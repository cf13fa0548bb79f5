"""The one training loop every stage uses.

A stage supplies a :class:`Task` (what one step computes); :class:`Trainer` does the rest: data order,
learning-rate schedule, optimiser, precision, DDP, logging and progress, atomic checkpoints,
resume, and the divergence check. Everything that decides a step's result is a function of
(seed, step), so a resumed run replays exactly the schedule, data order and augmentations of an
uninterrupted one.

Under torchrun the same holds across processes: rank r of N trains on rows ``r·b:(r+1)·b`` of
each global batch (b = batch / N), with the augmentation parameters of those rows drawn as one
process would draw them for the whole global batch (:func:`step_generator`,
:func:`batch_rows`), so N processes compute the update of one process (see
:mod:`simclrv2.distributed` for the loss and gradient side).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclrv2 import checkpoint as ckpt
from simclrv2.config import RunConfig, dump, to_dict
from simclrv2.data import ImageDataset
from simclrv2.data.batch import collate_images
from simclrv2.distributed import all_reduce_mean, gather_rows, same_on_all_ranks
from simclrv2.errors import CheckpointError, ConfigError, DivergenceError
from simclrv2.metrics import MetricsWriter
from simclrv2.optim import CLASSIFIER_PREFIXES, LARS, WarmupCosine, param_groups, plan_steps, scale_lr, set_lr
from simclrv2.runtime import Runtime, log


class Task:
    """What a stage trains. Subclasses set ``model`` and implement either ``inputs`` and ``loss_of``
    (a loss that is a mean over the batch's images: the classifier stages) or ``loss`` and
    ``accumulation`` (pretraining's NT-Xent, whose every image is every other's negative).

    ``net`` is what the step calls: ``model`` itself, or its DDP wrapper under torchrun.

    ``loss`` gets this process's slice of the global batch and the step's ``generator``, which is
    the same on every process: augmentations draw their parameters for the whole global batch
    from it and apply this process's rows (``batch_rows(len(images), rt)``), so the views do
    not depend on the number of processes. A loss must be a mean over this process's equal
    share of the global batch's terms (DDP averages the gradients over processes).

    ``accumulation`` serves ``--accumulate K`` (:func:`accumulate_gradients`): the step's batch
    as K micro-batches whose gradients add up to the batch's.
    """

    model: nn.Module
    net: nn.Module
    # what a resume point stores beside the model and the optimiser (e.g. pretraining's memory queue):
    # a module whose state_dict goes to the checkpoint's ``extra.*`` tensors
    extra: nn.Module | None = None
    # parameter-name prefixes that LARS neither decays nor adapts (biases and BN parameters never are):
    # the linear classifiers, as the official head_supervised (:func:`simclrv2.optim.param_groups`)
    lars_excluded: tuple[str, ...] = CLASSIFIER_PREFIXES

    def inputs(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The model inputs of this process's images, one row each: the augmented views, their
        parameters drawn for the global batch."""
        raise NotImplementedError

    def loss_of(self, x: torch.Tensor, labels: torch.Tensor, batch_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the rows ``x`` (with ``labels``) as their part of the loss of the batch they
        belong to, whose labels are ``batch_labels``: a mean over the rows weighted by their share
        of the batch (:func:`simclrv2.losses.part_of_mean`), a mean over the labelled rows divided by the
        batch's count. Summed over the micro-batches of a batch, the batch's loss."""
        raise NotImplementedError

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and its logged parts, in one pass."""
        return self.loss_of(self.inputs(images, generator), labels, labels)

    def accumulation(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, k: int) -> Accumulation:
        """The step's batch as ``k`` micro-batches (default: :class:`MeanAccumulation`)."""
        return MeanAccumulation(self, images, labels, generator, k)

    def train(self) -> None:
        """Put the model in training mode (stages with frozen parts override)."""
        self.model.train()

    def after_step(self) -> None:
        """Called after each optimiser step (EMA updates, queues)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {}


class Accumulation:
    """One step's batch as ``k`` micro-batches of equal size (``--accumulate K``): what
    :func:`accumulate_gradients` backpropagates one after the other. Made by ``Task.accumulation``,
    after which the augmented views of the whole batch exist (drawn once, as in one pass)."""

    def micro_loss(self, j: int) -> torch.Tensor:
        """Micro-batch ``j``'s differentiable loss: its gradient is micro-batch j's part of the batch's."""
        raise NotImplementedError

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and parts (no gradient), as ``Task.loss`` logs them; after the last micro-batch."""
        raise NotImplementedError


def micro_batch_rows(batch: int, k: int) -> list[slice]:
    """The rows of each of ``k`` equal micro-batches of a batch of ``batch`` rows."""
    m = batch // k
    return [slice(j * m, (j + 1) * m) for j in range(k)]


class MeanAccumulation(Accumulation):
    """A loss that is a mean over the batch's images (cross-entropy, distillation): the views of the
    whole batch are computed once (``task.inputs``, the same views as in one pass), and micro-batch
    j's loss is ``task.loss_of`` its rows, weighted as their part of the batch's mean, so the
    gradients sum to the batch's. Exact up to BatchNorm, which normalises each micro-batch by its
    own statistics (docs/method.md §4, gradient accumulation)."""

    def __init__(self, task: Task, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, k: int):
        self.task, self.labels = task, labels
        self.x = task.inputs(images, generator)
        self.rows = micro_batch_rows(labels.shape[0], k)
        self.sums: torch.Tensor | None = None  # the micro-batches' loss and parts, summed
        self.parts: list[str] = []

    def micro_loss(self, j: int) -> torch.Tensor:
        rows = self.rows[j]
        loss, parts = self.task.loss_of(self.x[rows], self.labels[rows], self.labels)
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        self.sums = values if self.sums is None else self.sums + values
        self.parts = list(parts)
        return loss

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.sums[0], dict(zip(self.parts, self.sums[1:]))


@dataclass
class FitResult:
    out_dir: Path
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    last_row: dict[str, Any] = field(default_factory=dict)  # the last step's logged row, this run's or the resumed one's


def step_generator(seed: int, step: int, device: torch.device | None = None) -> torch.Generator:
    """The augmentation RNG of one step: a CPU generator, a pure function of (seed, step), the
    same on every process (each draws for the global batch and keeps its rows, :func:`batch_rows`)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7_919) % (2**63))
    return g


def batch_rows(local_batch: int, rt: Runtime) -> tuple[int, int]:
    """(offset, total): this process's images are rows ``offset:offset+local_batch`` of a global
    batch of ``total`` rows (the slicing of :class:`BatchStream`)."""
    return rt.rank * local_batch, local_batch * rt.world_size


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchStream:
    """The global batches of an epoch in a seeded order; each process takes its own slice.

    In-memory datasets are indexed directly (one vectorised gather per batch); on-disk ones are
    decoded by DataLoader worker processes.
    """

    def __init__(self, data: ImageDataset, global_batch: int, seed: int, rt: Runtime, workers: int):
        self.data, self.global_batch, self.seed, self.rt, self.workers = data, global_batch, seed, rt, workers
        self.local_batch = global_batch // rt.world_size
        self.steps_per_epoch = len(data) // global_batch

    def _local_indices(self, epoch: int, first: int) -> list[np.ndarray]:
        order = epoch_order(len(self.data), self.seed, epoch)
        out = []
        for i in range(first, self.steps_per_epoch):
            batch = order[i * self.global_batch:(i + 1) * self.global_batch]
            out.append(batch[self.rt.rank * self.local_batch:(self.rt.rank + 1) * self.local_batch])
        return out

    def epoch(self, epoch: int, first: int = 0):
        return load_batches(self.data, self._local_indices(epoch, first), self.rt, self.workers)


def load_batches(data: ImageDataset, batches: list[np.ndarray], rt: Runtime, workers: int):
    """(images, labels) of each index array in ``batches``, on ``rt.device``: in-memory datasets are
    indexed directly (one vectorised gather per batch); on-disk ones are decoded by ``workers``
    DataLoader worker processes, ahead of the loop."""
    pin = rt.device.type == "cuda"
    if data.in_memory:
        for idx in batches:
            images, labels = data.get_batch(idx)
            yield images.to(rt.device, non_blocking=pin), labels.to(rt.device, non_blocking=pin)
        return
    # its own generator: the DataLoader would otherwise draw its workers' seed from the global RNG
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=[b.tolist() for b in batches], num_workers=workers, pin_memory=pin,
        persistent_workers=False, prefetch_factor=4 if workers else None, generator=torch.Generator(),
        collate_fn=collate_images if data.variable_size else None,  # image folders: ImageBatch es
    )
    for images, labels in loader:
        yield images.to(rt.device, non_blocking=pin), labels.to(rt.device, non_blocking=pin)


def build_optimizer(model: nn.Module, cfg: RunConfig, lars_excluded: tuple[str, ...] = CLASSIFIER_PREFIXES) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, lars_excluded)
    probe_scale = getattr(cfg, "probe_lr_scale", 1.0)
    probe = [p for n, p in model.named_parameters() if n.startswith("probe.") and p.requires_grad]
    if probe and probe_scale != 1.0:
        # the monitoring probe sees a few labeled images per batch (2-3 of 256 at 1% labels): at the
        # encoder's LARS-sized lr, plain momentum SGD on it overshoots (probe losses in the tens to hundreds)
        ids = {id(p) for p in probe}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups.append({"params": probe, "weight_decay": 0.0, "layer_adaptation": False, "lr_scale": probe_scale})
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=0.9)
    for g in groups:
        g.pop("layer_adaptation")
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, nesterov=True)


def optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    index = {id(p): i for i, p in enumerate(params)}
    return {f"optim.{index[id(p)]}": s["momentum_buffer"] for p, s in opt.state.items() if s.get("momentum_buffer") is not None}


def load_optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    for k, v in ckpt.subdict(tensors, "optim.").items():
        p = params[int(k)]
        opt.state[p]["momentum_buffer"] = v.to(p.device, p.dtype).clone()


class Progress:
    """A tqdm bar on a terminal; plain log lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool, log_every: int):
        self.bar = None
        self.log_every = log_every
        self.enabled = enabled
        if enabled and sys.stderr.isatty() and log.isEnabledFor(20):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, leave=True)
        self.desc = desc
        self.total = total
        self.start, self.t0 = start, time.perf_counter()

    def update(self, step: int, info: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if info:  # logged steps carry epoch, loss, lr, images/s; the others keep the last values shown
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            items = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            left = int((self.total - step) / rate) if rate > 0 else 0
            eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
            log.info(f"{self.desc} step {step}/{self.total} {items} eta={eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _divergence_advice(last: Path) -> str:
    step = ckpt.step_of(last) if last.exists() else None
    kept = f"the last good checkpoint {last} (step {step}) is kept" if step is not None else "no checkpoint was written"
    return f"{kept}; try a lower --lr (with --resume to continue from it), --precision fp32, or check the data"


def train_step(task: Task, opt: torch.optim.Optimizer, rt: Runtime, images: torch.Tensor, labels: torch.Tensor,
               lr: float, generator: torch.Generator, scaler=None, accumulate: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step at learning rate ``lr`` (:meth:`Trainer.step` adds the schedule and
    the bookkeeping): loss, backward, update, ``task.after_step()``; returns ``task.loss``'s (loss, parts).

    ``accumulate`` > 1: the gradient of the batch's loss in that many micro-batches
    (:func:`accumulate_gradients`), then the one update.

    ``scaler`` (fp16, :meth:`Runtime.grad_scaler`): the loss is scaled before backward and the
    gradients unscaled before the optimiser sees them (LARS's trust ratio included); a step whose
    gradients overflowed is skipped and the scale lowered, as ``torch.amp.GradScaler`` does."""
    set_lr(opt, lr)
    backward = (lambda loss: loss.backward()) if scaler is None else (lambda loss: scaler.scale(loss).backward())
    if accumulate == 1:
        with rt.autocast():
            loss, parts = task.loss(images, labels, generator)
        opt.zero_grad(set_to_none=True)
        backward(loss)
    else:
        opt.zero_grad(set_to_none=True)
        loss, parts = accumulate_gradients(task, rt, images, labels, generator, accumulate, backward)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    task.after_step()
    return loss, parts


def accumulate_gradients(task: Task, rt: Runtime, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                         k: int, backward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gradient accumulation (``--accumulate K``, docs/method.md §4): the gradient of the batch's loss
    from ``k`` micro-batches of B/k images, backpropagated one after the other (``backward(loss)``)
    and summed in the parameters' ``.grad``, so that only one micro-batch's activations are held
    at a time. ``task.accumulation`` prepares the step (the views of the whole batch, drawn once;
    pretraining's first pass, :class:`simclrv2.stages.pretrain.CachedEmbeddings`). Under DDP only
    the last micro-batch's backward all-reduces the gradients. Returns the batch's (loss, parts)."""
    step = task.accumulation(images, labels, generator, k)
    for j in range(k):
        with _gradient_sync(task.net, last=j == k - 1):
            with rt.autocast():
                loss = step.micro_loss(j)
            backward(loss)
    return step.result()


def _gradient_sync(net: nn.Module, last: bool):
    """DDP's ``no_sync()`` but for the last micro-batch (its backward all-reduces the summed gradients)."""
    no_sync = getattr(net, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


_STEP_HOOKS: list = []


@contextlib.contextmanager
def step_hook(fn):
    """``with step_hook(fn): ...``: every :class:`Trainer` in the block calls ``fn(trainer)`` after
    each optimisation step (the update and ``task.after_step()`` done, ``trainer.step_count``
    counting it; nothing of it logged or checkpointed yet). For watching training, or for
    stopping it at a chosen step: an exception raised there ends the run as a kill at that
    instant would (the tests' interruptions)."""
    _STEP_HOOKS.append(fn)
    try:
        yield fn
    finally:
        _STEP_HOOKS.remove(fn)


class Trainer:
    """The loop every stage runs, in named phases::

        trainer = Trainer(task, cfg, rt, data, out_dir, meta, run)  # the plan: batches, schedule, optimiser
        trainer.resume()                      # continue the run in out_dir, or start it afresh
        for images, labels in trainer.batches():
            trainer.step(images, labels)      # one optimisation step
            trainer.log()                     # at log / checkpoint / epoch boundaries: metrics, last.*
        trainer.close()
        result = trainer.finish()             # final.*

    :meth:`fit` runs exactly that. ``meta`` (stage, model spec, classes, ...) is the metadata of
    every checkpoint, with the progress (step, metrics, ...) filled in at each save. ``run``: the
    stage's :class:`simclrv2.rundir.StageRun`, whose decision says whether to continue the run in
    ``out_dir``; without one, ``cfg.resume`` does. ``bench/run.py`` times :meth:`step`.
    """

    def __init__(self, task: Task, cfg: RunConfig, rt: Runtime, data: ImageDataset, out_dir: str | Path,
                 meta: ckpt.CheckpointMeta, run=None):
        self.task, self.cfg, self.rt, self.meta, self.run = task, cfg, rt, meta, run
        self.out, self.stage = Path(out_dir), meta.stage
        if cfg.batch_size % rt.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {rt.world_size} processes")
        if (cfg.batch_size // rt.world_size) % cfg.accumulate:
            raise ConfigError(f"--accumulate {cfg.accumulate} does not divide the {cfg.batch_size // rt.world_size} images per "
                              f"process of --batch-size {cfg.batch_size} ({rt.world_size} processes) into equal micro-batches")
        # the batch capped by the images (a multiple of processes x --accumulate: equal micro-batches still)
        batch, self.total = plan_steps(self.stage, cfg, len(data), rt.world_size)
        self.stream = BatchStream(data, batch, cfg.seed, rt, cfg.workers)
        if self.stream.steps_per_epoch == 0:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} training images of stage {self.stage}")
        self.steps_per_epoch = self.stream.steps_per_epoch
        peak_lr = scale_lr(cfg.lr, batch, cfg.lr_scaling)
        self.schedule = WarmupCosine(peak_lr, self.total, int(round(cfg.warmup_fraction * self.total)))
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        self.opt = build_optimizer(task.model, cfg, task.lars_excluded)
        self.scaler = rt.grad_scaler()  # fp16 only
        self.step_count = 0  # optimisation steps done (this run's and those of the runs it continues)
        self.prior_seconds = 0.0  # training time of the earlier runs this one continues
        self.resumed_row: dict[str, Any] = {}  # the last logged row of the run this one continues
        self.history: list[dict[str, Any]] = []  # this run's logged rows
        self.lr = 0.0
        self._sums = None  # loss and its parts summed since the last log line (on the device: no sync per step)
        self._parts: list[str] = []
        self._last_logged = 0
        self._images = 0  # images (all processes) since the last log line
        self._t0 = self._t_window = time.perf_counter()
        self.metrics = self.progress = None

    @property
    def last_path(self) -> Path:
        return self.out / "last.safetensors"

    # -------------------------------------------------------------- phases
    def resume(self) -> None:
        """Continue the run in OUT from its checkpoint (last.*; final.* of a run killed before its
        stage stored the result: nothing left to train) when the run decision says so, else start
        afresh (an older run's resume point, result and metrics removed). Then config.yaml, the
        metrics writer, the progress display, and the task in training mode."""
        cfg, rt, out, stage = self.cfg, self.rt, self.out, self.stage
        final = out / "final.safetensors"
        source = self.last_path if self.last_path.exists() else final if final.exists() else None
        start = 0
        if (self.run.continues if self.run is not None else cfg.resume) and source is not None:
            start = self._load(source)
            if rt.is_main:
                log.info(f"{stage}: resuming from {source} at step {start}/{self.total}")
            if self.run is not None:
                self.run.begin()
        elif rt.is_main:
            if self.run is not None:
                self.run.begin()  # from here a failure keeps OUT as it is (a restart has removed the run it replaces)
            out.mkdir(parents=True, exist_ok=True)
            # a fresh start must not leave an older run's resume point or result behind
            for name in ("last.safetensors", "last.json", "final.safetensors", "final.json", "metrics.jsonl"):
                (out / name).unlink(missing_ok=True)
        if not same_on_all_ranks(start, rt.device):
            raise CheckpointError(f"{stage}: the processes disagree on the resume step ({self.last_path} differs between "
                                  "machines?); OUT must be on a file system that every node sees")
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(out)  # left by a process killed mid-write
            ckpt.atomic_write_text(out / "config.yaml", dump(cfg))
        rt.barrier()
        self.step_count = self._last_logged = start
        self.metrics = MetricsWriter(out, start, enabled=rt.is_main)  # metrics.jsonl, metrics.csv, TensorBoard
        self.progress = Progress(self.total, start, stage, rt.is_main, cfg.log_every)
        self.task.train()
        self._t0 = self._t_window = time.perf_counter()

    def _load(self, source: Path) -> int:
        """Model (and from last.*: optimiser, task state, loss scale) from ``source``; its step."""
        tensors, saved = ckpt.load_checkpoint(source)
        if saved.total_steps != self.total or saved.stage != self.stage:
            raise CheckpointError(f"{source}: cannot resume: it is stage {saved.stage!r} with {saved.total_steps} steps, "
                                  f"this run is {self.stage!r} with {self.total} steps (same options and data needed; "
                                  "--restart starts over)")
        task = self.task
        ckpt.load_state(task.model, ckpt.subdict(tensors, "model."), source, "model")
        if source == self.last_path:
            load_optimizer_tensors(self.opt, self.params, tensors)
            if task.extra is not None:
                ckpt.load_state(task.extra, ckpt.subdict(tensors, "extra."), source, f"{self.stage} state")
            if self.scaler is not None and saved.grad_scaler is not None:
                self.scaler.load_state_dict(saved.grad_scaler)
        self.prior_seconds = float(saved.train_seconds)
        self.resumed_row = saved.metrics
        return saved.step

    def batches(self):
        """(images, labels) of this process for each step from ``step_count`` to the end: the
        epochs' seeded orders, an interrupted epoch continued where it stopped. Call
        :meth:`step` on each before taking the next."""
        while self.step_count < self.total:
            epoch, first = divmod(self.step_count, self.steps_per_epoch)
            for batch in self.stream.epoch(epoch, first):
                yield batch
                if self.step_count >= self.total:
                    return

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step (:func:`train_step`) at the scheduled learning rate with the step's
        augmentation generator; its loss and parts added to the log window; then the step hooks."""
        self.lr = self.schedule(self.step_count)
        generator = step_generator(self.cfg.seed, self.step_count, self.rt.device)
        loss, parts = train_step(self.task, self.opt, self.rt, images, labels, self.lr, generator, self.scaler,
                                 self.cfg.accumulate)
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        self._sums = values if self._sums is None else self._sums + values
        self._parts = list(parts)
        self.step_count += 1
        self._images += images.shape[0] * self.rt.world_size
        for hook in list(_STEP_HOOKS):
            hook(self)
        return loss, parts

    def log(self) -> dict[str, Any] | None:
        """After :meth:`step`: at a log, checkpoint or epoch boundary the metrics row of the steps
        since the last one (their global batches' mean loss and parts, lr, images/s; at an epoch's
        end the task's evaluation too), written to the metrics files and the progress display,
        and last.* at checkpoint and epoch boundaries; None elsewhere."""
        cfg, step = self.cfg, self.step_count
        epoch_end = step % self.steps_per_epoch == 0 or step == self.total
        if not (step % cfg.log_every == 0 or epoch_end or step % cfg.checkpoint_every == 0):
            self.progress.update(step, {})
            return None
        # the mean over processes of their (equal-share) means
        logged = (all_reduce_mean(self._sums) / (step - self._last_logged)).tolist()
        if not math.isfinite(logged[0]):
            raise DivergenceError(f"{self.stage}: the loss became non-finite between steps {self._last_logged} and {step}; "
                                  + _divergence_advice(self.last_path))
        now = time.perf_counter()
        row = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": logged[0], "lr": self.lr,
               "images_per_s": self._images / max(now - self._t_window, 1e-9)}
        row.update(zip(self._parts, logged[1:]))
        self._sums, self._last_logged, self._t_window, self._images = None, step, now, 0
        if epoch_end:
            row.update(self.task.on_epoch_end(step // self.steps_per_epoch))
            self.task.train()
        self.history.append(row)
        self.metrics.write(row)
        self.progress.update(step, {k: row[k] for k in ("epoch", "loss", "lr", "images_per_s") if k in row})
        if step % cfg.checkpoint_every == 0 or epoch_end:
            self.save("last", row)
        return row

    def save(self, name: str, metrics: dict[str, Any]) -> None:
        """``OUT/name.*`` at the current step: the model, and for the resume point ``last`` the
        optimiser's momenta and the task's state; never a checkpoint with a non-finite tensor."""
        step = self.step_count
        tensors = {f"model.{k}": v for k, v in self.task.model.state_dict().items()}
        if name == "last":
            tensors.update(optimizer_tensors(self.opt, self.params))
            if self.task.extra is not None:
                tensors.update({f"extra.{k}": v for k, v in self.task.extra.state_dict().items()})
        bad = ckpt.first_non_finite(tensors)  # never replace a good checkpoint with a diverged one
        if bad:
            raise DivergenceError(f"{self.stage}: {bad} became non-finite by step {step}; {name}.safetensors not written; "
                                  + _divergence_advice(self.last_path))
        if not self.rt.is_main:
            return
        info = self.meta.replace(step=step, epoch=step / self.steps_per_epoch, total_steps=self.total,
                                 steps_per_epoch=self.steps_per_epoch, config=to_dict(self.cfg), metrics=metrics,
                                 complete=name == "final", precision=self.rt.precision, train_seconds=self.seconds,
                                 # fp16: the loss scale and its growth counter, for an exact resume
                                 grad_scaler=self.scaler.state_dict() if self.scaler is not None else None)
        ckpt.save_checkpoint(self.out / name, tensors, info)

    @property
    def seconds(self) -> float:
        """Training time of all runs of this stage (not only the resumed part)."""
        return self.prior_seconds + time.perf_counter() - self._t0

    def close(self) -> None:
        """Close the progress display and the metrics files (also after a failure)."""
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()

    def finish(self) -> FitResult:
        """final.* (the model at the last step, with the last logged row) once every step is done."""
        seconds = self.seconds
        last_row = self.history[-1] if self.history else self.resumed_row
        self.save("final", last_row)
        self.rt.barrier()
        return FitResult(self.out, self.total, seconds, self.history, last_row)

    def fit(self) -> FitResult:
        self.resume()
        try:
            for images, labels in self.batches():
                self.step(images, labels)
                self.log()
        finally:
            self.close()
        return self.finish()


def fit(task: Task, cfg: RunConfig, rt: Runtime, data: ImageDataset, out_dir: str | Path, meta: ckpt.CheckpointMeta,
        run=None) -> FitResult:
    """Train ``task`` on ``data`` per ``cfg``, checkpoints in ``out_dir`` (last.*, final.*): :meth:`Trainer.fit`."""
    return Trainer(task, cfg, rt, data, out_dir, meta, run).fit()


# ------------------------------------------------------------------ evaluation helpers

@torch.no_grad()
def predict(model: nn.Module, data: ImageDataset, rt: Runtime, transform: nn.Module, batch_size: int = 500,
            fn=None, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) over a whole dataset in order, model in eval mode; ``fn(model, x)`` picks the output.

    On-disk datasets are decoded by ``workers`` DataLoader workers. Under torchrun every process
    computes a contiguous block of the rows and every process returns the whole result (call it
    on all processes); ``model`` is the plain module (not DDP), in eval mode it needs no collective.
    """
    was_training = model.training
    model.eval()
    n = len(data)
    lo, hi = rt.rank * n // rt.world_size, (rt.rank + 1) * n // rt.world_size
    rows = np.arange(lo, hi) if hi > lo else np.arange(0, min(1, n))  # an empty block still gives the output's shape
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    outs, labels = [], []
    for x, y in load_batches(data, batches, rt, workers):
        with rt.autocast():
            o = fn(model, transform(x)) if fn is not None else model(transform(x))
        outs.append(o.float())
        labels.append(y)
    model.train(was_training)
    out, lab = torch.cat(outs)[:hi - lo], torch.cat(labels)[:hi - lo]
    if rt.distributed:
        out, lab = gather_rows(out, rt.device), gather_rows(lab, rt.device)
    return out.cpu(), lab.cpu()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        k_ = min(k, logits.shape[1])
        hit = (logits.topk(k_, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 200, temperature: float = 0.1, num_classes: int | None = None) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018), top-1 in percent."""
    c = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    tr = F.normalize(train_feats.float(), dim=1)
    te = F.normalize(test_feats.float(), dim=1)
    k = min(k, tr.shape[0])
    correct = 0
    for start in range(0, te.shape[0], 1000):
        sim = te[start:start + 1000] @ tr.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], c).scatter_add_(1, train_labels[idx], (w / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + 1000]).sum().item()
    return 100.0 * correct / te.shape[0]
