import pytest
import torch

from simclrv2.models import Classifier, SimCLRModel, build_resnet, sk_options
from simclrv2.models.head import BatchNorm1dNoShift

# docs/method.md §1 table: encoder parameters in millions, as printed (rounded to whole millions) in the paper.
PAPER_PARAMS = {
    (50, 1, False): 24, (50, 1, True): 35, (50, 2, False): 94, (50, 2, True): 140,
    (101, 1, False): 43, (101, 1, True): 65, (101, 2, False): 170, (101, 2, True): 257,
    (152, 1, False): 58, (152, 1, True): 89, (152, 2, False): 233, (152, 2, True): 354,
    (152, 3, True): 795,
}


@pytest.mark.parametrize("config", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(config):
    depth, width, sk = config
    with torch.device("meta"):
        encoder = build_resnet(depth, width, **sk_options(sk))
    millions = sum(p.numel() for p in encoder.parameters()) / 1e6
    paper = PAPER_PARAMS[config]
    # 2%, or half a million where the paper's rounding to whole millions is coarser (R50: 23.5M printed as 24).
    assert abs(millions - paper) <= max(0.02 * paper, 0.5), (config, millions)
    assert encoder.out_dim == (2048 * width)


@pytest.mark.parametrize("depth,expected", [(18, 512), (34, 512), (50, 2048)])
def test_forward_shapes_and_fractional_width(depth, expected):
    enc = build_resnet(depth, 0.25, stem_type="small", in_channels=1)
    out = enc(torch.rand(2, 1, 16, 16))
    assert out.shape == (2, expected // 4) and enc.out_dim == expected // 4


def test_sk_uses_resnet_d_stem_and_avgpool_shortcuts():
    enc = build_resnet(50, 0.25, **sk_options(True))
    assert enc.conv1 is None and len([m for m in enc.stem if isinstance(m, torch.nn.Conv2d)]) == 3
    strides = [m.stride for m in enc.stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2), (1, 1), (1, 1)]
    ds = enc.layer2[0].downsample
    assert isinstance(ds[0], torch.nn.AvgPool2d) and ds[1].stride == (1, 1)
    sk = enc.layer2[0].conv2
    assert sk.conv.out_channels == 2 * sk.channels and sk.fc1.out_channels == 32
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, enc.out_dim)


def test_plain_resnet_stem_and_strided_shortcut():
    enc = build_resnet(50, 1)
    assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2)
    assert enc.layer2[0].downsample[0].stride == (2, 2)
    assert enc.layer2[0].conv2.stride == (2, 2) and enc.layer2[0].conv1.stride == (1, 1)


def test_small_image_stem_keeps_resolution():
    enc = build_resnet(18, 0.25, stem_type="small")
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, torch.nn.Identity)


def test_last_bn_of_each_branch_is_zero_initialised():
    enc = build_resnet(50, 0.25, **sk_options(True))
    for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
        for block in layer:
            assert torch.all(block.bn3.weight == 0)
            assert block.bn1.weight.abs().sum() > 0
    # with zero-initialised branches, a block is ReLU(shortcut): the identity blocks pass ReLU(x) through
    block = enc.layer1[1].eval()
    x = torch.randn(1, block.conv1.in_channels, 8, 8)
    assert torch.allclose(block(x), torch.relu(x))


def test_bad_depth_and_width_are_value_errors_in_the_library_names():
    with pytest.raises(ValueError, match="ResNet: depth 42"):
        build_resnet(42)
    with pytest.raises(ValueError, match="ResNet: width_multiplier -1"):
        build_resnet(50, -1)


def test_head_structure():
    model = SimCLRModel(build_resnet(18, 0.25, stem_type="small"), head_layers=3)
    d = model.encoder.out_dim
    layers = model.head.layers
    assert [(l.linear.in_features, l.linear.out_features) for l in layers] == [(d, d), (d, d), (d, 128)]
    assert all(l.linear.bias is None for l in layers)
    assert layers[0].bn.bias is not None and layers[1].bn.bias is not None
    assert isinstance(layers[2].bn, BatchNorm1dNoShift) and layers[2].bn.bias is None and layers[2].bn.weight is not None
    h, z = model(torch.rand(4, 3, 16, 16))
    assert h.shape == (4, d) and z.shape == (4, 128)
    hid = model.head.hiddens(h)
    assert len(hid) == 4 and (hid[1] >= 0).all() and (hid[3] < 0).any()  # ReLU on hidden layers, none on the last


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_finetune_model_keeps_exactly_k_head_layers(k):
    model = SimCLRModel(build_resnet(18, 0.25, stem_type="small"), head_layers=3)
    clf = Classifier.from_pretrained(model, num_classes=10, head_layer=k)
    assert clf.head_layer == k
    names = {n.split(".")[2] for n, _ in clf.named_parameters() if n.startswith("head.")}
    assert names == {str(i) for i in range(k)}
    expected_in = 128 if k == 3 else model.encoder.out_dim
    assert clf.fc.in_features == expected_in and clf.fc.out_features == 10
    # weights are copied from the pretrained model, not shared
    for i in range(k):
        assert torch.equal(clf.head.layers[i].linear.weight, model.head.layers[i].linear.weight)
        assert clf.head.layers[i].linear.weight.data_ptr() != model.head.layers[i].linear.weight.data_ptr()
    model.eval(); clf.eval()
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(clf.features(x), model.head.hiddens(model.encoder(x))[k], atol=1e-6)


def test_head_layer_out_of_range():
    model = SimCLRModel(build_resnet(18, 0.25, stem_type="small"), head_layers=2)
    with pytest.raises(ValueError, match="k=3 is not available; the head has 2 layers"):
        Classifier.from_pretrained(model, 10, head_layer=3)
