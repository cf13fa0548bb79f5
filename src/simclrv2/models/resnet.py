"""ResNet encoders of SimCLRv2 (docs/method.md §1), with torchvision's module names.

One configurable class, :class:`ResNet`, covers every variant: basic or bottleneck blocks, any
width multiplier (fractional too), and three orthogonal options as timm names them:
``selective_kernel`` (SK 3x3 convolutions in the bottleneck blocks), ``stem_type`` ("default":
7x7/2 conv + max-pool; "deep": the ResNet-D stem of three 3x3 convs + max-pool; "small": one 3x3/1
conv and no max-pool, for images of 32 px or less) and ``avg_down`` (ResNet-D projection
shortcuts: average pool, then a stride-1 1x1 conv). SimCLRv2's SK ResNets use all three together
(:func:`sk_options`, the presets' ``sk``). :func:`build_resnet` is the factory.

Names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample``) so that
weights are easy to read and convert. The deep stem replaces ``conv1`` by a ``stem`` Sequential.

Padding is TF's, so that imported official checkpoints compute the same function
(google-research/simclr ``resnet.py`` / ``tf2/resnet.py``):

* Convolutions. TF's ``conv2d_fixed_padding`` pads a strided conv explicitly, ``pad_beg = (k - 1) // 2``
  and ``pad_end = k - 1 - pad_beg``, then runs it with 'VALID'; a stride-1 conv uses 'SAME', which for
  odd ``k`` also pads ``(k - 1) / 2`` on each side. Every kernel here is odd (7, 3, 1), so
  ``pad_beg == pad_end == (k - 1) // 2`` and PyTorch's symmetric ``padding=(k - 1) // 2`` is the same
  computation, for any input size.
* The stem's 3x3/2 max-pool is 'SAME' in TF: ``out = ceil(n / 2)`` and the ``max((out - 1) * 2 + 3 - n, 0)``
  padded rows go ``total // 2`` before and the rest after (even ``n``: 0 before, 1 after; odd ``n``: 1 and 1).
  :class:`MaxPool2dSame` does exactly that (padding never wins the max); PyTorch's ``MaxPool2d(3, 2, 1)``
  would pad 1 on every side and shift the windows by one pixel for even inputs.
* ResNet-D shortcuts (``avg_down``): a strided block pads the bottom/right by one zero (``fixed_padding(x, 2)``)
  and average-pools 2x2/stride 'VALID' (the zero counts in the average, which matters for odd sizes
  only); the stride-1 projection of the first block pools 2x2/1 'SAME', i.e. pads bottom/right by one
  and excludes the padding from the average (:class:`AvgPool2dSame`), where an identity would differ.

Activation checkpointing (:func:`set_activation_checkpointing`) trades compute for memory at large
batches: the stem and every residual block (or every stage) keep only their input for the backward
pass and run their forward again there. It is a training-time switch, not part of the model: the
module structure, ``state_dict`` and checkpoints are the same with and without it.

One structural difference remains, outside the released checkpoints (all bottleneck ResNets): TF's
block groups always open with a projection shortcut, also for the basic-block ResNet-18/34 whose first
group keeps its channel count; ours uses the identity there, as torchvision does.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from simclrv2.errors import ConfigError

# docs/method.md §1: TF momentum 0.9 == PyTorch momentum 0.1.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
SK_RATIO = 0.0625
SK_MIN_DIM = 32

STEM_TYPES = ("default", "deep", "small")
STAGES = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


def batch_norm(channels: int, zero_init: bool = False) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_init:
        nn.init.zeros_(bn.weight)
    return bn


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class SelectiveKernel(nn.Module):
    """SK convolution (docs/method.md §1): two 3x3 branches from one conv, mixed by a softmax attention.

    x -> conv3x3(2C) -> BN -> ReLU -> split in 2 -> attention from the pooled sum -> weighted sum (C).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, sk_ratio: float = SK_RATIO):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(in_channels, 2 * channels, 3, stride, 1, bias=False)
        self.bn = batch_norm(2 * channels)
        mid = max(int(channels * sk_ratio), SK_MIN_DIM)
        self.fc1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.fc_bn = batch_norm(mid)
        self.fc2 = nn.Conv2d(mid, 2 * channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        a, b = x.chunk(2, dim=1)
        g = (a + b).mean(dim=(2, 3), keepdim=True)
        g = F.relu(self.fc_bn(self.fc1(g)))
        w = self.fc2(g).unflatten(1, (2, self.channels)).softmax(dim=1)
        return a * w[:, 0] + b * w[:, 1]


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF's 'SAME' along one axis of length ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.MaxPool2d):
    """TF's ``max_pool(..., padding='SAME')``: asymmetric padding computed from the input size; pads never win."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__(kernel_size, stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='SAME'"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = tf_same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2dSame(nn.AvgPool2d):
    """TF's ``avg_pool(..., padding='SAME')``: asymmetric padding from the input size, excluded from the average."""

    def __init__(self, kernel_size: int = 2, stride: int = 1):
        super().__init__(kernel_size, stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='SAME'"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = tf_same_padding(x.shape[-1], self.kernel_size, self.stride)
        if not (top or bottom or left or right):
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        pads = (left, right, top, bottom)
        total = F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride)
        ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        valid = F.avg_pool2d(F.pad(ones, pads), self.kernel_size, self.stride)  # fraction of real pixels
        return total / valid


class AvgPool2dFixedPadding(nn.AvgPool2d):
    """TF's strided ResNet-D shortcut pool: ``fixed_padding(x, 2)`` (one zero row and column at the
    bottom/right), then a 2x2 average pool with this stride, 'VALID' (the zeros count in the average)."""

    def __init__(self, stride: int = 2):
        super().__init__(2, stride)

    def extra_repr(self) -> str:
        return f"kernel_size=2, stride={self.stride}, fixed_padding=(0, 1)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, self.stride)


def shortcut(in_channels: int, out_channels: int, stride: int, avg_pool: bool) -> nn.Module | None:
    """Projection shortcut: strided 1x1 conv, or (ResNet-D, ``avg_down``) 2x2 avg-pool then a stride-1 1x1 conv.

    The ResNet-D pool is TF's: fixed padding + 'VALID' when strided, 'SAME' (padding excluded) at stride 1.
    """
    if stride == 1 and in_channels == out_channels:
        return None
    if avg_pool:
        pool = AvgPool2dFixedPadding(stride) if stride > 1 else AvgPool2dSame(2, 1)
        return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), batch_norm(out_channels))
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), batch_norm(out_channels))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, selective_kernel: bool = False,
                 avg_down: bool = False):
        super().__init__()  # no SK variant: ``selective_kernel`` applies to bottleneck blocks only
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = batch_norm(channels)
        self.conv2 = nn.Conv2d(channels, out, 3, 1, 1, bias=False)
        self.bn2 = batch_norm(out, zero_init=True)
        self.downsample = shortcut(in_channels, out, stride, avg_pool=avg_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + identity)


class Bottleneck(nn.Module):
    """Post-activation bottleneck, stride on the 3x3 conv (docs/method.md §1); the 3x3 becomes SK when enabled."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, selective_kernel: bool = False,
                 avg_down: bool = False):
        super().__init__()
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = batch_norm(channels)
        if selective_kernel:
            # SK carries its own BN-ReLU, so there is no bn2 (as in the official tf2/resnet.py).
            self.conv2 = SelectiveKernel(channels, channels, stride)
            self.bn2 = None
        else:
            self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
            self.bn2 = batch_norm(channels)
        self.conv3 = nn.Conv2d(channels, out, 1, bias=False)
        self.bn3 = batch_norm(out, zero_init=True)
        self.downsample = shortcut(in_channels, out, stride, avg_pool=avg_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(y)
        if self.bn2 is not None:
            y = F.relu(self.bn2(y))
        y = self.bn3(self.conv3(y))
        return F.relu(y + identity)


class ResNet(nn.Module):
    """Images [B, C, H, W] -> globally average-pooled features [B, out_dim]."""

    def __init__(self, depth: int = 50, width_multiplier: float = 1.0, selective_kernel: bool = False,
                 stem_type: str = "default", avg_down: bool = False, in_channels: int = 3):
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"ResNet: depth {depth} is not supported; expected one of {sorted(STAGES)}")
        if not (width_multiplier > 0 and scaled(64, width_multiplier) >= 1):
            raise ValueError(f"ResNet: width_multiplier {width_multiplier} is not supported; expected a positive multiplier such as 0.25, 1, 2, 3")
        if stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type {stem_type!r} is not supported; expected one of {', '.join(STEM_TYPES)}")
        kind, blocks = STAGES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        w = width_multiplier
        stem_out = scaled(64, w)

        if stem_type == "small":
            # CIFAR-style stem: 3x3 stride 1, no max-pool.
            self.conv1 = nn.Conv2d(in_channels, stem_out, 3, 1, 1, bias=False)
            self.bn1 = batch_norm(stem_out)
            self.maxpool = nn.Identity()
        elif stem_type == "deep":
            # ResNet-D deep stem: three 3x3 convs (32w, 32w, 64w), the first strided.
            half = scaled(32, w)
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), batch_norm(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, 1, 1, bias=False), batch_norm(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_out, 3, 1, 1, bias=False),
            )
            self.conv1 = None
            self.bn1 = batch_norm(stem_out)
            self.maxpool = MaxPool2dSame(3, 2)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_out, 7, 2, 3, bias=False)
            self.bn1 = batch_norm(stem_out)
            self.maxpool = MaxPool2dSame(3, 2)

        channels = stem_out
        for i, n in enumerate(blocks):
            width = scaled(64 * 2**i, w)
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(block(channels, width, stride if j == 0 else 1, selective_kernel, avg_down))
                channels = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_dim = channels
        # activation checkpointing: None (off), "stage" or "block" (set_activation_checkpointing); a plain
        # attribute, neither a parameter nor a buffer, so the state_dict does not depend on it
        self.checkpointing: str | None = None

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x) if self.conv1 is not None else self.stem(x)
        return self.maxpool(F.relu(self.bn1(x)))

    def segments(self) -> list[tuple[callable, list[nn.Module]]]:
        """The forward as a chain of (function, modules it uses): the stem, then each stage
        (``checkpointing == "stage"``) or each residual block (otherwise)."""
        stem_modules = [m for m in (self.conv1, self.stem if self.conv1 is None else None, self.bn1) if m is not None]
        out = [(self._stem, stem_modules)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out += [(layer, [layer])] if self.checkpointing == "stage" else [(block, [block]) for block in layer]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            for fn, modules in self.segments():
                x = recompute_in_backward(fn, x, modules)
        else:
            x = self._stem(x)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


CHECKPOINTING = ("stage", "block")


class _BatchNormStatisticsFrozen:
    """Context of a segment's recomputation in backward: its BatchNorms normalise with the batch
    statistics as in the forward pass, but leave their running statistics as they are.

    The recomputation runs the segment in training mode a second time, which would update every
    running mean / variance twice per step and count the step twice. Inside this context the BNs
    have momentum 0, so the update ``(1 - 0)·running + 0·batch`` leaves them bitwise unchanged
    (no in-place write of ours: the running statistics are saved for backward by ``batch_norm``
    and must keep their version), and ``num_batches_tracked`` gets back its value on exit.
    Works for nn.BatchNorm*, nn.SyncBatchNorm and :class:`simclrv2.distributed.GlobalBatchNorm`
    (all read ``momentum`` per call; ``momentum=None``, the cumulative average, becomes 0 too).
    The modules are looked up on entry, so BNs converted after the forward (never done) or before
    it (sync BN) are the ones found."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.saved: list = []

    def __enter__(self):
        bns = [m for module in self.modules for m in module.modules() if isinstance(m, _BatchNorm)]
        self.saved = [(bn, bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())
                      for bn in bns]
        for bn in bns:
            bn.momentum = 0.0
        return self

    def __exit__(self, *exc):
        # also on the exception that stops a recomputation early (checkpoint's early stop)
        for bn, momentum, count in self.saved:
            bn.momentum = momentum
            if count is not None:
                bn.num_batches_tracked.copy_(count)
        self.saved = []
        return False


def frozen_batchnorm_statistics(module: nn.Module) -> _BatchNormStatisticsFrozen:
    """``with frozen_batchnorm_statistics(module): ...``: the BatchNorms inside ``module`` normalise
    with the batch statistics as usual, but leave their running statistics and counts as they are
    (:class:`_BatchNormStatisticsFrozen`). For a forward that repeats one whose statistics were
    counted already: activation checkpointing's recomputation, gradient accumulation's second pass
    in pretraining (:class:`simclrv2.stages.pretrain.CachedEmbeddings`)."""
    return _BatchNormStatisticsFrozen([module])


def _contexts(modules: list[nn.Module]):
    return contextlib.nullcontext(), _BatchNormStatisticsFrozen(modules)


def recompute_in_backward(fn, x: torch.Tensor, modules: list[nn.Module]) -> torch.Tensor:
    """``fn(x)``, keeping only ``x`` for backward and running ``fn`` again there (non-reentrant
    ``torch.utils.checkpoint``), with the BatchNorms of ``modules`` updating their running
    statistics once, in this forward call (:class:`_BatchNormStatisticsFrozen`).

    The recomputation runs under the forward's autocast state (non-reentrant checkpoint restores
    it). ``preserve_rng_state`` stays on, although not needed: the ResNet draws no random numbers
    (no dropout); it costs little and keeps a future stochastic-depth correct.
    """
    return checkpoint(fn, x, use_reentrant=False, context_fn=functools.partial(_contexts, modules))


def set_activation_checkpointing(model: nn.Module, mode: str | bool | None) -> int:
    """Turn activation checkpointing of every :class:`ResNet` inside ``model`` on or off; returns how many.

    ``mode``: ``"block"`` (or True): the stem and each residual block keep only their input for
    backward and are recomputed there; ``"stage"``: the stem and each of layer1..layer4;
    None / False: off. It acts in training mode with gradients enabled only (evaluation and
    no-grad forwards are unchanged), changes neither the module structure nor the state_dict
    (checkpoints are the same), and gives the same loss, gradients and BN statistics as without
    (tests/test_activation_checkpointing.py).
    """
    if mode is True:
        mode = "block"
    if mode is False:
        mode = None
    if mode is not None and mode not in CHECKPOINTING:
        raise ConfigError(f"activation checkpointing {mode!r} is not supported; expected one of {', '.join(CHECKPOINTING)}")
    resnets = [m for m in model.modules() if isinstance(m, ResNet)]
    for m in resnets:
        m.checkpointing = mode
    return len(resnets)


def build_resnet(depth: int = 50, width_multiplier: float = 1.0, selective_kernel: bool = False,
                 stem_type: str = "default", avg_down: bool = False, in_channels: int = 3) -> ResNet:
    """The SimCLRv2 encoder: ResNet-{18,34,50,101,152}, width w, with the options of :class:`ResNet`
    (SimCLRv2's SK ResNets: ``**sk_options(True)``)."""
    return ResNet(depth, width_multiplier, selective_kernel, stem_type, avg_down, in_channels)


def sk_options(sk: bool, small_images: bool = False) -> dict:
    """The presets' ``sk`` as encoder options: SimCLRv2's SK ResNets (the official ``r*_sk1``
    checkpoints) have selective kernels, the ResNet-D deep stem and average-pool shortcuts together
    (docs/method.md §1); ``small_images`` (32 px or less) replaces either stem by the small-image stem."""
    return dict(selective_kernel=sk, stem_type="small" if small_images else "deep" if sk else "default", avg_down=sk)
