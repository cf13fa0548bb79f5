"""The one training loop every stage uses.

A stage supplies a :class:`Task` (what one step computes); :func:`fit` does the rest: data order,
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
from simclrv2.distributed import all_reduce_mean, gather_rows, same_on_all_ranks
from simclrv2.errors import CheckpointError, ConfigError, DivergenceError
from simclrv2.metrics import MetricsWriter
from simclrv2.optim import CLASSIFIER_PREFIXES, LARS, WarmupCosine, param_groups, scale_lr, set_lr
from simclrv2.runtime import Runtime, log


class Task:
    """What a stage trains. Subclasses set ``model`` and implement ``loss``.

    ``net`` is what the step calls: ``model`` itself, or its DDP wrapper under torchrun.

    ``loss`` gets this process's slice of the global batch and the step's ``generator``, which is
    the same on every process: augmentations draw their parameters for the whole global batch
    from it and apply this process's rows (``batch_rows(len(images), rt)``), so the views do
    not depend on the number of processes. A loss must be a mean over this process's equal
    share of the global batch's terms (DDP averages the gradients over processes).
    """

    model: nn.Module
    net: nn.Module
    # what a resume point stores beside the model and the optimiser (e.g. pretraining's memory queue):
    # a module whose state_dict goes to the checkpoint's ``extra.*`` tensors
    extra: nn.Module | None = None
    # parameter-name prefixes that LARS neither decays nor adapts (biases and BN parameters never are):
    # the linear classifiers, as the official head_supervised (:func:`simclrv2.optim.param_groups`)
    lars_excluded: tuple[str, ...] = CLASSIFIER_PREFIXES

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train(self) -> None:
        """Put the model in training mode (stages with frozen parts override)."""
        self.model.train()

    def after_step(self) -> None:
        """Called after each optimiser step (EMA updates, queues)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {}


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
               lr: float, generator: torch.Generator, scaler=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of :func:`fit` at learning rate ``lr``: loss, backward, update,
    ``task.after_step()``; returns ``task.loss``'s (loss, parts). ``bench/run.py`` times it.

    ``scaler`` (fp16, :meth:`Runtime.grad_scaler`): the loss is scaled before backward and the
    gradients unscaled before the optimiser sees them (LARS's trust ratio included); a step whose
    gradients overflowed is skipped and the scale lowered, as ``torch.amp.GradScaler`` does."""
    set_lr(opt, lr)
    with rt.autocast():
        loss, parts = task.loss(images, labels, generator)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    task.after_step()
    return loss, parts


def fit(task: Task, cfg: RunConfig, rt: Runtime, data: ImageDataset, out_dir: str | Path, meta: ckpt.CheckpointMeta,
        run=None) -> FitResult:
    """Train ``task`` on ``data`` per ``cfg``; checkpoints in ``out_dir`` (last.*, final.*).

    ``meta`` (stage, model spec, classes, ...) is the metadata of every checkpoint, with the
    progress (step, metrics, ...) filled in at each save. ``run``: the stage's
    :class:`simclrv2.rundir.StageRun`, whose decision says whether to continue the run in
    ``out_dir``; without one, ``cfg.resume`` does.
    """
    out = Path(out_dir)
    stage = meta.stage
    if cfg.batch_size % rt.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {rt.world_size} processes")
    stream = BatchStream(data, cfg.batch_size, cfg.seed, rt, cfg.workers)
    if stream.steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} training images of stage {stage}")
    steps_per_epoch = stream.steps_per_epoch
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    peak_lr = scale_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    schedule = WarmupCosine(peak_lr, total, int(round(cfg.warmup_fraction * total)))

    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg, task.lars_excluded)
    scaler = rt.grad_scaler()  # fp16 only

    start = 0
    prior_seconds = 0.0  # training time of the earlier runs this one continues
    resumed_row: dict[str, Any] = {}
    last, final = out / "last.safetensors", out / "final.safetensors"
    # a run killed after its final checkpoint but before its stage stored the result continues from final.*:
    # nothing left to train, the stage then evaluates (its last.* may be gone)
    source = last if last.exists() else final if final.exists() else None
    resume = run.continues if run is not None else cfg.resume
    if resume and source is not None:
        tensors, saved = ckpt.load_checkpoint(source)
        if saved.total_steps != total or saved.stage != stage:
            raise CheckpointError(f"{source}: cannot resume: it is stage {saved.stage!r} with {saved.total_steps} steps, "
                                  f"this run is {stage!r} with {total} steps (same options and data needed; "
                                  "--restart starts over)")
        ckpt.load_state(model, ckpt.subdict(tensors, "model."), source, "model")
        if source == last:
            load_optimizer_tensors(opt, params, tensors)
            if task.extra is not None:
                ckpt.load_state(task.extra, ckpt.subdict(tensors, "extra."), source, f"{stage} state")
            if scaler is not None and saved.grad_scaler is not None:
                scaler.load_state_dict(saved.grad_scaler)
        start = saved.step
        prior_seconds = float(saved.train_seconds)
        resumed_row = saved.metrics
        if rt.is_main:
            log.info(f"{stage}: resuming from {source} at step {start}/{total}")
        if run is not None:
            run.begin()
    elif rt.is_main:
        if run is not None:
            run.begin()  # from here a failure keeps OUT as it is (a restart has removed the run it replaces)
        out.mkdir(parents=True, exist_ok=True)
        # a fresh start must not leave an older run's resume point or result behind
        for name in ("last.safetensors", "last.json", "final.safetensors", "final.json", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    if not same_on_all_ranks(start, rt.device):
        raise CheckpointError(f"{stage}: the processes disagree on the resume step ({last} differs between machines?); "
                              "OUT must be on a file system that every node sees")
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out)  # left by a process killed mid-write
        ckpt.atomic_write_text(out / "config.yaml", dump(cfg))
    rt.barrier()

    def save(name: str, step: int, metrics: dict[str, Any]) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if name == "last":
            tensors.update(optimizer_tensors(opt, params))
            if task.extra is not None:
                tensors.update({f"extra.{k}": v for k, v in task.extra.state_dict().items()})
        bad = ckpt.first_non_finite(tensors)  # never replace a good checkpoint with a diverged one
        if bad:
            raise DivergenceError(f"{stage}: {bad} became non-finite by step {step}; {name}.safetensors not written; "
                                  + _divergence_advice(last))
        if not rt.is_main:
            return
        info = meta.replace(step=step, epoch=step / steps_per_epoch, total_steps=total, steps_per_epoch=steps_per_epoch,
                            config=to_dict(cfg), metrics=metrics, complete=name == "final", precision=rt.precision,
                            train_seconds=prior_seconds + time.perf_counter() - t0,
                            # fp16: the loss scale and its growth counter, for an exact resume
                            grad_scaler=scaler.state_dict() if scaler is not None else None)
        ckpt.save_checkpoint(out / name, tensors, info)

    metrics_writer = MetricsWriter(out, start, enabled=rt.is_main)  # metrics.jsonl, metrics.csv, TensorBoard
    history: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        history.append(row)
        metrics_writer.write(row)

    progress = Progress(total, start, stage, rt.is_main, cfg.log_every)
    task.train()
    t0 = time.perf_counter()
    t_window, n_window = time.perf_counter(), 0
    sums = None  # loss and its parts summed since the last log line (on the device: no sync per step)
    last_good = start
    step = start
    try:
        while step < total:
            epoch, first = divmod(step, steps_per_epoch)
            for images, labels in stream.epoch(epoch, first):
                lr = schedule(step)
                gen = step_generator(cfg.seed, step, rt.device)
                loss, parts = train_step(task, opt, rt, images, labels, lr, gen, scaler)
                values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
                sums = values if sums is None else sums + values
                step += 1
                n_window += images.shape[0] * rt.world_size

                epoch_end = step % steps_per_epoch == 0 or step == total
                if step % cfg.log_every == 0 or epoch_end or step % cfg.checkpoint_every == 0:
                    # means since the last log line of the global batch's values: the mean over processes
                    # of their (equal-share) means
                    logged = (all_reduce_mean(sums) / (step - last_good)).tolist()
                    mean_loss = logged[0]
                    if not math.isfinite(mean_loss):
                        raise DivergenceError(f"{stage}: the loss became non-finite between steps {last_good} and {step}; "
                                              + _divergence_advice(last))
                    now = time.perf_counter()
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean_loss, "lr": lr,
                           "images_per_s": n_window / max(now - t_window, 1e-9)}
                    row.update(zip(parts, logged[1:]))
                    sums = None
                    last_good, t_window, n_window = step, now, 0
                    if epoch_end:
                        row.update(task.on_epoch_end(step // steps_per_epoch))
                        task.train()
                    record(row)
                    progress.update(step, {k: row[k] for k in ("epoch", "loss", "lr", "images_per_s") if k in row})
                    if step % cfg.checkpoint_every == 0 or epoch_end:
                        save("last", step, row)
                else:
                    progress.update(step, {})
                if step >= total:
                    break
    finally:
        progress.close()
        metrics_writer.close()
    seconds = prior_seconds + time.perf_counter() - t0  # all runs of this stage, not only the resumed part
    save("final", total, history[-1] if history else resumed_row)
    rt.barrier()
    return FitResult(out, total, seconds, history, history[-1] if history else resumed_row)


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
