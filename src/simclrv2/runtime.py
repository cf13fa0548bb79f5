"""Shared mechanics of every stage: device, precision, processes (torchrun/DDP), seeding, logging."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from dataclasses import dataclass

import torch

from simclrv2 import distributed
from simclrv2.config import DIST_TIMEOUT_S, PRECISIONS
from simclrv2.errors import ConfigError

log = logging.getLogger("simclrv2")

# The oldest torch whose APIs we use (torch.amp.GradScaler(device) is the newest of them: 2.3); CI runs 2.13.
TORCH_FLOOR = (2, 3)
_found = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
if _found < TORCH_FLOOR:
    raise ImportError(f"simclrv2 needs torch >= {'.'.join(map(str, TORCH_FLOOR))}, found {torch.__version__}; "
                      "upgrade torch (pip install --upgrade torch)")


def setup_logging(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings only), 0 normal, 1 verbose (debug)."""
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    logger = logging.getLogger("simclrv2")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (bfloat16 / float16), None for fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        """A loss scaler for fp16 autocast (whose gradients underflow without one), else None.
        bf16 has fp32's exponent range and needs none."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

    def barrier(self) -> None:
        distributed.barrier()


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (NVIDIA compute capability 8.0+, Ampere and
    later; ROCm GPUs as torch reports). ``torch.cuda.is_bf16_supported()`` also counts emulation,
    which runs on V100/T4 but several times slower than fp32: fp16 is the choice there."""
    if getattr(torch.version, "hip", None):
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device) >= (8, 0)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_bf16_native(device)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # noqa: BLE001 - older builds without the probe
            return False
    return False


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (10-bit mantissa, ~8x faster on
    Ampere+); off gives IEEE float32."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Float32 matmuls in full IEEE precision inside the block (TF32 off, restored after): for
    NT-Xent's similarities, whose errors the temperature (0.1) magnifies ten times."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def resolve_device(device: str, local_rank: int = 0, launched: bool = False, world_size: int = 1) -> torch.device:
    """The ``torch.device`` (with an index for CUDA) that this process runs on.

    ``auto``: CUDA when available, else the CPU. A CUDA device without an index is the process's
    GPU: ``LOCAL_RANK`` under torchrun, else the current device (``CUDA_VISIBLE_DEVICES`` picks
    it). ``torch.cuda.set_device`` and DDP need the index.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"--device {device!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA device is available")
    count = torch.cuda.device_count()
    if dev.index is None:
        index = local_rank if launched else torch.cuda.current_device()
    else:
        if world_size > 1:
            raise ConfigError(f"--device {device} names one GPU but torchrun started {world_size} processes; "
                              "use --device cuda (each process takes GPU LOCAL_RANK)")
        index = dev.index
    if not 0 <= index < count:
        what = f"LOCAL_RANK {index}" if dev.index is None else f"--device {device}"
        raise ConfigError(f"{what}: only {count} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", index)


def resolve_precision(precision: str, dev: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively, else fp32 (fp16 is never chosen
    for the user: it needs loss scaling and can overflow; ask for it on V100/T4-class GPUs)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        # bf16 autocast where the hardware has native bf16 (CUDA compute capability 8.0+; CPUs with
        # AVX512-BF16 / AMX, which oneDNN reports): elsewhere bf16 is emulated and several times
        # slower than fp32 (a 2-core AMD EPYC without AVX512-BF16: ResNet-18 w0.25, 32 px, batch 64,
        # forward + backward 15.3 s vs 3.4 s per step)
        return "bf16" if bf16_supported(dev) else "fp32"
    if precision == "bf16" and not bf16_supported(dev):
        hint = "fp16 (with loss scaling) or fp32" if dev.type == "cuda" else "fp32"
        raise ConfigError(f"--precision bf16 is not computed natively on {dev} (it would be emulated); use {hint}")
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError("--precision fp16 is for CUDA GPUs without bf16 (V100, T4); on the CPU use bf16 or fp32")
    return precision


def init_runtime(device: str = "auto", precision: str = "auto", tf32: bool | None = None,
                 dist_timeout: float = DIST_TIMEOUT_S) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun.

    ``tf32`` (CUDA): None = on unless ``precision`` is fp32 (fp32 asked for is IEEE fp32);
    ``dist_timeout``: seconds a collective may wait before the process group fails.
    """
    rank, world_size, local_rank, launched = distributed.launch_env()
    dev = resolve_device(device, local_rank, launched, world_size)
    chosen = resolve_precision(precision, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        set_tf32(tf32 if tf32 is not None else precision != "fp32")
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {dist_timeout}")
    distributed.init_process_group(dev, dist_timeout)
    if rank != 0:  # one voice: the other processes log warnings and errors only
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[chosen]
    return Runtime(dev, dtype, rank, world_size, local_rank)
