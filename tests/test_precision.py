"""Precision and speed options on CPU: bf16 autocast, channels_last, torch.compile.

Each option must leave a training step's result unchanged: channels_last and compile to
fp32 rounding, bf16 autocast to bf16's ~3 significant digits. torch.compile is checked on a
tiny one-conv encoder: compiling the tiny ResNet-18 (forward + backward) takes ~55 s on the
2-core CI machine, too long for the suite; the option's wiring (Task -> wrap_model ->
torch.compile) is the same for any model. channels_last is checked at width 1/8 and at width
1/16, where oneDNN (torch 2.13 CPU, seen on an Intel Xeon with AMX) got the weight gradient of
the 4-channel 1x1 strided shortcuts intermittently wrong: to_device runs those convolutions in
NCHW (tested: the result equals an all-NCHW step).
"""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY
from simclrv2.config import make_config
from simclrv2.engine import step_generator
from simclrv2.errors import ConfigError
from simclrv2.models import SimCLRModel, build_model, model_spec
from simclrv2.runtime import Runtime, bf16_supported, init_runtime
from simclrv2.stages.classify import SupervisedTask
from simclrv2.stages.common import prepare_data, to_device
from simclrv2.stages.pretrain import ContrastiveTask

SPEC = model_spec("simclr", depth=18, width=0.0625, sk=False, small_images=True, in_channels=1, num_classes=10)
WIDER = SPEC.replace(width=0.125)  # >= 8 channels everywhere
GRAD_RTOL = 5e-5  # fp32 gradients of these nets are good to ~1e-5 of the largest (measured against fp64)


@pytest.fixture(scope="module")
def data():
    cfg = make_config("pretrain", out="unused", **TINY)
    return prepare_data(cfg)


def _pretrain_task(data, model_fn, **options) -> ContrastiveTask:
    cfg = make_config("pretrain", out="unused", batch_size=16, temperature=0.5, color_strength=0.5, crop_min=0.2,
                      **TINY, **options)
    rt = init_runtime("cpu", "fp32")
    torch.manual_seed(0)
    return ContrastiveTask(to_device(model_fn(), rt, cfg.channels_last), cfg, data, rt)


def _step(task, data, rt: Runtime | None = None):
    """One training step's loss and gradients on the first 16 images."""
    images, labels = data.all_images().get_batch(np.arange(16))
    task.train()
    with (rt or task.rt).autocast():
        loss, _ = task.loss(images, labels, step_generator(0, 0))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in task.model.named_parameters() if p.grad is not None}


def _grad_error(a: dict, b: dict) -> float:
    """Largest gradient difference, relative to the largest gradient entry of the whole model."""
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def test_channels_last_gives_the_same_loss_and_gradients(data):
    loss_a, grads_a = _step(_pretrain_task(data, lambda: build_model(WIDER), channels_last=False), data)
    task = _pretrain_task(data, lambda: build_model(WIDER), channels_last=True)
    assert task.model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loss_b, grads_b = _step(task, data)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert _grad_error(grads_b, grads_a) < GRAD_RTOL


def test_channels_last_classification_step(data):
    cfg = make_config("finetune", out="unused", pretrained="unused", batch_size=16, **TINY)
    rt = init_runtime("cpu", "fp32")
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        spec = WIDER.replace(kind="classifier", head_layers=0, head_layer=0)
        model = to_device(build_model(spec), rt, channels_last)
        cfg.channels_last = channels_last
        results.append(_step(SupervisedTask(model, cfg, data.image_size, rt), data))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert _grad_error(grads_b, grads_a) < GRAD_RTOL


def test_channels_last_narrow_shortcuts_run_nchw_and_match(data):
    """Width 1/16: the 4-channel strided 1x1 shortcuts stay NCHW, everything else channels_last,
    and a step equals the all-NCHW step (three repeats: the oneDNN error was intermittent)."""
    loss_a, grads_a = _step(_pretrain_task(data, lambda: build_model(SPEC), channels_last=False), data)
    for _ in range(3):
        task = _pretrain_task(data, lambda: build_model(SPEC), channels_last=True)
        enc = task.model.encoder
        shortcut = enc.layer2[0].downsample[0]
        assert shortcut.in_channels < 8 and shortcut.weight.is_contiguous()  # (a 1x1 weight is both layouts)
        assert enc.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        seen = []
        hook = shortcut.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
        loss_b, grads_b = _step(task, data)
        hook.remove()
        assert seen and all(seen)  # the shortcut received NCHW input (the layout oneDNN then uses)
        assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
        assert _grad_error(grads_b, grads_a) < GRAD_RTOL


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_in_bf16_matches_nchw(channels):
    """The presets' default CPU path (bf16 autocast + channels_last, blur on) against bf16 in NCHW,
    for 1- and 3-channel images, pretraining and a classifier step: the same loss and gradients up
    to bf16 rounding (a wrong oneDNN kernel gives errors of the order of the values themselves)."""
    from simclrv2.data import TensorImageDataset
    from simclrv2.stages.common import Data

    g = torch.Generator().manual_seed(channels)
    ds = TensorImageDataset(torch.randint(0, 256, (16, channels, 16, 16), dtype=torch.uint8, generator=g),
                            np.arange(16) % 4, ["a", "b", "c", "d"])
    data = Data(ds, ds, ds, ds, 16, channels, list(ds.classes))
    rt = init_runtime("cpu", "bf16")
    spec = WIDER.replace(in_channels=channels, num_classes=4)
    for kind in ("simclr", "classifier"):
        results = []
        for channels_last in (False, True):
            torch.manual_seed(0)
            if kind == "simclr":
                cfg = make_config("pretrain", out="unused", dataset="digits", seed=0, batch_size=16, blur=True,
                                  color_strength=1.0, channels_last=channels_last, precision="bf16")
                task = ContrastiveTask(to_device(build_model(spec), rt, channels_last), cfg, data, rt)
            else:
                cfg = make_config("finetune", out="unused", pretrained="unused", dataset="digits", seed=0,
                                  batch_size=16, channels_last=channels_last, precision="bf16")
                model = build_model(spec.replace(kind="classifier", head_layers=0, head_layer=0))
                task = SupervisedTask(to_device(model, rt, channels_last), cfg, 16, rt)
            results.append(_step(task, data, rt))
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert torch.isfinite(loss_a) and loss_b.item() == pytest.approx(loss_a.item(), rel=2e-2, abs=1e-2), kind
        assert _grad_error(grads_b, grads_a) < 0.02, kind


def test_bf16_autocast_is_close_to_fp32(data):
    model = build_model(SPEC)
    torch.manual_seed(0)
    for m in model.modules():  # non-zero residual branches, so that every conv matters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    images, _ = data.all_images().get_batch(np.arange(32))
    x = images.float() / 255
    model.eval()
    with torch.no_grad():
        h32, z32 = model(x)
        with Runtime(torch.device("cpu"), torch.bfloat16).autocast():
            h16, z16 = model(x)
    assert h16.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    for a, b in ((h16, h32), (z16, z32)):
        assert ((a.float() - b).norm() / b.norm()).item() < 3e-2
    # the training loss under bf16 autocast (NT-Xent itself runs in fp32)
    task = _pretrain_task(data, lambda: build_model(SPEC))
    loss32, _ = _step(task, data)
    task = _pretrain_task(data, lambda: build_model(SPEC))
    loss16, _ = _step(task, data, Runtime(torch.device("cpu"), torch.bfloat16))
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=2e-2)


def test_auto_precision_is_fp32_on_cpus_without_native_bf16():
    supported = bf16_supported(torch.device("cpu"))
    assert supported == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    rt = init_runtime("cpu", "auto")
    assert rt.dtype == (torch.bfloat16 if supported else None)
    if not supported:
        with pytest.raises(ConfigError, match="bf16"):
            init_runtime("cpu", "bf16")


class _TinyEncoder(nn.Module):
    """conv -> BN -> ReLU -> global pool: an encoder that compiles in seconds."""

    out_dim = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def test_compile_gives_the_same_loss_and_gradients(data):
    def tiny():
        return SimCLRModel(_TinyEncoder(), head_layers=2, proj_dim=8, probe_classes=10)

    loss_a, grads_a = _step(_pretrain_task(data, tiny), data)
    torch._dynamo.reset()
    task = _pretrain_task(data, tiny, compile=True)
    assert isinstance(task.net, torch._dynamo.eval_frame.OptimizedModule)
    loss_b, grads_b = _step(task, data)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert _grad_error(grads_b, grads_a) < 1e-4
