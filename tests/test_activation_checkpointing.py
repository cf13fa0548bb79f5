"""Activation checkpointing (models.resnet.set_activation_checkpointing): the same training step, less memory.

References are computed without checkpointing (the same model, deep-copied) and in float64; the
trap it must avoid, BatchNorm running statistics updated a second time by the recomputation in
backward, is shown to be real by switching the guard off. The 2-process version (global BN,
whose all-gather runs again in the recomputation) is in tests/test_distributed.py
(``pretrain_checkpointed``).
"""

import contextlib
import copy
import os
import sys

import pytest
import torch
from torch import nn

from simclrv2.errors import ConfigError
from simclrv2.models import build_model, model_spec, set_activation_checkpointing
from simclrv2.models import resnet as resnet_module
from simclrv2.models.resnet import build_resnet, sk_options

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import activation_memory  # noqa: E402

# the three stems (standard, SK's ResNet-D deep stem, small images) and both block kinds
MODELS = {
    "r18_small": dict(depth=18, width_multiplier=0.125, stem_type="small"),
    "r50": dict(depth=50, width_multiplier=0.125),
    "r50_sk": dict(depth=50, width_multiplier=0.0625, **sk_options(True)),
}
SIZE = {"r18_small": 16, "r50": 40, "r50_sk": 40}


def _model(name: str, dtype=torch.float32) -> nn.Module:
    """A tiny ResNet whose every BN has a random scale, shift and running statistics: the zero-init
    last BN of each block would otherwise leave every residual branch without gradient."""
    torch.manual_seed(0)
    model = build_resnet(**MODELS[name])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.to(dtype)


def _steps(model: nn.Module, name: str, steps: int = 2, autocast: bool = False, dtype=torch.float32):
    """``steps`` SGD steps of a fixed random-projection loss; returns (losses, gradients of the last step)."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for _ in range(steps):
        x = torch.randn(6, 3, SIZE[name], SIZE[name], generator=gen).to(dtype)
        w = torch.randn(6, model.out_dim, generator=gen).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out = out.to(dtype)
        loss = (out * w).mean() + 0.1 * out.pow(2).mean()  # depends on every feature
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.grad.clone() for p in model.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mode", ["block", "stage"])
@pytest.mark.parametrize("name", list(MODELS))
def test_same_loss_gradients_and_bn_statistics_as_without(name, mode):
    plain = _model(name)
    checkpointed = copy.deepcopy(plain)
    assert set_activation_checkpointing(checkpointed, mode) == 1
    ref_losses, ref_grads = _steps(plain, name)
    losses, grads = _steps(checkpointed, name)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for (pname, p), g, g_ref in zip(plain.named_parameters(), grads, ref_grads):
        assert g_ref.abs().max() > 0, pname  # every parameter took part (the random BNs see to it)
        assert _rel(g, g_ref) <= 1e-5, pname
    # running statistics and counts updated once per step: bitwise the same as without checkpointing
    ref_buffers = dict(plain.named_buffers())
    for bname, b in checkpointed.named_buffers():
        assert torch.equal(b, ref_buffers[bname]), bname
    assert all(int(b) == 2 for n, b in ref_buffers.items() if n.endswith("num_batches_tracked"))


def test_gradients_match_float64():
    """Against float64 (a ResNet-18 on 16 px: well conditioned, fp32 gradients good to ~2e-6 of each tensor's scale)."""
    exact = _model("r18_small", torch.float64)
    checkpointed = _model("r18_small")
    set_activation_checkpointing(checkpointed, "block")
    _, g64 = _steps(exact, "r18_small", steps=1, dtype=torch.float64)
    _, g32 = _steps(checkpointed, "r18_small", steps=1)
    assert max(_rel(a, b) for a, b in zip(g32, g64)) <= 2e-5


def test_without_the_guard_the_recomputation_updates_bn_statistics_twice(monkeypatch):
    """The trap is real: plain checkpointing counts every step twice and moves the running statistics again."""
    monkeypatch.setattr(resnet_module, "_contexts", lambda modules: (contextlib.nullcontext(), contextlib.nullcontext()))
    plain = _model("r50")
    checkpointed = copy.deepcopy(plain)
    set_activation_checkpointing(checkpointed, "block")
    _steps(plain, "r50", steps=1)
    _steps(checkpointed, "r50", steps=1)
    assert int(checkpointed.bn1.num_batches_tracked) == 2 and int(plain.bn1.num_batches_tracked) == 1
    assert not torch.equal(checkpointed.layer1[0].bn1.running_mean, plain.layer1[0].bn1.running_mean)


def test_bf16_autocast_recomputes_under_the_same_autocast():
    plain = _model("r50_sk")
    checkpointed = copy.deepcopy(plain)
    set_activation_checkpointing(checkpointed, "block")
    fp32_losses, fp32_grads = _steps(copy.deepcopy(plain), "r50_sk", steps=1)
    ref_losses, ref_grads = _steps(plain, "r50_sk", steps=1, autocast=True)
    losses, grads = _steps(checkpointed, "r50_sk", steps=1, autocast=True)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) <= 1e-5
    # bf16 really ran: the fp32 step is ~1e-2 away (a recomputation in fp32 would not match the bf16 one)
    assert max(_rel(g, r) for g, r in zip(fp32_grads, ref_grads)) > 1e-3
    assert torch.equal(checkpointed.layer2[0].bn1.running_var, plain.layer2[0].bn1.running_var)


def test_only_training_with_gradients_recomputes_and_checkpoints_are_unchanged(monkeypatch):
    spec = model_spec("simclr", depth=18, width=0.125, sk=False, small_images=True, in_channels=3, num_classes=10)
    model = build_model(spec)
    keys = list(model.state_dict())
    assert set_activation_checkpointing(model, True) == 1
    assert model.encoder.checkpointing == "block"
    assert list(model.state_dict()) == keys  # the same parameters and buffers, the same names
    calls = []
    original = resnet_module.recompute_in_backward
    monkeypatch.setattr(resnet_module, "recompute_in_backward", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []  # evaluation and no-grad forwards (EMA, teacher) run as usual
    model(x)
    assert len(calls) == 1 + 8  # the stem and the 8 blocks of a ResNet-18
    assert set_activation_checkpointing(model, False) == 1 and model.encoder.checkpointing is None
    with pytest.raises(ConfigError):
        set_activation_checkpointing(model, "layer")


def test_the_option_reaches_the_training_model():
    from simclrv2.cli import build_parser
    from simclrv2.config import make_config

    args = build_parser().parse_args(["pretrain", "--out", "x", "--activation-checkpointing"])
    assert args.activation_checkpointing is True
    for stage in ("pretrain", "finetune", "distill", "supervised", "linear_eval"):
        assert make_config(stage).activation_checkpointing is False


def test_memory_count_agrees_with_saved_tensor_accounting_and_checkpointing_saves_memory():
    """bench/activation_memory.py's live-storage count after a forward pass equals the bytes of the
    distinct new storages autograd saves (saved_tensors_hooks) plus input and output; with
    checkpointing per block a ResNet-50 keeps well under half of that per image."""
    model = _model("r50")
    model.train()
    old = {p.untyped_storage()._cdata for p in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in old:
            saved[st._cdata] = st.nbytes()
        return t

    with activation_memory.LiveTensorBytes() as live:
        x = torch.randn(4, 3, 64, 64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        for t in (x, out):
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        assert saved.keys() <= live.live.keys()
        # the same storages, but for one 8-byte scalar per BN layer that each training forward leaves behind
        big = {k: n for k, n in live.live.items() if n > 8}
        assert big == {k: n for k, n in saved.items() if n > 8}
        assert live.current - sum(big.values()) <= 8 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        del out
    rows = {mode: activation_memory.per_image(*(activation_memory.measure(model, b, 64, "fp32", mode)
                                                  for b in activation_memory.BATCHES))
            for mode in (None, "block")}
    assert rows["block"]["peak"] < 0.45 * rows[None]["peak"]
    assert rows[None]["saved"] > 0.9 * rows[None]["peak"]  # without checkpointing the peak is what forward keeps
