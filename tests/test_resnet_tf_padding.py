"""TF parity of the ResNet's padding (models/resnet.py): 'SAME' max-pool, ResNet-D shortcut pools, fixed-padding convs.

References are computed independently of the modules under test: explicit padding followed by
'VALID' operations, or plain loops over windows clipped at the border, as TF defines them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclrv2.models import build_resnet, sk_options
from simclrv2.models.resnet import AvgPool2dFixedPadding, AvgPool2dSame, MaxPool2dSame, tf_same_padding


def _tf_same_pool_loop(x: np.ndarray, k: int, s: int, op) -> np.ndarray:
    """TF 'SAME' pooling by definition: out = ceil(n / s); window i starts at i*s - pad_before and is
    clipped to the image (padding is never part of a max, and not counted in an average)."""
    n, c, h, w = x.shape
    oh, ow = -(-h // s), -(-w // s)
    ph = max((oh - 1) * s + k - h, 0) // 2
    pw = max((ow - 1) * s + k - w, 0) // 2
    out = np.zeros((n, c, oh, ow), dtype=np.float64)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - ph, j * s - pw
            win = x[:, :, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w)]
            out[:, :, i, j] = op(win.reshape(n, c, -1), axis=2)
    return out


@pytest.mark.parametrize("n,expected", [(8, (0, 1)), (112, (0, 1)), (7, (1, 1)), (113, (1, 1)), (1, (1, 1))])
def test_same_padding_of_the_3x3_stride_2_max_pool(n, expected):
    assert tf_same_padding(n, 3, 2) == expected
    assert tf_same_padding(n, 2, 1) == (0, 1)  # the stride-1 2x2 shortcut pool: bottom/right only


@pytest.mark.parametrize("size", [8, 9, 14, 15])
def test_max_pool_same_matches_tf_definition(size):
    x = torch.randn(2, 3, size, size + 2, generator=torch.Generator().manual_seed(size))
    got = MaxPool2dSame(3, 2)(x)
    ref = _tf_same_pool_loop(x.double().numpy(), 3, 2, np.max)
    assert got.shape == ref.shape and np.allclose(got.numpy(), ref, atol=0)
    if size % 2 == 0:  # even: PyTorch's symmetric padding 1 would shift every window by one pixel
        assert not torch.equal(got, F.max_pool2d(x, 3, 2, 1)[..., : got.shape[-2], : got.shape[-1]])


@pytest.mark.parametrize("size", [5, 6, 7, 8])
def test_stride_1_shortcut_avg_pool_excludes_padding(size):
    x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(size))
    got = AvgPool2dSame(2, 1)(x)
    ref = _tf_same_pool_loop(x.double().numpy(), 2, 1, np.mean)
    assert got.shape == x.shape and np.allclose(got.numpy(), ref, atol=1e-6)
    # the last row/column average 2 (corner: 1) real pixels, not 4 with zeros
    assert torch.allclose(got[..., -1, -1], x[..., -1, -1])


@pytest.mark.parametrize("size", [6, 7])
def test_strided_shortcut_pool_is_fixed_padding_then_valid(size):
    x = torch.randn(1, 2, size, size, generator=torch.Generator().manual_seed(size))
    got = AvgPool2dFixedPadding(2)(x)
    padded = np.pad(x.double().numpy(), ((0, 0), (0, 0), (0, 1), (0, 1)))  # tf.pad [[0,0],[0,1],[0,1]] zeros
    o = (padded.shape[-1] - 2) // 2 + 1
    ref = np.stack([np.stack([padded[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(2, 3)) for j in range(o)], -1)
                    for i in range(o)], -2)
    assert got.shape == ref.shape and np.allclose(got.numpy(), ref, atol=1e-6)
    if size % 2 == 0:
        assert torch.allclose(got, F.avg_pool2d(x, 2, 2))


@pytest.mark.parametrize("k,stride,size", [(7, 2, 32), (7, 2, 33), (3, 2, 16), (3, 2, 17), (3, 1, 16), (1, 2, 15)])
def test_strided_convs_equal_tf_fixed_padding(k, stride, size):
    """TF conv2d_fixed_padding: pad_beg = (k-1)//2, pad_end = k-1-pad_beg, then 'VALID' (stride > 1) or 'SAME'
    (stride 1, symmetric for odd k). For odd k this is PyTorch's symmetric padding (k-1)//2."""
    g = torch.Generator().manual_seed(k * 100 + size)
    x = torch.randn(1, 3, size, size, generator=g)
    w = torch.randn(4, 3, k, k, generator=g)
    beg = (k - 1) // 2
    end = k - 1 - beg
    assert beg == end
    tf = F.conv2d(F.pad(x, (beg, end, beg, end)), w, stride=stride)
    ours = F.conv2d(x, w, stride=stride, padding=(k - 1) // 2)
    assert torch.allclose(tf, ours, atol=1e-5)


@pytest.mark.parametrize("sk", [False, True])
def test_stem_output_for_even_input_equals_explicitly_padded_reference(sk):
    torch.manual_seed(0)
    enc = build_resnet(50, 0.0625, **sk_options(sk)).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        # ours
        y = enc.conv1(x) if enc.conv1 is not None else enc.stem(x)
        got = enc.maxpool(F.relu(enc.bn1(y)))
        # reference: TF's explicit fixed padding + VALID convs, then 'SAME' max-pool = pad bottom/right, VALID
        if sk:
            c1, b1, _, c2, b2, _, c3 = enc.stem
            r = F.conv2d(F.pad(x, (1, 1, 1, 1)), c1.weight, stride=2)
            r = F.relu(b1(r))
            r = F.relu(b2(F.conv2d(r, c2.weight, padding=1)))  # stride 1: 'SAME'
            r = F.conv2d(r, c3.weight, padding=1)
        else:
            r = F.conv2d(F.pad(x, (3, 3, 3, 3)), enc.conv1.weight, stride=2)
        r = F.relu(enc.bn1(r))
        assert r.shape[-1] == 32  # even
        ref = F.max_pool2d(F.pad(r, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    assert got.shape == (2, enc.bn1.num_features, 16, 16)
    assert torch.equal(got, ref)
    loop = _tf_same_pool_loop(r.double().numpy(), 3, 2, np.max)
    assert np.allclose(got.numpy(), loop, atol=0)


def test_sk_first_block_shortcut_pools_and_odd_sizes_run():
    enc = build_resnet(50, 0.0625, **sk_options(True)).eval()
    assert isinstance(enc.layer1[0].downsample[0], AvgPool2dSame)
    assert isinstance(enc.layer2[0].downsample[0], AvgPool2dFixedPadding)
    for size in (50, 65):  # odd intermediate sizes: TF's fixed padding keeps the branches aligned
        assert enc(torch.rand(1, 3, size, size)).shape == (1, enc.out_dim)
