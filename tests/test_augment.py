"""Tests of the batched augmentations (docs/method.md §5): parameter distributions, semantics, determinism."""

from __future__ import annotations

import colorsys
import math

import pytest
import torch

from simclrv2.data import augment as A
from simclrv2.data.augment import EvalTransform, FinetuneAugment, PretrainAugment, random_resized_crop_params
from simclrv2.errors import ConfigError

N = 4096  # draws for the rate tests


def assert_rate(count: int, n: int, p: float, sigmas: float = 5.0) -> None:
    se = math.sqrt(p * (1 - p) / n)
    rate = count / n
    assert abs(rate - p) <= sigmas * se, f"rate {rate:.4f} vs expected {p} (+-{sigmas} x {se:.4f})"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ramp_image(batch: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    """Asymmetric (left-to-right ramp, per-channel different) float image in [0.1, 0.9]."""
    xs = torch.linspace(0.1, 0.9, size)
    img = xs.view(1, 1, 1, size).expand(batch, channels, size, size).clone()
    if channels == 3:
        img[:, 1] = img[:, 1].flip(-1)  # G decreasing
        img[:, 2] = 0.5 + 0.3 * torch.linspace(-1, 1, size).view(size, 1)  # B vertical ramp
    return img


FULL = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # the whole image, no resize


# ------------------------------------------------------------------------------------------
# random resized crop parameters


def test_rrc_params_bounds_large_image():
    H, W = 1000, 1200
    boxes = random_resized_crop_params(N, H, W, (0.08, 1.0), (3 / 4, 4 / 3), gen(1))
    assert boxes.shape == (N, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    area = (h * w).double() / (H * W)
    assert area.min() >= 0.08 * 0.99 and area.max() <= 1.0
    aspect = w.double() / h.double()
    assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
    # log-uniform aspect: on a square image log(aspect) is symmetric around 0 (sd ~0.17)
    sq = random_resized_crop_params(N, 1000, 1000, (0.08, 1.0), (3 / 4, 4 / 3), gen(1))
    assert abs((sq[:, 3].double() / sq[:, 2].double()).log().mean().item()) < 0.02
    assert area.min() < 0.1 and area.max() > 0.95
    # positions cover the valid range
    assert (top == 0).any() or top.min() < 5
    assert (left + w == W).any() or (W - (left + w)).min() < 5


def test_rrc_params_bounds_small_image():
    H = W = 32
    boxes = random_resized_crop_params(N, H, W, (0.08, 1.0), (3 / 4, 4 / 3), gen(2))
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    # rounding of w, h to integers: area within the bounds up to half a pixel on each side
    lo = (math.sqrt(0.08 * H * W * 3 / 4) - 0.5) * (math.sqrt(0.08 * H * W / (4 / 3)) - 0.5)
    assert (h * w).min() >= math.floor(lo)
    aspect = w.double() / h.double()
    assert aspect.min() >= 0.5 and aspect.max() <= 2.0


def test_rrc_params_fallback_centre_crop():
    # a 10 x 1000 image: no try fits, so torchvision's fallback is the centre crop of ratio 4/3
    boxes = random_resized_crop_params(64, 10, 1000, (0.5, 1.0), (3 / 4, 4 / 3), gen(3))
    expected = torch.tensor([0, (1000 - 13) // 2, 10, 13])
    assert (boxes == expected).all()
    boxes = random_resized_crop_params(8, 1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), gen(3))
    assert (boxes == torch.tensor([(1000 - 13) // 2, 0, 13, 10])).all()


def test_rrc_params_deterministic():
    a = random_resized_crop_params(256, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(7))
    b = random_resized_crop_params(256, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(7))
    c = random_resized_crop_params(256, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_resize_maps_box_exactly():
    # a crop box resized to its own size is an exact copy of the pixels (up to rounding)
    x = torch.rand(3, 3, 20, 24)
    boxes = torch.tensor([[2, 3, 10, 10], [0, 0, 10, 10], [10, 14, 10, 10]])
    flip = torch.tensor([False, True, False])
    out = A._crop_resize(x, boxes, flip, 10)
    torch.testing.assert_close(out[0], x[0, :, 2:12, 3:13], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 0:10, 0:10].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], x[2, :, 10:20, 14:24], atol=1e-5, rtol=0)
    # 2x downscale of a box: bilinear at the centre of each 2x2 block = block mean
    out = A._crop_resize(x[:1], torch.tensor([[4, 4, 8, 8]]), torch.tensor([False]), 4)
    ref = x[:1, :, 4:12, 4:12].reshape(1, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# rates of the random ops


def _is_flipped(out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    same = (out - img).abs().amax(dim=(1, 2, 3)) < 1e-5
    flipped = (out - img.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same ^ flipped).all(), "every output should be the image or its mirror"
    return flipped


def test_flip_rate_pretrain():
    img = ramp_image(N)
    aug = PretrainAugment(16, **FULL, color_p=0.0, gray_p=0.0)
    out = aug(img, gen(10))
    assert_rate(int(_is_flipped(out, img).sum()), N, 0.5)


def test_flip_rate_finetune_and_no_flip():
    img = ramp_image(N)
    out = FinetuneAugment(16, **FULL)(img, gen(11))
    assert_rate(int(_is_flipped(out, img).sum()), N, 0.5)
    out = FinetuneAugment(16, **FULL, flip_p=0.0)(img, gen(11))
    assert not _is_flipped(out, img).any()


def test_grayscale_rate():
    img = ramp_image(N)
    out = PretrainAugment(16, **FULL, color_p=0.0, gray_p=0.2)(img, gen(12))
    is_gray = ((out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6) & (
        (out[:, 1] - out[:, 2]).abs().amax(dim=(1, 2)) < 1e-6
    )
    assert_rate(int(is_gray.sum()), N, 0.2)
    # the gray images carry the luma of the (possibly flipped) input
    g = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
    o = out[is_gray][:, :1]
    gi = g[is_gray]
    err = torch.minimum((o - gi).abs().amax(dim=(1, 2, 3)), (o - gi.flip(-1)).abs().amax(dim=(1, 2, 3)))
    assert err.max() < 1e-5


def test_jitter_rate():
    torch.manual_seed(0)
    img = 0.2 + 0.6 * torch.rand(N, 3, 8, 8)
    out = PretrainAugment(8, **FULL, flip_p=0.0, color_p=0.8, gray_p=0.0, color_strength=0.5)(img, gen(13))
    changed = (out - img).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert_rate(int(changed.sum()), N, 0.8)


def test_blur_rate_and_kernel_size():
    assert A.blur_kernel_size(224) == 23 and A.blur_kernel_size(32) == 3 and A.blur_kernel_size(64) == 7
    torch.manual_seed(0)
    n = 1024
    img = torch.rand(n, 3, 32, 32)
    aug = PretrainAugment(32, **FULL, flip_p=0.0, color_p=0.0, gray_p=0.0, blur=True, blur_p=0.5)
    out = aug(img, gen(14))
    changed = (out - img).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert_rate(int(changed.sum()), n, 0.5)
    # blurring smooths: lower pixel variance
    assert (out[changed].var(dim=(2, 3)) < img[changed].var(dim=(2, 3))).all()
    # no blur when blur=False
    out = PretrainAugment(32, **FULL, flip_p=0.0, color_p=0.0, gray_p=0.0, blur=False)(img, gen(14))
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# semantics of the colour ops


def test_gaussian_blur_values():
    x = torch.rand(4, 3, 24, 24)
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    out = A._gaussian_blur(x.clone(), torch.tensor([True, False, True, True]), sigma, 7)
    torch.testing.assert_close(out[1], x[1])
    for i in (0, 2, 3):
        t = torch.arange(-3, 4, dtype=torch.float64)
        k = torch.exp(-(t**2) / (2 * sigma[i] ** 2))
        k = (k / k.sum()).float()
        p = torch.nn.functional.pad(x[i : i + 1], (3, 3, 3, 3), mode="reflect")
        ref = torch.nn.functional.conv2d(p.transpose(0, 1), (k[:, None] * k[None, :])[None, None])
        torch.testing.assert_close(out[i], ref.transpose(0, 1)[0], atol=1e-5, rtol=0)
    const = torch.full((2, 3, 16, 16), 0.3)
    out = A._gaussian_blur(const.clone(), torch.tensor([True, True]), sigma[:2], 23)
    torch.testing.assert_close(out, const)


def _jitter_one(x, factors, order):
    b = x.shape[0]
    return A._color_jitter(
        x.clone(),
        torch.ones(b, dtype=torch.bool),
        torch.tensor(factors, dtype=torch.float64).expand(b, 4),
        torch.tensor(order).expand(b, 4),
    )


def _gray_ref(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def test_jitter_op_formulas():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 6, 6)
    order = [0, 1, 2, 3]
    # brightness: multiplicative, clipped
    out = _jitter_one(x, [1.5, 1.0, 1.0, 0.0], order)
    torch.testing.assert_close(out, (x * 1.5).clamp(0, 1))
    # contrast: blend with the per-image mean gray
    m = _gray_ref(x).mean(dim=(1, 2, 3), keepdim=True)
    out = _jitter_one(x, [1.0, 0.4, 1.0, 0.0], order)
    torch.testing.assert_close(out, (0.4 * x + 0.6 * m).clamp(0, 1))
    # saturation: blend with the gray image
    out = _jitter_one(x, [1.0, 1.0, 1.7, 0.0], order)
    torch.testing.assert_close(out, (1.7 * x - 0.7 * _gray_ref(x)).clamp(0, 1))
    # saturation 0: gray
    out = _jitter_one(x, [1.0, 1.0, 0.0, 0.0], order)
    torch.testing.assert_close(out, _gray_ref(x).expand_as(x))


def test_jitter_order_and_clipping():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 5, 5)
    f = [1.6, 0.3, 1.8, 0.1]
    bri = lambda y: (y * 1.6).clamp(0, 1)  # noqa: E731
    con = lambda y: (0.3 * y + 0.7 * _gray_ref(y).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)  # noqa: E731
    sat = lambda y: (1.8 * y - 0.8 * _gray_ref(y)).clamp(0, 1)  # noqa: E731
    hue = lambda y: A._hue_shift(y, torch.full((y.shape[0],), 0.1))  # noqa: E731
    ops = [bri, con, sat, hue]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        ref = x
        for o in order:
            ref = ops[o](ref)
        torch.testing.assert_close(_jitter_one(x, f, order), ref, atol=1e-5, rtol=0)
    # per-image orders within one batch
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]])
    out = A._color_jitter(x.clone(), torch.ones(4, dtype=torch.bool), torch.tensor(f).double().expand(4, 4), orders)
    for i in range(4):
        ref = x[i : i + 1]
        for o in orders[i].tolist():
            ref = ops[o](ref)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_hue_shift_matches_colorsys():
    torch.manual_seed(2)
    x = torch.rand(6, 3, 4, 4)
    x[0, :, 0, 0] = 0.5  # gray pixel
    x[1, :, 0, 0] = torch.tensor([0.7, 0.7, 0.2])  # tie r == g
    x[2, :, 0, 0] = torch.tensor([0.3, 0.9, 0.9])  # tie g == b
    delta = torch.tensor([0.1, -0.1, 0.2, -0.2, 0.5, 0.0])
    out = A._hue_shift(x, delta)
    ref = torch.empty_like(x)
    for b in range(6):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                ref[b, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + delta[b].item()) % 1.0, s, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_factor_ranges():
    aug = PretrainAugment(32, color_strength=1.0)
    p = aug.sample_params(N, 32, 32, gen(3))
    f = p["factors"]
    for i in range(3):
        assert f[:, i].min() >= 0.2 and f[:, i].max() <= 1.8
        assert f[:, i].min() < 0.25 and f[:, i].max() > 1.75
    assert f[:, 3].abs().max() <= 0.2 and f[:, 3].abs().max() > 0.19
    assert (p["order"].sort(dim=1).values == torch.arange(4)).all()
    # each op appears at each position about a quarter of the time
    for pos in range(4):
        assert_rate(int((p["order"][:, pos] == 0).sum()), N, 0.25)
    p = PretrainAugment(32, color_strength=2.0).sample_params(64, 32, 32, gen(3))
    assert p["factors"][:, :3].min() >= 0.0  # lower bound clamped at 0


# ------------------------------------------------------------------------------------------
# shapes, dtypes, ranges, channels, determinism


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_pretrain_shapes_and_range(channels, dtype):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, channels, 40, 36), dtype=torch.uint8)
    if dtype != torch.uint8:
        x = x.to(dtype) / 255
    x_before = x.clone()
    out = PretrainAugment(24, color_strength=1.0, blur=True)(x, gen(4))
    assert out.shape == (64, channels, 24, 24) and out.dtype == torch.float32
    assert out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()
    assert torch.equal(x, x_before)  # input untouched


def test_single_channel_jitter_applies_brightness_contrast():
    torch.manual_seed(0)
    img = 0.2 + 0.6 * torch.rand(N, 1, 8, 8)
    out = PretrainAugment(8, **FULL, flip_p=0.0, color_p=0.8, color_strength=0.5)(img, gen(5))
    assert out.shape == img.shape
    changed = (out - img).abs().amax(dim=(1, 2, 3)) > 1e-4
    # each jittered image gets a brightness and a contrast change; no grayscale/hue effect
    assert_rate(int(changed.sum()), N, 0.8)


def test_determinism():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    aug = PretrainAugment(24, blur=True)
    a = aug(x, gen(123))
    b = aug(x, gen(123))
    c = aug(x, gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # a generator advances: two calls give two different views
    g = gen(5)
    assert not torch.allclose(aug(x, g), aug(x, g))
    f = FinetuneAugment(24, pad_crop=4)
    assert torch.equal(f(x, gen(1)), f(x, gen(1)))
    assert not torch.equal(f(x, gen(1)), f(x, gen(2)))
    f = FinetuneAugment(24)
    assert torch.equal(f(x, gen(1)), f(x, gen(1)))


def test_default_generator_uses_global_seed():
    x = torch.rand(8, 3, 16, 16)
    aug = PretrainAugment(16)
    torch.manual_seed(9)
    a = aug(x)
    torch.manual_seed(9)
    b = aug(x)
    assert torch.equal(a, b)


def test_pad_crop():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (256, 3, 32, 32), dtype=torch.uint8)
    out = FinetuneAugment(32, pad_crop=4)(x, gen(6))
    assert out.shape == (256, 3, 32, 32) and out.dtype == torch.float32
    padded = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    n_flip = 0
    offsets = set()
    for i in range(64):
        found = None
        for t in range(9):
            for l in range(9):
                win = padded[i, :, t : t + 32, l : l + 32]
                if torch.equal(out[i], win):
                    found = (t, l, False)
                elif torch.equal(out[i], win.flip(-1)):
                    found = (t, l, True)
        assert found is not None, f"image {i} is not an exact (flipped) window of the padded image"
        n_flip += found[2]
        offsets.add(found[:2])
    assert 10 < n_flip < 54 and len(offsets) > 10
    # zero padding shows up as exact zeros at some borders
    assert (out == 0).any()
    with pytest.raises(ValueError):
        FinetuneAugment(48, pad_crop=4)(x)


def test_finetune_resized_crop_shapes():
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    out = FinetuneAugment(28)(x, gen(0))
    assert out.shape == (16, 1, 28, 28) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_eval_centre_crop_exact():
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    out = EvalTransform(56)(x)  # 0.875 * 64 = 56: crop of the central 56 px, no resize
    assert out.shape == (4, 3, 56, 56) and out.dtype == torch.float32
    torch.testing.assert_close(out, x[:, :, 4:60, 4:60].float() / 255, atol=0, rtol=0)
    # crop then 2x downscale: a linear ramp is sampled at the centres of the 2x2 blocks
    ramp = torch.arange(64, dtype=torch.float32).div(255).expand(1, 3, 64, 64)
    out = EvalTransform(28)(ramp)
    assert out.shape == (1, 3, 28, 28)
    centres = (4 + 2 * torch.arange(28) + 0.5) / 255
    torch.testing.assert_close(out[0, :, 1:-1, 1:-1], centres[1:-1].expand(3, 26, 26), atol=1e-5, rtol=0)
    # non-square: central square of 0.875 * the shorter side
    y = torch.rand(2, 3, 64, 80)
    torch.testing.assert_close(EvalTransform(56)(y), y[:, :, 4:60, 12:68], atol=0, rtol=0)


def test_eval_skips_crop_for_small_images():
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = EvalTransform(28)(x)
    assert out.shape == (4, 1, 28, 28)
    torch.testing.assert_close(out, x.float() / 255, atol=0, rtol=0)
    out = EvalTransform(32)(x)  # only a resize
    assert out.shape == (4, 1, 32, 32)
    y = torch.rand(2, 3, 32, 32)
    out = EvalTransform(32)(y)
    torch.testing.assert_close(out, y, atol=0, rtol=0)
    assert out.data_ptr() != y.data_ptr()


def test_invalid_arguments():
    with pytest.raises(ConfigError):
        PretrainAugment(32, crop_scale=(0.9, 0.1))
    with pytest.raises(ConfigError):
        PretrainAugment(32, flip_p=1.5)
    with pytest.raises(ConfigError):
        FinetuneAugment(32, pad_crop=-1)
    with pytest.raises(ConfigError):
        EvalTransform(32, crop_fraction=0.0)
    with pytest.raises(ValueError):
        PretrainAugment(32)(torch.rand(2, 4, 32, 32))
    with pytest.raises(ValueError):
        PretrainAugment(32)(torch.rand(3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 48, 48), dtype=torch.uint8)
    aug = PretrainAugment(32, color_strength=1.0, blur=True)
    cpu = aug(x, gen(3))
    gpu = aug(x.cuda(), gen(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    f = FinetuneAugment(48, pad_crop=4)
    torch.testing.assert_close(f(x.cuda(), gen(1)).cpu(), f(x, gen(1)))
    e = EvalTransform(32)
    torch.testing.assert_close(e(x.cuda()).cpu(), e(x), atol=1e-5, rtol=0)


def test_rows_slice_matches_whole_batch():
    # rows=(offset, total): a slice of the global batch gets the views of one whole-batch call
    torch.manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8)
    for aug in (PretrainAugment(24, blur=True, color_strength=1.0), FinetuneAugment(24), FinetuneAugment(24, pad_crop=4)):
        whole = aug(x, gen(5))
        part = aug(x[4:9], gen(5), rows=(4, 12))
        torch.testing.assert_close(part, whole[4:9], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        PretrainAugment(24)(x, gen(5), rows=(8, 12))


@pytest.mark.parametrize("chunk_images", [None, 5])
def test_views_equal_separate_calls(monkeypatch, chunk_images):
    # views(): the n views of one call are those of n calls (same draws), chunked or not; exactly
    # for 1 channel, to float rounding for 3 (the luma's matrix products round by batch size)
    torch.manual_seed(0)
    cases = (((12, 1, 28, 28), 28, {}), ((10, 3, 32, 32), 32, {"color_strength": 1.0}), ((6, 3, 48, 48), 40, {"blur": True}))
    for shape, size, kw in cases:
        if chunk_images:
            monkeypatch.setattr(A, "_CPU_CHUNK_ELEMENTS", chunk_images * shape[1] * size * size)
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        aug = PretrainAugment(size, **kw)
        for rows in (None, (2, shape[0] + 5)):
            g = gen(7)
            separate = torch.cat([aug(x, g, rows=rows), aug(x, g, rows=rows)])
            views = aug.views(x, gen(7), rows=rows)
            assert torch.equal(views, separate) if shape[1] == 1 else torch.allclose(views, separate, atol=1e-6, rtol=0)
        assert aug.views(x, gen(1), n=3).shape == (3 * shape[0], shape[1], size, size)
