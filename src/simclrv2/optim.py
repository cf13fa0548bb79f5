"""LARS and the learning-rate schedule (docs/method.md §4), following the official tf2/lars_optimizer.py."""

from __future__ import annotations

import math

import torch
from torch import nn

from simclrv2.runtime import log

SHORT_RUN = 100  # optimiser steps: fewer are too few to learn much (a warning names the stage)


# Linear classifiers on top of the network: the fine-tuning classifier and the pretraining probe.
CLASSIFIER_PREFIXES = ("fc.", "probe.")


def param_groups(model: nn.Module, weight_decay: float, exclude_prefixes: tuple[str, ...] = CLASSIFIER_PREFIXES) -> list[dict]:
    """Two groups: weights (decay + layer adaptation) and the rest (neither).

    The official code (tf2/run.py) excludes variables named 'batch_normalization', 'bias' and
    'head_supervised' (the linear classifier) from both; in PyTorch the first two are exactly the
    parameters with fewer than 2 dimensions, the last the parameters under ``exclude_prefixes``.
    """
    adapted, excluded = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            keep = p.ndim > 1 and not name.startswith(exclude_prefixes)
            (adapted if keep else excluded).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "layer_adaptation": True},
        {"params": excluded, "weight_decay": 0.0, "layer_adaptation": False},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum (You et al. 2017), as in SimCLR.

    Use with :func:`param_groups`, which sets ``weight_decay`` and ``layer_adaptation`` per group.

    For each parameter w with gradient g (per group: ``weight_decay`` λ, ``layer_adaptation``):

        g  <- g + λ w
        r  =  η ||w|| / ||g||  if layer_adaptation and both norms > 0, else 1
        v  <- m v + lr · r · g
        w  <- w - v

    with momentum m = 0.9 and trust coefficient η = 0.001. The learning rate sits inside the
    momentum buffer (as in the official code), so with a constant lr an excluded parameter steps
    exactly like PyTorch's momentum SGD.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, layer_adaptation: bool = True):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, layer_adaptation=layer_adaptation)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["layer_adaptation"]:
                w_norms = torch.stack(torch._foreach_norm(params))
                g_norms = torch.stack(torch._foreach_norm(grads))
                ratio = torch.where(
                    (w_norms > 0) & (g_norms > 0),
                    group["trust_coefficient"] * w_norms / g_norms.clamp_min(1e-30),
                    torch.ones_like(w_norms),
                )
                scales = (ratio * group["lr"]).unbind()
                grads = torch._foreach_mul(grads, scales)
            else:
                grads = torch._foreach_mul(grads, group["lr"])
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_sub_(params, bufs)
        return loss


def scale_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """'linear': base·B/256; 'sqrt': base·√B (docs/method.md §4: 0.1·√B for pretraining); 'none': base."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ValueError(f"scale_lr: scaling must be one of linear, sqrt, none; got {scaling!r}")


class WarmupCosine:
    """lr(step): linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0):
        self.peak_lr = peak_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(warmup_steps, self.total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times the group's optional ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def plan_steps(stage: str, cfg, n_images: int, world_size: int = 1) -> tuple[int, int]:
    """(global batch, total optimiser steps) of a stage on ``n_images`` training images.

    The batch is ``cfg.batch_size`` capped by the images (the largest multiple of the processes x
    ``--accumulate`` that fits; a warning says so); the steps are ``cfg.epochs`` epochs of ``n_images // batch`` steps,
    at least ``cfg.min_steps`` (classifier stages: on a small labelled set more epochs; the
    built-in presets already train longer; docs/method.md §8). A warning names the stage when
    the run has fewer than ``SHORT_RUN`` steps."""
    batch = cfg.batch_size
    unit = world_size * getattr(cfg, "accumulate", 1)  # equal shares for the processes and their micro-batches
    if batch > n_images >= unit:
        batch = n_images // unit * unit
        log.warning(f"{stage}: --batch-size {cfg.batch_size} is more than the {n_images} training images: batches "
                    f"of {batch}")
    steps_per_epoch = n_images // batch if batch else 0
    if steps_per_epoch == 0:
        return batch, 0
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    minimum = getattr(cfg, "min_steps", 0)
    if total < minimum:
        log.info(f"{stage}: {cfg.epochs:g} epochs of {n_images} images would be {total} steps: training "
                 f"{minimum} (--min-steps), {minimum / steps_per_epoch:.4g} epochs")
        total = minimum
    if total < SHORT_RUN:
        log.warning(f"{stage}: only {total} optimiser steps ({cfg.epochs:g} epochs of {steps_per_epoch} steps of "
                    f"{batch} images): probably too short to learn; raise --epochs"
                    + (" or --min-steps" if hasattr(cfg, "min_steps") else ""))
    return batch, total
