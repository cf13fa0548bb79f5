"""fp16 autocast with loss scaling (``--precision fp16``, for GPUs without bf16), run on the CPU.

init_runtime allows fp16 on CUDA only; these tests build the Runtime directly, since the
scaling logic (torch.amp.GradScaler around our optimiser step, its state in checkpoints) is the
same on both devices.
"""

import copy

import numpy as np
import pytest
import torch

from conftest import TINY
from simclrv2 import checkpoint as ckpt
from simclrv2.config import make_config
from simclrv2.engine import build_optimizer, step_generator, step_hook, train_step
from simclrv2.models import build_model, model_spec
from simclrv2.runtime import Runtime
from simclrv2.stages import pretrain
from simclrv2.stages.common import prepare_data
from simclrv2.stages.pretrain import ContrastiveTask

SPEC = model_spec("simclr", depth=18, width=0.125, sk=False, small_images=True, in_channels=1, num_classes=10)
CPU16 = Runtime(torch.device("cpu"), torch.float16)
CPU32 = Runtime(torch.device("cpu"), None)


@pytest.fixture(scope="module")
def setup():
    cfg = make_config("pretrain", out="unused", batch_size=32, temperature=0.5, color_strength=0.5, crop_min=0.2,
                      optimizer="sgd", lr=0.05, weight_decay=0.0, **TINY)
    data = prepare_data(cfg)
    images, labels = data.all_images().get_batch(np.arange(32))
    torch.manual_seed(0)
    return cfg, data, build_model(SPEC), images, labels


def _one_step(setup, rt, scaler):
    cfg, data, model, images, labels = setup
    task = ContrastiveTask(copy.deepcopy(model), cfg, data, rt)
    opt = build_optimizer(task.model, cfg)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    loss, _ = train_step(task, opt, rt, images, labels, 0.05, step_generator(0, 0), scaler)
    return loss, before, dict(task.model.named_parameters())


def test_fp16_step_with_loss_scaling_matches_fp32(setup):
    loss32, before, p32 = _one_step(setup, CPU32, None)
    assert isinstance(CPU16.grad_scaler(), torch.amp.GradScaler) and CPU32.grad_scaler() is None
    # a scale at which nothing overflows (the default 65536 overflows at first here: a skipped step, see below)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss16, _, p16 = _one_step(setup, CPU16, scaler)
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    # the update itself (not the weights, which barely move): unscaled exactly (same size as fp32's), as
    # close to fp32's as bf16 autocast's is (fp16 keeps more mantissa bits; a wrong unscale would be off 1024x)
    _, _, pbf = _one_step(setup, Runtime(torch.device("cpu"), torch.bfloat16), None)

    def update(p):
        return torch.cat([(p[n] - before[n]).flatten() for n in before if not n.startswith("probe.")]).detach()

    step32, step16, stepbf = update(p32), update(p16), update(pbf)
    assert step32.norm() > 0
    assert (step16.norm() / step32.norm()).item() == pytest.approx(1.0, abs=0.05)
    assert torch.nn.functional.cosine_similarity(step16, step32, dim=0) > 0.99
    assert (step16 - step32).norm() <= 1.5 * (stepbf - step32).norm()
    assert scaler.get_scale() == 1024.0  # no overflow: the scale is unchanged


def test_an_overflowing_step_is_skipped_and_the_scale_lowered(setup):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the scaled fp16 gradients overflow
    _, before, after = _one_step(setup, CPU16, scaler)
    assert all(torch.equal(before[n], after[n].detach()) for n in before)  # the step was skipped
    assert scaler.get_scale() == 2.0**99  # and the scale halved


@pytest.mark.slow
def test_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path):
    options = dict(epochs=4 * 64 / 1437, batch_size=64, depth=18, width=0.0625, temperature=0.5, color_strength=0.5,
                   blur=False, crop_min=0.2, knn_every=0, knn_train_size=100, checkpoint_every=1, **TINY)
    pretrain(make_config("pretrain", out=str(tmp_path / "whole"), **options), CPU16)
    whole = ckpt.read_meta(tmp_path / "whole" / "last.safetensors")
    assert whole.precision == "fp16" and whole.grad_scaler["scale"] > 0

    def stop_at_third(trainer):
        if trainer.step_count == 3:
            raise KeyboardInterrupt

    with step_hook(stop_at_third), pytest.raises(KeyboardInterrupt):
        pretrain(make_config("pretrain", out=str(tmp_path / "cut"), **options), CPU16)
    assert ckpt.read_meta(tmp_path / "cut" / "last.safetensors").step == 2
    pretrain(make_config("pretrain", out=str(tmp_path / "cut"), resume=True, **options), CPU16)
    resumed = ckpt.read_meta(tmp_path / "cut" / "last.safetensors")
    assert resumed.grad_scaler == whole.grad_scaler
    a, _ = ckpt.load_checkpoint(tmp_path / "whole" / "final.safetensors")
    b, _ = ckpt.load_checkpoint(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
