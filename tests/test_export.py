"""ONNX export (simclrv2.export): onnxruntime reproduces PyTorch's logits, with a dynamic batch axis."""

from __future__ import annotations

import pytest
import torch

from simclrv2.export import export_onnx
from simclrv2.models.head import Classifier, ProjectionHead
from simclrv2.models.resnet import build_resnet, sk_options

import onnx  # noqa: E402  (the test extra installs onnx and onnxruntime)
import onnxruntime as ort  # noqa: E402


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights and BN statistics (fresh BNs are identities and zero-init gammas hide branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _check(model, tmp_path, image_size, in_channels, name):
    mode, before = model.training, {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / name, image_size, in_channels)
    assert model.training == mode  # the caller's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert path == tmp_path / name and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # atomic: no temporary file left behind
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic (dynamic) batch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # neither is the batch size used for the export (2)
        images = torch.rand(batch, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model.eval()(images).numpy()
        (got,) = sess.run(["logits"], {"images": images.numpy()})
        assert got.shape == expected.shape
        assert abs(got - expected).max() <= 1e-4
    return model


def test_resnet18_classifier_from_head_layer_1(tmp_path):
    enc = build_resnet(18, 0.25, stem_type="small", in_channels=3)
    model = Classifier(enc, 10, ProjectionHead(enc.out_dim, 3).truncated(1))
    assert model.head_layer == 1
    model = _randomize(model, 0).train()  # export works from (and does not change) train mode
    _check(model, tmp_path, image_size=32, in_channels=3, name="r18.onnx")


def test_sk_resnet50_classifier(tmp_path):
    enc = build_resnet(50, 0.0625, **sk_options(True))
    model = Classifier(enc, 7, ProjectionHead(enc.out_dim, 3).truncated(1))
    _check(_randomize(model, 1), tmp_path / "out", image_size=64, in_channels=3, name="sk50.onnx")
