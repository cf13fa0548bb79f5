"""Multi-process training through torchrun + torch.distributed (DDP)."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from simclrv2.runtime import Runtime


def wrap_model(model: nn.Module, rt: Runtime, sync_bn: bool = True) -> nn.Module:
    """The module the training step calls: ``model`` itself in one process, else DDP over it.

    With ``sync_bn`` BatchNorm statistics are global across processes (SPEC §3, "global BN").
    """
    if not rt.distributed:
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, rt)
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def convert_sync_batchnorm(model: nn.Module, rt: Runtime) -> nn.Module:
    if rt.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raise NotImplementedError("global BatchNorm on CPU (gloo) is not implemented yet; pass --no-sync-bn")
