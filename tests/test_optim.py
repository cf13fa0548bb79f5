import math

import pytest
import torch

from simclrv2.optim import LARS, WarmupCosine, param_groups, scale_lr


def test_lars_one_step_hand_computed():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])  # ||g|| = 1
    opt = LARS([{"params": [w], "weight_decay": 0.1, "layer_adaptation": True}], lr=2.0)
    opt.step()
    # g' = g + 0.1 w = [0.9, 1.2], ||g'|| = 1.5; trust = 0.001 * 5 / 1.5; v = 2 * trust * g'
    trust = 0.001 * 5 / 1.5
    expected = torch.tensor([3.0, 4.0]) - 2.0 * trust * torch.tensor([0.9, 1.2])
    assert torch.allclose(w.detach(), expected, atol=1e-7)
    # second step: momentum 0.9 on the buffer
    w.grad = torch.tensor([0.6, 0.8])
    v1 = 2.0 * trust * torch.tensor([0.9, 1.2])
    g2 = torch.tensor([0.6, 0.8]) + 0.1 * expected
    trust2 = 0.001 * expected.norm() / g2.norm()
    expected2 = expected - (0.9 * v1 + 2.0 * trust2 * g2)
    opt.step()
    assert torch.allclose(w.detach(), expected2, atol=1e-7)


def test_excluded_parameters_step_like_momentum_sgd():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ref.load_state_dict(model.state_dict())
    groups = param_groups(model, weight_decay=1e-2)
    assert {id(p) for p in groups[1]["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert groups[1]["weight_decay"] == 0 and not groups[1]["layer_adaptation"]
    lars = LARS(groups, lr=0.05)
    sgd = torch.optim.SGD([ref[0].bias, ref[1].weight, ref[1].bias], lr=0.05, momentum=0.9)
    for _ in range(3):
        x = torch.randn(8, 4)
        for m, opt in ((model, lars), (ref, sgd)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in ((model[0].bias, ref[0].bias), (model[1].weight, ref[1].weight), (model[1].bias, ref[1].bias)):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model[0].weight, ref[0].weight)  # adapted weights differ from SGD (which never stepped them)


def test_zero_gradient_or_weight_gives_trust_one():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    LARS([w], lr=0.5).step()
    assert torch.allclose(w.detach(), -0.5 * torch.ones(3))


def test_lr_scaling_and_schedule():
    assert scale_lr(0.1, 4096, "sqrt") == pytest.approx(6.4)
    assert scale_lr(0.3, 512, "linear") == pytest.approx(0.6)
    sched = WarmupCosine(1.0, total_steps=100, warmup_steps=10)
    assert sched(0) == pytest.approx(0.1) and sched(9) == pytest.approx(1.0)
    assert sched(10) == pytest.approx(1.0)
    assert sched(55) == pytest.approx(0.5)
    assert sched(100) == pytest.approx(0.0, abs=1e-12)
    assert all(sched(s) >= sched(s + 1) for s in range(10, 100))
    assert WarmupCosine(2.0, 10)(5) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_classifier_is_excluded_like_the_official_head_supervised():
    from simclrv2.models import Classifier, build_resnet

    model = Classifier(build_resnet(18, 0.0625, stem_type="small"), num_classes=3)
    adapted, excluded = param_groups(model, weight_decay=1e-4)
    ids = {id(p) for p in excluded["params"]} if isinstance(excluded, dict) else set()
    assert id(model.fc.weight) in ids and id(model.fc.bias) in ids
    assert id(model.encoder.conv1.weight) in {id(p) for p in adapted["params"]}
    assert all(p.ndim > 1 for p in adapted["params"])


def test_pretraining_probe_gets_its_scaled_lr_and_normalised_features():
    from simclrv2.config import make_config
    from simclrv2.engine import build_optimizer
    from simclrv2.models import build_model, model_spec
    from simclrv2.optim import set_lr

    cfg = make_config("pretrain", out="unused", dataset="digits", depth=18, width=0.0625, probe_lr_scale=0.01)
    spec = model_spec("simclr", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1, num_classes=10,
                      probe_norm=True)
    model = build_model(spec)
    opt = build_optimizer(model, cfg)
    set_lr(opt, 2.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.probe.weight)] == lr_of[id(model.probe.bias)] == pytest.approx(0.02)
    assert lr_of[id(model.encoder.conv1.weight)] == 2.0
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)  # every parameter exactly once
    # the probe reads BN-normalised stop-gradient features: scaling the features leaves its logits unchanged
    model.train()
    h = torch.randn(32, model.encoder.out_dim)
    a = model.probe(model.probe_bn(h))
    b = model.probe(model.probe_bn(h * 50 + 3))
    assert torch.allclose(a, b, atol=1e-3)
