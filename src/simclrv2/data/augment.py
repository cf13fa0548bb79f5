"""Batched SimCLR augmentations that run on the device holding the images (docs/method.md §5).

Every transform takes a whole batch ``[B, C, H, W]`` (``uint8`` in 0..255 or floating point
in [0, 1], ``C`` = 1 or 3) and returns ``float32`` ``[B, C, S, S]`` in [0, 1] on the same
device, with ``S = image_size``.  The same code runs on CPU and CUDA; there is no Python loop
over the images of a batch.

Pretraining view (:class:`PretrainAugment`), in this order, each image drawing its own
parameters:

1. random resized crop: area uniform in ``crop_scale`` (0.08–1 of the image), aspect ratio
   log-uniform in ``crop_ratio`` (3/4–4/3), torchvision's algorithm (10 tries, then a centre
   crop; :func:`random_resized_crop_params`), resized to ``S x S`` with bilinear sampling
   (``grid_sample``, ``align_corners=False``, border padding) -- one call for the batch;
2. horizontal flip with probability ``flip_p`` (folded into the sampling grid);
3. with probability ``color_p`` colour jitter of strength ``s = color_strength``, the four ops
   applied in a random order drawn per image and the result clipped to [0, 1] after each op:

   * brightness: multiply by ``f ~ U[max(0, 1 - 0.8 s), 1 + 0.8 s]`` (multiplicative, as
     ``random_brightness(impl='simclrv2')`` in the official TF code);
   * contrast: ``f * x + (1 - f) * mean(gray(x))`` with the per-image mean of the grayscale
     image, ``f ~ U[max(0, 1 - 0.8 s), 1 + 0.8 s]``;
   * saturation: ``f * x + (1 - f) * gray(x)``, same range for ``f``;
   * hue: rotate the hue in HSV space by ``d ~ U[-0.2 s, 0.2 s]`` of a full turn (exact HSV
     round trip, as ``tf.image.adjust_hue``);

   ``gray`` uses the ITU-R 601 luma weights (0.299, 0.587, 0.114).  Contrast and saturation
   follow torchvision; the official TF code uses the per-channel mean for contrast and scales
   the HSV saturation;
4. grayscale with probability ``gray_p`` (luma replicated to the 3 channels);
5. if ``blur``: Gaussian blur with probability ``blur_p``, ``sigma ~ U[blur_sigma]``, separable
   kernel of ``2 * ((S // 10) // 2) + 1`` taps (≈ 10 % of the side, odd: 23 at 224 px, as the
   official code), reflect padding at the borders (the official code pads with zeros).

Single-channel images (e.g. Fashion-MNIST): the output keeps 1 channel; brightness and
contrast apply (the grayscale of a 1-channel image is the image itself), while saturation, hue
and grayscale are no-ops.  Their random numbers are still drawn, so a given generator state
consumes the same amount of randomness whatever the channel count.

Implementation (no Python loop over images): the crop is one ``grid_sample``; brightness,
contrast and saturation are each a per-image affine map ``a x + b gray(x) + c mean(gray(x))``,
so each of the 4 positions of the random order is one batched op, and the hue rotation runs on
the images whose op at that position is hue; the blur is a grouped 1-D convolution on the
blurred images.  On the CPU the batch is processed in chunks of ~2M output values so that the
elementwise passes stay in cache.  ``bench/augment_bench.py`` compares this with kornia
(2.5-5x faster here, see BENCHMARKS.md).

Images of different sizes (image folders, :class:`~simclrv2.data.batch.ImageBatch`): each image
is decoded whole, its aspect ratio kept, so the crop of step 1 is cut from the whole image, as
the paper does (docs/method.md §5): its box is drawn against the image's own height and width
(the same draws as for a fixed size), then cropped and resized to ``S x S`` one image at a time
(bilinear, antialiased: a box may be larger than the view); the rest of the pipeline is the
same batched code. The evaluation view crops each image's central square (below) the same way.
With ``pad_crop`` (fine-tuning), each image's central square is resized to ``S`` first.

User view transforms (``extra=[fn, ...]`` of :class:`PretrainAugment` and
:class:`FinetuneAugment`; the stages take them as ``view_transforms=``): callables
``fn(views, generator) -> views`` on the finished float32 views ``[N, C, S, S]``, applied in
order after the built-in steps, with a CPU generator of their own seeded by one draw from the
step's generator (so a run stays a function of its seed; without them nothing is drawn and the
views are as before). :func:`rotations_and_flips` is one (random 90-degree rotations and
vertical flips, for images without a preferred orientation).

Randomness and determinism: all random parameters are drawn on the CPU, from the CPU
``torch.Generator`` passed to ``forward`` (or torch's default CPU generator when none is given)
and then moved to the images' device (small non-blocking copies).  A CUDA generator is
rejected.  Hence the same seed gives the same parameters -- and, up to floating-point
differences between kernels, the same views -- on CPU and on CUDA.

Fine-tuning / distillation views (:class:`FinetuneAugment`): random resized crop + flip only,
or, with ``pad_crop > 0``, a CIFAR-style crop: zero padding by ``pad_crop`` pixels then a random
``S x S`` crop (exact pixel copies) + flip.

Evaluation (:class:`EvalTransform`): central square crop keeping ``crop_fraction`` (87.5 %) of
the shorter side (offsets as the official ``center_crop``), then a bilinear (antialiased)
resize to ``S``; for images of at most 32 px the crop is skipped and the image is only
resized when its size differs from ``S``.  The official code resizes with bicubic
interpolation; bilinear is used here for both training and evaluation views.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from simclrv2.data.batch import ImageBatch
from simclrv2.errors import ConfigError

__all__ = [
    "PretrainAugment",
    "FinetuneAugment",
    "EvalTransform",
    "random_resized_crop_params",
    "to_float_images",
    "blur_kernel_size",
    "rotations_and_flips",
    "view_transforms",
    "active_view_transforms",
]

# ITU-R 601 luma weights (torchvision / PIL use these; TF uses 0.2989, 0.587, 0.114).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
# CPU chunk size (output values) of PretrainAugment: 8 MiB of float32, about cache-sized
_CPU_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------
# helpers


def _outside_autocast(method):
    """Run a transform with autocast off. The training step calls the augmentations inside the
    model's autocast region; there the luma matmul and the blur convolution would return bf16/fp16
    while the rest of the batch is float32 (``index_copy_`` then fails, and views would lose
    precision). Views are computed in float32 whatever the caller's autocast state."""

    @functools.wraps(method)
    def wrapper(self, images, *args, **kwargs):
        device_type = images.device.type if isinstance(images, Tensor) else "cpu"
        if device_type not in ("cpu", "cuda"):  # devices without an autocast of their own
            return method(self, images, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return method(self, images, *args, **kwargs)

    return wrapper


def to_float_images(images: Tensor) -> Tensor:
    """``uint8`` 0..255 or float [0, 1] ``[B, C, H, W]`` -> ``float32`` [0, 1] (new tensor for uint8)."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, got {images.dtype}")
    return images.to(torch.float32)


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            "augmentations draw their parameters on the CPU: pass a CPU torch.Generator "
            f"(got one on {generator.device})"
        )


def _check_range(name: str, value: Sequence[float], low: float | None = None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair of numbers, got {value!r}") from None
    if not (a <= b) or (low is not None and a < low) or not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"{name} must be an increasing pair of numbers >= {low}, got {value!r}")
    return a, b


def _check_prob(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p}")
    return p


def _check_rows(rows: tuple[int, int] | None, batch: int) -> tuple[int, int]:
    """``rows=(offset, total)`` of a forward call (None: the whole batch), checked."""
    if rows is None:
        return 0, batch
    offset, total = (int(v) for v in rows)
    if offset < 0 or offset + batch > total:
        raise ValueError(
            f"rows={rows!r}: a batch of {batch} images does not fit in rows offset:offset+{batch} of {total}"
        )
    return offset, total


def _check_extra(extra) -> tuple:
    """User view transforms: callables ``fn(views, generator) -> views``."""
    extra = tuple(extra or ())
    bad = next((fn for fn in extra if not callable(fn)), None)
    if bad is not None:
        raise ConfigError(f"extra view transforms must be callables fn(views, generator) -> views, got {bad!r}")
    return extra


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def blur_kernel_size(image_size: int) -> int:
    """Blur kernel taps for an ``image_size`` view: ``2 * ((S // 10) // 2) + 1`` (official code)."""
    return 2 * ((image_size // 10) // 2) + 1


def _gray(x: Tensor) -> Tensor:
    """Luma ``[B, 1, H, W]`` of ``[B, 3, H, W]`` (the image itself for 1 channel)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return torch.matmul(w, x.reshape(x.shape[0], 3, -1)).view(x.shape[0], 1, x.shape[2], x.shape[3])


def _mean_gray(x: Tensor) -> Tensor:
    """Per-image mean of the luma, ``[B, 1, 1, 1]`` (mean over pixels first, then the weights)."""
    m = x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)  # [B, C]
    if x.shape[1] == 3:
        m = m @ torch.tensor(_GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return m.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# random resized crop


def random_resized_crop_params(
    batch: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop boxes of torchvision's ``RandomResizedCrop.get_params``, vectorised over the batch.

    For each image: up to 10 tries of (area ~ U[scale] * H * W, aspect ~ log-U[ratio]),
    ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``; the first try that
    fits in the image is used, with its top-left corner uniform over the valid positions.  If
    no try fits, a centre crop of the whole image clamped to the aspect-ratio range.

    ``height`` and ``width``: the images' size, or each image's (int64 CPU tensors ``[batch]``:
    images of different sizes, each crop drawn against its own image).
    Returns an ``int64`` CPU tensor ``[batch, 4]`` of ``(top, left, h, w)`` in pixels.
    Draws ``22 * batch`` numbers from ``generator`` (a CPU generator or None for the default).
    """
    _check_generator(generator)
    s0, s1 = _check_range("crop_scale", scale, 0.0)
    r0, r1 = _check_range("crop_ratio", ratio, 0.0)
    if r0 <= 0.0:
        raise ConfigError(f"crop_ratio must be positive, got {ratio!r}")
    tries = 10
    u = torch.rand(batch, 2 * tries + 2, generator=generator, dtype=torch.float64)
    if isinstance(height, Tensor) or isinstance(width, Tensor):
        height = torch.as_tensor(height, dtype=torch.int64).expand(batch).reshape(batch, 1)
        width = torch.as_tensor(width, dtype=torch.int64).expand(batch).reshape(batch, 1)
        area = (height * width).double()
    else:
        area = float(height * width)
    target_area = area * (s0 + (s1 - s0) * u[:, :tries])
    log_r0, log_r1 = math.log(r0), math.log(r1)
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * u[:, tries : 2 * tries])
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True (or 0 if none)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # fallback: centre crop (torchvision)
    if isinstance(height, Tensor):
        height, width = height.squeeze(1), width.squeeze(1)
        fw, fh = _fallback_crop_sizes(height, width, r0, r1)
    else:
        fw, fh = _fallback_crop_sizes(torch.tensor([height]), torch.tensor([width]), r0, r1)
        fw, fh = int(fw), int(fh)
    w = torch.where(found, w, fw if isinstance(fw, Tensor) else torch.full_like(w, fw))
    h = torch.where(found, h, fh if isinstance(fh, Tensor) else torch.full_like(h, fh))
    top = torch.floor(u[:, 2 * tries] * (height - h + 1).double()).long()
    left = torch.floor(u[:, 2 * tries + 1] * (width - w + 1).double()).long()
    top = torch.minimum(top, height - h)
    left = torch.minimum(left, width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback_crop_sizes(height: Tensor, width: Tensor, r0: float, r1: float) -> tuple[Tensor, Tensor]:
    """(w, h) of torchvision's fallback: the whole image, clamped to the aspect-ratio range [r0, r1]."""
    in_ratio = width.double() / height.double()
    narrow, wide = in_ratio < r0, in_ratio > r1
    fw = torch.where(wide, torch.round(height.double() * r1).long(), width)
    fh = torch.where(narrow, torch.round(width.double() / r0).long(), height)
    return fw, fh


def _crop_resize(x: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Bilinear crop of ``boxes`` (CPU ``[B, 4]`` top, left, h, w) resized to ``size``, flipped where ``flip``.

    One ``grid_sample`` for the whole batch on the grid of ``affine_grid`` for the per-image
    affine map (scale ``w / W``, negative when flipped; align_corners=False, so a box of
    pixels ``[left, left + w)`` maps exactly onto the output pixels; border padding).
    """
    _, _, height, width = x.shape
    b = boxes.to(torch.float64)
    top, left, h, w = b.unbind(1)
    sx = w / width
    sx = torch.where(flip, -sx, sx)
    tx = (2.0 * left + w) / width - 1.0
    sy = h / height
    ty = (2.0 * top + h) / height - 1.0
    # the grid is separable (axis-aligned box): build it directly rather than with
    # affine_grid, whose [B, S*S, 3] x [B, 3, 2] bmm is slow on the CPU
    base = (torch.arange(size, dtype=torch.float64) * 2.0 + 1.0) / size - 1.0  # pixel centres in (-1, 1)
    gx = (sx[:, None] * base[None, :] + tx[:, None]).to(device=x.device, dtype=x.dtype, non_blocking=True)
    gy = (sy[:, None] * base[None, :] + ty[:, None]).to(device=x.device, dtype=x.dtype, non_blocking=True)
    batch = x.shape[0]
    # built as [B, 2, S, S] and viewed as [B, S, S, 2]: faster to fill, and grid_sample is
    # faster on this layout on the CPU
    grid = torch.stack(
        [gx.view(batch, 1, size).expand(batch, size, size), gy.view(batch, size, 1).expand(batch, size, size)], dim=1
    ).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_resize_each(batch: ImageBatch, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Images of different sizes: each image's box (CPU ``[B, 4]`` top, left, h, w, inside the image)
    resized to ``size x size`` (bilinear, antialiased when shrinking: the box may be larger than
    the view), flipped where ``flip``; float32 ``[B, C, S, S]`` in [0, 1]. One resize per image."""
    out = torch.empty((len(batch), batch.shape[1], size, size), dtype=torch.float32, device=batch.device)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = batch.pixels[i : i + 1, :, top : top + h, left : left + w].to(torch.float32)
        view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i] = view[0].flip(-1) if flip[i] else view[0]
    return out.div_(255.0).clamp_(0.0, 1.0)


def _crop(images: Tensor | ImageBatch, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """The crop + resize + flip of a view: one ``grid_sample`` for a tensor batch, one resize per
    image for an :class:`ImageBatch`."""
    if isinstance(images, ImageBatch):
        return _crop_resize_each(images, boxes, flip, size)
    return _crop_resize(to_float_images(images), boxes, flip, size)


def _sizes(images: Tensor | ImageBatch, offset: int, total: int) -> tuple[int | Tensor, int | Tensor]:
    """(height, width) to draw the crops of a batch's ``total`` rows against: the batch's for a
    tensor; each image's for an ImageBatch (this slice's rows; the other rows' boxes are drawn, to
    keep the draws those of the whole batch, but not used)."""
    if not isinstance(images, ImageBatch):
        return images.shape[2], images.shape[3]
    hw = torch.ones((total, 2), dtype=torch.int64)
    hw[offset : offset + len(images)] = images.sizes
    return hw[:, 0], hw[:, 1]


EVAL_CROP_FRACTION = 0.875  # the evaluation view keeps the central 87.5% of the shorter side (docs/method.md §5)
EVAL_CROP_ABOVE = 32  # ... of images whose shorter side is longer than this; smaller ones are not cropped


def _eval_boxes(sizes: Tensor, crop_fraction: float) -> Tensor:
    """The central square of ``crop_fraction`` of each image's shorter side (none for images of at
    most 32 px: the whole image), as ``[B, 4]`` boxes (offsets as the official ``center_crop``)."""
    h, w = sizes[:, 0], sizes[:, 1]
    short = torch.minimum(h, w)
    side = torch.round(crop_fraction * short.double()).long().clamp_min(1)  # round half to even
    small = short <= EVAL_CROP_ABOVE
    bh, bw = torch.where(small, h, side), torch.where(small, w, side)
    return torch.stack([(h - bh + 1) // 2, (w - bw + 1) // 2, bh, bw], dim=1)


def eval_crop_box(height: int, width: int, crop_fraction: float = EVAL_CROP_FRACTION) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the evaluation crop of one ``height`` x ``width`` image."""
    top, left, bh, bw = _eval_boxes(torch.tensor([[height, width]]), crop_fraction)[0].tolist()
    return top, left, bh, bw


def _apply_extra(extra: Sequence, views: Tensor, generator: torch.Generator | None) -> Tensor:
    """The user's view transforms (``extra``), in order, on the finished views, with a generator of
    their own seeded from ``generator`` (one draw, after every built-in one)."""
    if not extra:
        return views
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    g = torch.Generator().manual_seed(seed)
    for fn in extra:
        out = fn(views, g)
        if not isinstance(out, Tensor) or out.shape != views.shape:
            raise ValueError(f"view transform {getattr(fn, '__name__', fn)!r} must return a tensor of shape "
                             f"{tuple(views.shape)}, got {getattr(out, 'shape', type(out).__name__)}")
        views = out
    return views


_VIEW_TRANSFORMS: contextvars.ContextVar[tuple] = contextvars.ContextVar("simclrv2_view_transforms", default=())


@contextlib.contextmanager
def view_transforms(fns: Sequence[Callable]) -> Iterator[None]:
    """Within the block, the stages add ``fns`` to their training views (``extra`` of
    :class:`PretrainAugment` and :class:`FinetuneAugment`). The stage functions' ``view_transforms=``."""
    token = _VIEW_TRANSFORMS.set(_check_extra(fns))
    try:
        yield
    finally:
        _VIEW_TRANSFORMS.reset(token)


def active_view_transforms() -> tuple:
    """The view transforms of the enclosing :func:`view_transforms` block (none outside one)."""
    return _VIEW_TRANSFORMS.get()


def rotations_and_flips(views: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A view transform for images without a preferred orientation (microscopy, satellite images,
    industrial parts): each view rotated by a random multiple of 90 degrees, then flipped vertically
    with probability 0.5. Use it as ``extra=[rotations_and_flips]`` (square views)."""
    batch = views.shape[0]
    k = torch.randint(0, 4, (batch,), generator=generator)
    vflip = torch.rand(batch, generator=generator) < 0.5
    out = views.clone()
    for turns in range(1, 4):
        idx = (k == turns).nonzero().squeeze(1).to(views.device)
        if idx.numel():
            out.index_copy_(0, idx, torch.rot90(views.index_select(0, idx), turns, dims=(2, 3)))
    idx = vflip.nonzero().squeeze(1).to(views.device)
    if idx.numel():
        out.index_copy_(0, idx, out.index_select(0, idx).flip(2))
    return out


# --------------------------------------------------------------------------------------------
# colour


def _hue_shift(x: Tensor, delta: Tensor) -> Tensor:
    """Rotate the HSV hue of ``[N, 3, H, W]`` images by ``delta`` (``[N]``, fraction of a turn).

    Value ``V`` (max) and chroma ``C`` (max - min) are unchanged.  With the hue ``h`` in
    sextants, the RGB values are rebuilt as ``V - C * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + h + 6 delta) mod 6`` and n = 5, 3, 1 for R, G, B (``min(k, 4 - k) = 2 - |k - 2|``).
    The max channel is selected arithmetically (``sign(c - V) + 1`` is 1 where ``c`` is the max,
    first of r, g, b on ties), which is much faster than ``torch.where`` on CPU.  Returns a new
    tensor; ``x`` is not modified.
    """
    maxc = x.amax(dim=1, keepdim=True)
    chroma = maxc - x.amin(dim=1, keepdim=True)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    is_r = (r - maxc).sign_().add_(1.0)  # 1 where r is the max, else 0
    is_g = (g - maxc).sign_().add_(1.0).mul_(1.0 - is_r)  # g is the max and r is not
    # h * C = (r - g) + 4C          if b is the max
    #       = (b - r) + 2C          if g is the max
    #       = (g - b)               if r is the max
    base = (r - g).add_(chroma, alpha=4.0)
    num = base + is_g * ((b - r).add_(chroma, alpha=2.0).sub_(base))
    num.addcmul_(is_r, (g - b).sub_(num))
    h = num.div_(chroma.clamp_min(1e-12))  # chroma == 0: num == 0, h == 0 (any value works)
    # reduce the shift into [0, 6) so that k lies in [0, 16)
    h.add_(torch.remainder(delta.to(x.dtype) * 6.0, 6.0).view(-1, 1, 1, 1))
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = h + n  # [N, 3, H, W], in [0, 16)
    k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))  # mod 6
    k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return k.mul_(chroma).neg_().add_(maxc).clamp_(0.0, 1.0)


def _color_jitter(
    x: Tensor,
    apply: Tensor,
    factors: Tensor,
    order: Tensor,
) -> Tensor:
    """Per-image colour jitter in a per-image random order, clipped to [0, 1] after each op.

    ``apply`` [B] bool, ``factors`` [B, 4] (brightness, contrast, saturation factors, hue
    delta), ``order`` [B, 4] permutation of the op ids; all on the CPU.

    Brightness, contrast and saturation are all ``a * x + b * gray(x) + c * mean(gray(x))``
    with per-image ``(a, b, c)``, so each of the 4 positions costs one batched affine op (images
    whose op at this position is hue, or that are not jittered, get the identity); the hue op
    runs only on the images whose op at this position is hue (gathered and scattered back).
    Works in place on ``x`` (which must not be the caller's input) and returns it.
    """
    batch, channels = x.shape[0], x.shape[1]
    device = x.device
    bri, con, sat, hue = factors.unbind(1)
    coef = torch.zeros(4, 3, batch, dtype=torch.float64)  # [position, (a, b, c), image]
    hue_index: list[Tensor | None] = []
    for pos in range(4):
        op = order[:, pos]
        is_b = apply & (op == _BRIGHTNESS)
        is_c = apply & (op == _CONTRAST)
        is_s = apply & (op == _SATURATION) & (channels == 3)
        is_h = apply & (op == _HUE) & (channels == 3)
        one = torch.ones_like(bri)
        a = torch.where(is_b, bri, torch.where(is_c, con, torch.where(is_s, sat, one)))
        coef[pos, 0] = a
        coef[pos, 1] = torch.where(is_s, 1.0 - sat, torch.zeros_like(sat))
        coef[pos, 2] = torch.where(is_c, 1.0 - con, torch.zeros_like(con))
        idx = is_h.nonzero().squeeze(1)
        hue_index.append(idx.to(device, non_blocking=True) if idx.numel() else None)
    need_gray = (coef[:, 1] != 0).any(dim=1).tolist()  # per position: some saturation
    need_mean = (coef[:, 2] != 0).any(dim=1).tolist()  # per position: some contrast
    need_affine = ((coef[:, 0] != 1) | (coef[:, 1] != 0) | (coef[:, 2] != 0)).any(dim=1).tolist()
    coef_dev = coef.to(device=device, dtype=x.dtype, non_blocking=True)
    hue_dev = hue.to(device=device, dtype=x.dtype, non_blocking=True)

    for pos in range(4):
        if need_affine[pos]:
            a = coef_dev[pos, 0].view(-1, 1, 1, 1)
            if need_gray[pos]:  # saturation: per-pixel offset b * gray (+ c * mean for contrast)
                offset = _gray(x).mul_(coef_dev[pos, 1].view(-1, 1, 1, 1))
                if need_mean[pos]:
                    offset.add_(coef_dev[pos, 2].view(-1, 1, 1, 1) * _mean_gray(x))
                torch.addcmul(offset, x, a, out=x)
            elif need_mean[pos]:  # per-image offset c * mean (of x before this op)
                offset = coef_dev[pos, 2].view(-1, 1, 1, 1) * _mean_gray(x)
                x.mul_(a).add_(offset)
            else:
                x.mul_(a)
            x.clamp_(0.0, 1.0)
        idx = hue_index[pos]
        if idx is not None:
            x.index_copy_(0, idx, _hue_shift(x.index_select(0, idx), hue_dev.index_select(0, idx)))
    return x


def _grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace (in place) the images where ``mask`` (CPU [B] bool) by their luma on all 3 channels."""
    if x.shape[1] == 1 or not bool(mask.any()):
        return x
    idx = mask.nonzero().squeeze(1).to(x.device, non_blocking=True)
    return x.index_copy_(0, idx, _gray(x.index_select(0, idx)).expand(-1, 3, -1, -1))


def _gaussian_blur(x: Tensor, mask: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """Separable Gaussian blur with per-image ``sigma`` on the images where ``mask`` (CPU [B]).

    The images to blur are gathered, filtered by a depthwise (grouped) 1-D convolution along
    each axis with their own kernel (reflect padding) and scattered back into ``x`` (in place).
    The number of gathered images is rounded up to a multiple of ``ceil(B / 8)`` by adding
    images that get a unit (identity) kernel, so that the convolution sees at most 9 distinct
    shapes per batch size (oneDNN builds a kernel per shape on the CPU, tens of ms, then caches
    it).
    """
    radius = ksize // 2
    batch, channels, height, width = x.shape
    radius = min(radius, height - 1, width - 1)  # reflect padding needs radius < side
    n = int(mask.sum())
    if radius <= 0 or n == 0:
        return x
    ksize = 2 * radius + 1
    quantum = -(-batch // 8)
    n_pad = min(batch, -(-n // quantum) * quantum)
    idx_cpu = torch.cat([mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)[: n_pad - n]])
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kern = torch.exp(-(offsets**2)[None, :] / (2.0 * sigma[idx_cpu[:n], None].double() ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # [n, K]
    identity = torch.zeros(n_pad - n, ksize, dtype=torch.float64)
    identity[:, radius] = 1.0
    kern = torch.cat([kern, identity]).repeat_interleave(channels, dim=0)  # [n_pad * C, K]
    kern = kern.to(device=x.device, dtype=x.dtype, non_blocking=True)
    idx = idx_cpu.to(x.device, non_blocking=True)
    groups = n_pad * channels
    sub = x.index_select(0, idx).view(1, groups, height, width)
    sub = F.pad(sub, (radius, radius, radius, radius), mode="reflect")
    sub = F.conv2d(sub, kern.view(groups, 1, 1, ksize), groups=groups)
    sub = F.conv2d(sub, kern.view(groups, 1, ksize, 1), groups=groups)
    return x.index_copy_(0, idx, sub.view(n_pad, channels, height, width))


# --------------------------------------------------------------------------------------------
# modules


class PretrainAugment(torch.nn.Module):
    """SimCLR pretraining view: crop, flip, colour jitter, grayscale, optional blur (docs/method.md §5).

    ``forward(images, generator=None)``: ``images`` uint8 ``[B, C, H, W]`` or float in [0, 1]
    (C = 1 or 3); returns float32 ``[B, C, image_size, image_size]`` in [0, 1] on the images'
    device.  Call twice for two views, or :meth:`views` once.  ``generator`` must be a CPU generator (see the module
    docstring); the same generator state gives the same output.

    ``rows=(offset, total)``: ``images`` are rows ``offset:offset+B`` of a batch of ``total``
    images; the parameters are drawn for all ``total`` rows (the same draws as one call on the
    whole batch) and those of this slice applied. Each process of a multi-process run holds a
    slice of the global batch and gets the views one process would make.
    """

    def __init__(
        self,
        image_size: int,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        color_strength=0.5,
        color_p=0.8,
        gray_p=0.2,
        blur: bool = False,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
        extra: Sequence = (),
    ):
        super().__init__()
        if int(image_size) < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size}")
        self.image_size = int(image_size)
        self.crop_scale = _check_range("crop_scale", crop_scale, 0.0)
        if self.crop_scale[1] <= 0:
            raise ConfigError(f"crop_scale must allow a positive area, got {crop_scale!r}")
        self.crop_ratio = _check_range("crop_ratio", crop_ratio, 0.0)
        if self.crop_ratio[0] <= 0:
            raise ConfigError(f"crop_ratio must be positive, got {crop_ratio!r}")
        self.flip_p = _check_prob("flip_p", flip_p)
        self.color_strength = float(color_strength)
        if not (self.color_strength >= 0 and math.isfinite(self.color_strength)):
            raise ConfigError(f"color_strength must be >= 0, got {color_strength}")
        self.color_p = _check_prob("color_p", color_p)
        self.gray_p = _check_prob("gray_p", gray_p)
        self.blur = bool(blur)
        self.blur_p = _check_prob("blur_p", blur_p)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma, 0.0)
        if self.blur_sigma[0] <= 0:
            raise ConfigError(f"blur_sigma must be positive, got {blur_sigma!r}")
        self.extra = _check_extra(extra)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"flip_p={self.flip_p}, color_strength={self.color_strength}, color_p={self.color_p}, "
            f"gray_p={self.gray_p}, blur={self.blur}, blur_p={self.blur_p}, blur_sigma={self.blur_sigma}"
        )

    def sample_params(self, batch: int, height: int | Tensor, width: int | Tensor,
                      generator: torch.Generator | None = None) -> dict:
        """All random parameters of a batch (CPU tensors), in a fixed draw order (``height``,
        ``width``: per image for images of different sizes, see :func:`random_resized_crop_params`)."""
        _check_generator(generator)
        boxes = random_resized_crop_params(batch, height, width, self.crop_scale, self.crop_ratio, generator)
        flip = torch.rand(batch, generator=generator) < self.flip_p
        s = self.color_strength
        lo = max(0.0, 1.0 - 0.8 * s)
        hi = 1.0 + 0.8 * s
        jitter = torch.rand(batch, generator=generator) < self.color_p
        factors = torch.stack(
            [
                _uniform(batch, lo, hi, generator),  # brightness
                _uniform(batch, lo, hi, generator),  # contrast
                _uniform(batch, lo, hi, generator),  # saturation
                _uniform(batch, -0.2 * s, 0.2 * s, generator),  # hue
            ],
            dim=1,
        )
        order = torch.rand(batch, 4, generator=generator).argsort(dim=1)
        gray = torch.rand(batch, generator=generator) < self.gray_p
        blur = torch.rand(batch, generator=generator) < self.blur_p
        sigma = _uniform(batch, self.blur_sigma[0], self.blur_sigma[1], generator)
        if not self.blur:
            blur = torch.zeros_like(blur)
        return {
            "boxes": boxes,
            "flip": flip,
            "jitter": jitter,
            "factors": factors,
            "order": order,
            "gray": gray,
            "blur": blur,
            "sigma": sigma,
        }

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> Tensor:
        return self.views(images, generator, rows, n=1)

    @_outside_autocast
    def views(
        self, images: Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
        n: int = 2,
    ) -> Tensor:
        """``n`` views of each image as one batch ``[n * B, C, S, S]`` = [view 1; view 2; ...]:
        ``torch.cat([self(images, generator, rows) for _ in range(n)])`` (the parameters are drawn
        in the same order) with fewer, larger ops when the images are small (one pass over all
        the views instead of one per view). Bit-identical for 1 channel; for 3 channels up to
        float rounding (the luma's small matrix products may round differently by batch size)."""
        if len(images.shape) != 4:
            raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(images.shape)}")
        batch = images.shape[0]
        offset, total = _check_rows(rows, batch)
        height, width = _sizes(images, offset, total)
        draws = [self.sample_params(total, height, width, generator) for _ in range(n)]
        if self.extra:
            return _apply_extra(self.extra, self._views(images, draws, offset, total, n), generator)
        return self._views(images, draws, offset, total, n)

    def _views(self, images: Tensor | ImageBatch, draws: list[dict], offset: int, total: int, n: int) -> Tensor:
        batch, channels = images.shape[0], images.shape[1]
        if n == 1 and total == batch:
            p = draws[0]
        else:
            p = {k: torch.cat([d[k][offset : offset + batch] for d in draws]) for k in draws[0]}
        size = self.image_size
        views = n * batch
        # On the CPU the views are processed in chunks of about _CPU_CHUNK_ELEMENTS output values
        # so that the ~20 elementwise passes of the colour ops run in cache (~2x faster at
        # 224 px); on other devices all the views are one chunk.
        chunk = views
        if images.device.type == "cpu":
            chunk = max(1, min(views, _CPU_CHUNK_ELEMENTS // (channels * size * size)))
        if chunk >= views and (n == 1 or not self.blur):  # (the blur batches its images per chunk: per view, then)
            return self._view(images if n == 1 else images.repeat(n, 1, 1, 1), p, 0, views)
        out = torch.empty(views, channels, size, size, dtype=torch.float32, device=images.device)
        for k in range(n):
            for start in range(0, batch, chunk):
                stop = min(batch, start + chunk)
                row = k * batch + start
                out[row : row + stop - start] = self._view(images[start:stop], p, row, row + stop - start)
        return out

    def _view(self, images: Tensor, p: dict, start: int, stop: int) -> Tensor:
        """Views of ``images`` (the slice ``start:stop`` of the batch whose parameters are ``p``)."""
        x = _crop(images, p["boxes"][start:stop], p["flip"][start:stop], self.image_size)  # in [0, 1]
        jitter = p["jitter"][start:stop]
        if self.color_strength > 0 and bool(jitter.any()):
            x = _color_jitter(x, jitter, p["factors"][start:stop], p["order"][start:stop])
        x = _grayscale(x, p["gray"][start:stop])
        if self.blur:
            x = _gaussian_blur(
                x, p["blur"][start:stop], p["sigma"][start:stop], blur_kernel_size(self.image_size)
            )
        return x.clamp_(0.0, 1.0)


class FinetuneAugment(torch.nn.Module):
    """Fine-tuning / distillation view: random (resized) crop + horizontal flip only (docs/method.md §5).

    With ``pad_crop > 0``: zero-pad by ``pad_crop`` pixels on each side, take a random
    ``image_size`` crop (exact pixel values, CIFAR style) and flip; the padded image must be at
    least ``image_size`` on each side.  Otherwise a random resized crop as in
    :class:`PretrainAugment`.  Same input / output / generator / ``rows`` contract as
    PretrainAugment.
    """

    def __init__(
        self,
        image_size: int,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        pad_crop: int = 0,
        extra: Sequence = (),
    ):
        super().__init__()
        if int(image_size) < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size}")
        self.image_size = int(image_size)
        self.crop_scale = _check_range("crop_scale", crop_scale, 0.0)
        self.crop_ratio = _check_range("crop_ratio", crop_ratio, 0.0)
        if self.crop_ratio[0] <= 0 or self.crop_scale[1] <= 0:
            raise ConfigError(f"invalid crop_scale {crop_scale!r} / crop_ratio {crop_ratio!r}")
        self.flip_p = _check_prob("flip_p", flip_p)
        self.pad_crop = int(pad_crop)
        if self.pad_crop < 0:
            raise ConfigError(f"pad_crop must be >= 0, got {pad_crop}")
        self.extra = _check_extra(extra)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"flip_p={self.flip_p}, pad_crop={self.pad_crop}"
        )

    @_outside_autocast
    def forward(
        self, images: Tensor | ImageBatch, generator: torch.Generator | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        return _apply_extra(self.extra, self._forward(images, generator, rows), generator)

    def _forward(self, images: Tensor | ImageBatch, generator: torch.Generator | None, rows) -> Tensor:
        _check_generator(generator)
        if len(images.shape) != 4:
            raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(images.shape)}")
        batch = images.shape[0]
        offset, total = _check_rows(rows, batch)
        mine = slice(offset, offset + batch)
        size = self.image_size
        if self.pad_crop > 0 and isinstance(images, ImageBatch):
            # pad-and-crop works on images of the view's size: each image's central square first (the
            # evaluation's geometry, whole shorter side)
            images = _crop_resize_each(images, _eval_boxes(images.sizes, 1.0), torch.zeros(batch, dtype=torch.bool),
                                       size)
        batch, channels, height, width = images.shape
        if self.pad_crop > 0:
            pad = self.pad_crop
            hp, wp = height + 2 * pad, width + 2 * pad
            if hp < size or wp < size:
                raise ValueError(
                    f"pad_crop={pad}: padded images {hp}x{wp} are smaller than image_size={size}"
                )
            u = torch.rand(total, 2, generator=generator, dtype=torch.float64)[mine]
            flip = (torch.rand(total, generator=generator) < self.flip_p)[mine]
            top = torch.floor(u[:, 0] * (hp - size + 1)).long().clamp_(max=hp - size)
            left = torch.floor(u[:, 1] * (wp - size + 1)).long().clamp_(max=wp - size)
            ar = torch.arange(size)
            rows = top[:, None] + ar  # [B, S]
            cols = left[:, None] + ar
            cols = torch.where(flip[:, None], cols.flip(1), cols)
            rows = rows.to(images.device, non_blocking=True)
            cols = cols.to(images.device, non_blocking=True)
            padded = F.pad(images, (pad, pad, pad, pad))  # zeros, in the input dtype
            out = padded.gather(2, rows.view(batch, 1, size, 1).expand(batch, channels, size, wp))
            out = out.gather(3, cols.view(batch, 1, 1, size).expand(batch, channels, size, size))
            x = to_float_images(out)
            return x if out.dtype == torch.uint8 else x.clamp_(0.0, 1.0)  # uint8 / 255 is in [0, 1] already
        height, width = _sizes(images, offset, total)
        boxes = random_resized_crop_params(total, height, width, self.crop_scale, self.crop_ratio, generator)[mine]
        flip = (torch.rand(total, generator=generator) < self.flip_p)[mine]
        return _crop(images, boxes, flip, size).clamp_(0.0, 1.0)


class EvalTransform(torch.nn.Module):
    """Evaluation view: centre crop keeping ``crop_fraction`` of the side, then resize (docs/method.md §5).

    The crop is the central square of side ``round(crop_fraction * min(H, W))`` (offsets
    ``(H - side + 1) // 2`` as the official code), resized to ``image_size`` (bilinear,
    antialiased; no resize when the crop already has that size, so values are exact).  Images
    of at most 32 px are not cropped, only resized when their size differs from
    ``image_size``.  Deterministic; returns float32 in [0, 1] on the images' device.
    """

    def __init__(self, image_size: int, crop_fraction=EVAL_CROP_FRACTION):
        super().__init__()
        if int(image_size) < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size}")
        self.image_size = int(image_size)
        self.crop_fraction = float(crop_fraction)
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ConfigError(f"crop_fraction must be in (0, 1], got {crop_fraction}")

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, crop_fraction={self.crop_fraction}"

    @_outside_autocast
    def forward(self, images: Tensor | ImageBatch) -> Tensor:
        if isinstance(images, ImageBatch):  # each image cropped and resized on its own
            boxes = _eval_boxes(images.sizes, self.crop_fraction)
            return _crop_resize_each(images, boxes, torch.zeros(len(images), dtype=torch.bool), self.image_size)
        x = to_float_images(images)
        _, _, height, width = x.shape
        if min(height, width) > EVAL_CROP_ABOVE:
            side = max(1, int(round(self.crop_fraction * min(height, width))))
            top = (height - side + 1) // 2
            left = (width - side + 1) // 2
            x = x[:, :, top : top + side, left : left + side]
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        return torch.clamp(x, 0.0, 1.0).contiguous()  # out of place: never aliases the input
