"""simclrv2.load_encoder: a plain nn.Module, and safetensors keys a torchvision-layout ResNet loads as they are.

The reference ResNet below is written here after torchvision's models/resnet.py (BasicBlock,
Bottleneck with the stride on the 3x3 conv, conv1/bn1/relu/maxpool/layer1..4/avgpool; no fc),
independently of simclrv2's model code.
"""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import simclrv2
from simclrv2 import checkpoint as ckpt
from simclrv2.models import build_model, model_spec


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchvisionLayoutResNet(nn.Module):
    def __init__(self, block, layers, in_channels=3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


@pytest.mark.parametrize("depth,block,layers", [(18, BasicBlock, [2, 2, 2, 2]), (50, Bottleneck, [3, 4, 6, 3])])
def test_encoder_weights_load_into_a_torchvision_layout_resnet(tmp_path, depth, block, layers):
    spec = model_spec("classifier", depth=depth, width=1.0, sk=False, small_images=False, in_channels=3,
                      head_layers=0, num_classes=5, image_size=64)
    torch.manual_seed(0)
    model = build_model(spec)
    for m in model.modules():  # non-trivial BN statistics, so that running stats are compared too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    meta = ckpt.CheckpointMeta("finetune", spec, classes=list("abcde"), complete=True)
    ckpt.save_checkpoint(tmp_path / "final", {f"model.{k}": v for k, v in model.state_dict().items()}, meta)

    encoder = simclrv2.load_encoder(str(tmp_path))
    assert isinstance(encoder, nn.Module) and not encoder.training

    reference = TorchvisionLayoutResNet(block, layers)
    tensors = load_file(str(tmp_path / "final.safetensors"))
    prefix = "model.encoder."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    reference.load_state_dict(state, strict=True)  # every name and shape as torchvision's, nothing missing or extra
    reference.eval()
    # 66 px: the stem's max-pool input is odd (33), where TF's 'SAME' pool (ours, for the official
    # checkpoints) and torchvision's MaxPool2d(3, 2, 1) are the same computation
    x = torch.rand(2, 3, 66, 66)
    with torch.no_grad():
        ours, theirs = encoder(x), reference(x)
    assert ours.shape == theirs.shape == (2, 512 * block.expansion)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    # even sizes (224 px -> 112): 'SAME' pads the bottom/right only, as the docstring tells a torchvision user
    reference.maxpool = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2))  # after ReLU: zeros never win
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(x), reference(x), atol=1e-5, rtol=1e-4)
