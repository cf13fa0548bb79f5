"""Multi-process training through torchrun + torch.distributed (DDP), and global BatchNorm.

The one place that asks "am I distributed, which rank, how many" (:func:`launch_env`,
:func:`world`, :func:`is_main_process`) and runs collectives: the rest of the package calls
these functions, or reads :class:`simclrv2.runtime.Runtime`, which is built from them.

Why N processes with a per-process batch b give the update of one process with batch N·b:

* Data: :class:`simclrv2.engine.BatchStream` gives rank r the rows ``r·b : (r+1)·b`` of each
  global batch, and the tasks draw the augmentation parameters of the *global* batch from the
  (seed, step) generator and apply rank r's rows (:func:`simclrv2.engine.batch_rows`), so the
  views are the same as one process's.
* BatchNorm: statistics over the global batch (:func:`convert_sync_batchnorm`): mean and
  biased variance normalise, running statistics get the unbiased global variance, exactly as
  ``nn.BatchNorm`` on the global batch; gradients flow through the statistics to every rank.
* Loss: every per-rank loss is a mean over an equal share of the global batch's terms
  (NT-Xent: the rank's 2b anchors against the gathered 2·N·b candidates; cross-entropy: its b
  images), so the global loss is ``L = (1/N) Σ_r L_r``. Rank r's backward yields
  ``Σ_q ∂L_q/∂θ`` *through its own activations* (the all-gather / all-reduce backward sums the
  gradients that every rank's loss sends to this rank's slice), and DDP averages over the
  ranks: ``(1/N) Σ_r Σ_q ∂L_q/∂θ|_r = ∂L/∂θ``, the one-process gradient.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

if TYPE_CHECKING:
    from simclrv2.runtime import Runtime


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------ which process am I

def launch_env() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, launched by torchrun) from the environment torchrun sets
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); (0, 1, 0, False) for a plain start."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")), "LOCAL_RANK" in env


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo elsewhere) unless started alone or joined already."""
    if launch_env()[1] > 1 and not _initialised():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def shutdown(wait: bool = True) -> None:
    """Leave torchrun's process group at the end of a command: wait for every rank first (``wait``;
    a rank that failed does not wait, its peers may never arrive), then destroy the group, so that no
    rank exits while a peer is still in a collective (gloo then aborts that peer: "terminate called
    without an active exception")."""
    if not _initialised():
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    if not _initialised():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Whether this process is rank 0, the one that writes a run's shared files: the process
    group's rank once joined, torchrun's ``RANK`` before (e.g. the pipeline's first files)."""
    return (dist.get_rank() if _initialised() else launch_env()[0]) == 0


def barrier() -> None:
    if _initialised() and dist.get_world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------ collectives


class _AllGatherGrad(torch.autograd.Function):
    """all_gather whose backward sums, over ranks, the gradients of this rank's slice (public
    collectives only: an all_reduce of the gathered gradient, then this rank's rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, x.shape[0]
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' ``x`` (same shape everywhere) concatenated along dim 0, differentiable: the
    backward sends each rank the sum over ranks of the gradients of its slice."""
    group = group if group is not None else dist.group.WORLD
    return _AllGatherGrad.apply(x.contiguous(), group)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0 (gradients flow back to each rank's own slice),
    and the offset of this rank's slice. Without an initialised process group: ``(x, 0)``."""
    if not _initialised() or dist.get_world_size() == 1:
        return x, 0
    return all_gather_grad(x), dist.get_rank() * x.shape[0]


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm with statistics over the whole global batch of all processes, any backend.

    ``nn.SyncBatchNorm`` runs on CUDA only; this module does the same with plain autograd ops
    and one differentiable all-gather per layer, so it works on CPU (gloo) too. In training
    mode each rank computes its local count, mean and biased variance (fp32), gathers those of
    all ranks and combines them (parallel-variance formula, no E[x²] - E[x]² cancellation):

        n = Σ n_r,  mean = Σ n_r·mean_r / n,  var = Σ n_r·(var_r + (mean_r - mean)²) / n

    normalises with (mean, var) and updates the running statistics with ``mean`` and the
    unbiased ``var·n/(n-1)`` exactly as ``nn.BatchNorm`` (momentum, or the cumulative average
    when momentum is None). In eval mode, or without a process group of more than one rank, it
    is ``nn.BatchNorm``. Inputs: [N, C] or [N, C, *]. ``weight`` / ``bias`` may be None
    (e.g. a BN without shift).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group if self.process_group is not None else (dist.group.WORLD if _initialised() else None)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        var_l, mean_l = torch.var_mean(x, dim=dims, correction=0)
        n_l = torch.full_like(mean_l, input.numel() // c)
        stats = all_gather_grad(torch.stack([n_l, mean_l, var_l]), group).view(-1, 3, c)  # [ranks, 3, C]
        n_r, mean_r, var_r = stats.unbind(1)
        n = n_r.sum(0)
        mean = (n_r * mean_r).sum(0) / n
        var = (n_r * (var_r + (mean_r - mean) ** 2)).sum(0) / n

        if self.training and self.track_running_stats:
            with torch.no_grad():
                count = n[0]
                unbiased = var * (count / (count - 1)) if count > 1 else var
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)

        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        shape = [1, c] + [1] * (input.dim() - 2)
        out = torch.addcmul(shift.view(shape), x, scale.view(shape))
        return out.to(input.dtype)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every BatchNorm (1d/2d/3d, subclasses too) replaced by a
        GlobalBatchNorm sharing its parameters and buffers (in place for the children, like
        ``nn.SyncBatchNorm.convert_sync_batchnorm``); state_dict keys are unchanged."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias  # None for a BN without shift
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child, process_group))
        return out


def wrap_model(model: nn.Module, rt: Runtime, sync_bn: bool = True, compile: bool = False) -> nn.Module:
    """The module the training step calls: ``model`` itself in one process, else DDP over it;
    with ``compile`` the result is wrapped in ``torch.compile`` (after DDP, as PyTorch's DDP +
    compile notes recommend: DDP's optimizer then splits the graph at its gradient buckets).

    With ``sync_bn`` BatchNorm statistics are global across processes (docs/method.md §3, "global BN"):
    the BN modules of ``model`` are replaced in place, so ``model`` and its copies made
    afterwards (e.g. an EMA) use them too.
    """
    net = model
    if rt.distributed:
        if sync_bn:
            convert_sync_batchnorm(model, rt)
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = DDP(model, device_ids=device_ids, **_no_buffer_sync())
    if compile:
        net = torch.compile(net)
    return net


def _no_buffer_sync() -> dict[str, bool]:
    """DDP option: no broadcast of rank 0's buffers at every forward (global BN keeps the running
    statistics equal on every rank; with --no-sync-bn each rank keeps its own)."""
    import inspect

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def convert_sync_batchnorm(model: nn.Module, rt: Runtime) -> nn.Module:
    """Global BN: ``nn.SyncBatchNorm`` on CUDA (NCCL), :class:`GlobalBatchNorm` elsewhere (gloo)."""
    if rt.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``values`` (a new tensor; ``values`` itself without a process group)."""
    if not _initialised() or dist.get_world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    if not _initialised() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The rows of every rank's ``x`` concatenated in rank order, on every rank (row counts may
    differ between ranks; other dimensions and dtype must agree). ``device``: where the backend
    communicates (the rank's GPU for NCCL, the CPU for gloo); the result is on ``x``'s device."""
    if not _initialised() or dist.get_world_size() == 1:
        return x
    size = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not _initialised() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Whether the integer ``value`` is equal on every rank (True without a process group);
    ``device``: where the backend communicates (CPU for gloo, the rank's GPU for NCCL)."""
    if not _initialised() or dist.get_world_size() == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(-t[1]) == value


def global_count_share(mask: torch.Tensor) -> torch.Tensor:
    """max(1, Σ over ranks of ``mask.sum()``) / ranks: the denominator that makes each rank's
    masked sum average, over ranks, to the masked mean of the global batch (in one process:
    ``mask.sum()`` clamped to 1)."""
    count = mask.sum().to(torch.float32)
    if not _initialised() or dist.get_world_size() == 1:
        return count.clamp_min(1.0)
    count = count.clone()
    dist.all_reduce(count)
    return count.clamp_min(1.0) / dist.get_world_size()
