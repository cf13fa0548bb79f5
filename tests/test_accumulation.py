"""Gradient accumulation (``--accumulate K``): K micro-batches give the update of the whole batch.

References are computed another way, on a tiny ResNet-18 in float64 (the losses themselves run in
fp32, so results agree to ~1e-7 of each tensor's scale, not to float64's precision):

* one pass over the whole batch, with every BatchNorm in eval mode (then micro-batch statistics
  do not matter and K micro-batches must give exactly the batch's loss and gradients): pretraining
  (NT-Xent, the online probe, the memory queue's term and its queue), fine-tuning's cross-entropy,
  distillation mixing true labels, linear evaluation (frozen BNs by design);
* with BatchNorm in training mode, pretraining's two-pass step (engine.accumulate_gradients ->
  stages.pretrain.CachedEmbeddings) against brute force: every micro-batch's forward with
  gradients, the projections concatenated, the whole batch's NT-Xent, one backward through
  everything; the same gradients and running statistics (each micro-batch counted once).

K = 1 is today's step, bit for bit (the determinism and kill/resume tests cover it);
tests/test_kill_resume.py kills and resumes runs with --accumulate 2, tests/test_distributed.py
compares 2 processes x 2 micro-batches with 1 process x 4.
"""

import contextlib
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import TINY
from simclrv2.checkpoint import CheckpointMeta
from simclrv2.config import make_config
from simclrv2.engine import Trainer, accumulate_gradients, build_optimizer, step_generator, train_step
from simclrv2.errors import ConfigError
from simclrv2.losses import DistillationLoss, NTXentLoss
from simclrv2.models import SimCLRModel, build_model, model_spec
from simclrv2.runtime import Runtime, init_runtime
from simclrv2.stages.classify import DistillTask, LinearEvalTask, SupervisedTask
from simclrv2.stages.common import prepare_data
from simclrv2.stages.pretrain import ContrastiveTask

SPEC = model_spec("simclr", depth=18, width=0.125, sk=False, small_images=True, in_channels=1, num_classes=10,
                  probe_norm=True)  # as the pretraining stage builds it: the probe reads its features through a BN
CLASSIFIER = SPEC.replace(kind="classifier", head_layers=0, head_layer=0)
RT = init_runtime("cpu", "fp32")
K = 4
RTOL = 1e-6
# 16 images: 5 labelled then 11 unlabelled, so the micro-batches of 4 hold 4, 1, 0 and 0 labels
ROWS = np.r_[0:5, 300:311]


@pytest.fixture(scope="module")
def data():
    return prepare_data(make_config("pretrain", out="unused", **TINY))


@pytest.fixture(scope="module")
def batch(data):
    images, labels = data.all_images().get_batch(ROWS)
    assert (labels[:5] >= 0).all() and (labels[5:] < 0).all()
    return images, labels


class Float64(nn.Module):
    """An augmentation whose views are float64, for a float64 model."""

    def __init__(self, augment: nn.Module):
        super().__init__()
        self.augment = augment

    def forward(self, *args, **kwargs):
        return self.augment(*args, **kwargs).double()

    def views(self, *args, **kwargs):
        return self.augment.views(*args, **kwargs).double()


def _model(spec):
    """A float64 model whose BNs have random scales, shifts and running statistics (the zero-initialised
    last BN of each block would otherwise leave the residual branches without gradient)."""
    torch.manual_seed(0)
    model = build_model(spec)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5, generator=g)
            if m.bias is not None:
                m.bias.data.uniform_(-0.5, 0.5, generator=g)
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    return model.double()


def _pretrain_task(data, memory: bool = False, **options) -> ContrastiveTask:
    cfg = make_config("pretrain", out="unused", batch_size=16, temperature=0.5, color_strength=0.5, crop_min=0.2,
                      memory_size=80 if memory else 0, memory_decay=0.9, optimizer="sgd", **TINY, **options)
    task = ContrastiveTask(_model(SPEC), cfg, data, RT)
    task.augment = Float64(task.augment)
    if memory:  # a queue of earlier keys: the memory term has negatives
        task.memory.enqueue(F.normalize(torch.randn(24, cfg.proj_dim, generator=torch.Generator().manual_seed(2)), dim=1))
    return task


def _bn_eval(*modules: nn.Module) -> None:
    """Every BatchNorm normalises with its running statistics (and leaves them alone)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def _train(task, bn_eval: bool) -> None:
    task.train()
    if bn_eval:
        _bn_eval(task.model, *([task.memory.ema] if getattr(task, "memory", None) is not None else []),
                 *([task.teacher] if hasattr(task, "teacher") else []))


def _gradients(task, images, labels, k: int, bn_eval: bool):
    """(loss, parts, gradients) of one step's batch: one pass (k = 1) or k micro-batches."""
    _train(task, bn_eval)
    task.model.zero_grad(set_to_none=True)
    generator = step_generator(0, 0)
    if k == 1:
        loss, parts = task.loss(images, labels, generator)
        loss.backward()
    else:
        loss, parts = accumulate_gradients(task, RT, images, labels, generator, k, lambda loss: loss.backward())
    grads = {n: p.grad.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    return loss.detach(), {n: v.detach() for n, v in parts.items()}, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _assert_same(result, reference, rtol: float = RTOL) -> None:
    (loss, parts, grads), (ref_loss, ref_parts, ref_grads) = result, reference
    assert loss.item() == pytest.approx(ref_loss.item(), rel=rtol)
    assert parts.keys() == ref_parts.keys()
    for name in parts:
        assert parts[name].item() == pytest.approx(ref_parts[name].item(), rel=rtol), name
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, name  # every parameter takes part
        assert _rel(g, ref_grads[name]) <= rtol, name


# ------------------------------------------------------------------ pretraining

@pytest.mark.parametrize("memory", [False, True], ids=["probe", "probe+memory"])
def test_pretraining_in_micro_batches_gives_the_batch_loss_and_gradients(data, batch, memory):
    """BatchNorm in eval mode: K micro-batches must give one pass's loss, parts and gradients."""
    one = _gradients(_pretrain_task(data, memory), *batch, 1, bn_eval=True)
    accumulated = _gradients(_pretrain_task(data, memory), *batch, K, bn_eval=True)
    assert set(one[1]) == {"contrastive", "probe_loss"} | ({"memory"} if memory else set())
    _assert_same(accumulated, one)


def _brute_force(task, images, labels, k: int):
    """The reference of the two-pass step, computed the plain way: each micro-batch's forward WITH
    gradients (BN statistics of the micro-batch, running statistics updated once each), the
    projections concatenated, the NT-Xent of the whole batch (and the memory term), the probe's
    mean over the batch's labelled views, one backward through everything."""
    task.train()
    task.model.zero_grad(set_to_none=True)
    v = task.views(images, step_generator(0, 0))
    n, m = len(labels), len(labels) // k
    labelled = 2 * int((labels >= 0).sum())
    zs, keys, probe = [], [], 0.0
    for j in range(k):
        rows = slice(j * m, (j + 1) * m)
        x = torch.cat([v[:n][rows], v[n:][rows]])
        if task.memory is not None:
            keys.append(task.memory.keys(x))
        _, z, logits = task.model(x, probe=True)
        zs.append(z.float())
        y = torch.cat([labels[rows], labels[rows]])
        if (y >= 0).any():
            probe = probe + F.cross_entropy(logits.float()[y >= 0], y[y >= 0], reduction="sum") / labelled
    z_a, z_b = torch.cat([z[:m] for z in zs]), torch.cat([z[m:] for z in zs])
    nt_xent = NTXentLoss(task.cfg.temperature)
    loss = nt_xent(z_a, z_b)
    if task.memory is not None:
        key_a, key_b = torch.cat([key[:m] for key in keys]), torch.cat([key[m:] for key in keys])
        loss = (loss + nt_xent(z_a, z_b, task.memory.negatives(), keys=(key_a, key_b))) / 2
    loss = loss + probe
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in task.model.named_parameters()}


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
@pytest.mark.parametrize("memory", [False, True], ids=["probe", "probe+memory"])
def test_two_pass_step_equals_brute_force_with_batchnorm_in_training_mode(data, batch, memory, checkpointing):
    """Each micro-batch normalised by its own statistics: the gradients and the running statistics
    (each micro-batch counted once: pass 2 leaves them alone) of the brute-force reference; with
    activation checkpointing too (its recomputation inside pass 2's backward)."""
    ref_task = _pretrain_task(data, memory)
    before = _bn_state(ref_task.model)
    ref_loss, ref_grads = _brute_force(ref_task, *batch, K)
    task = _pretrain_task(data, memory, activation_checkpointing=checkpointing)
    loss, _, grads = _gradients(task, *batch, K, bn_eval=False)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=RTOL)
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, name
        assert _rel(g, ref_grads[name]) <= RTOL, name
    ref_bn, bn = _bn_state(ref_task.model), _bn_state(task.model)
    for name, b in bn.items():
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(before[name]) + K == int(ref_bn[name]), name  # counted once per micro-batch
        else:
            assert not torch.equal(b, before[name]), name  # moved: the step updated it
            assert _rel(b, ref_bn[name]) <= 1e-12, name


def test_without_the_freeze_pass_two_would_count_every_micro_batch_twice(data, batch, monkeypatch):
    """The trap is real: pass 2's forward in training mode updates the running statistics again."""
    pretrain_module = importlib.import_module("simclrv2.stages.pretrain")  # (simclrv2.stages.pretrain is the stage function)
    monkeypatch.setattr(pretrain_module, "frozen_batchnorm_statistics", lambda model: contextlib.nullcontext())
    task = _pretrain_task(data)
    before = _bn_state(task.model)
    _gradients(task, *batch, K, bn_eval=False)
    assert int(task.model.encoder.bn1.num_batches_tracked) == int(before["encoder.bn1.num_batches_tracked"]) + 2 * K


def test_compiled_two_pass_step_equals_the_plain_one(data, batch):
    """torch.compile (on a tiny encoder that compiles in seconds): pass 1 without gradients, pass 2 with
    them and BN momentum 0 (a recompilation, not a stale graph that would count the statistics again)."""
    from test_precision import _TinyEncoder

    results = []
    for compile in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = SimCLRModel(_TinyEncoder(), head_layers=2, proj_dim=8, probe_classes=10, probe_norm=True)
        cfg = make_config("pretrain", out="unused", batch_size=16, temperature=0.5, color_strength=0.5, crop_min=0.2,
                          proj_dim=8, compile=compile, **TINY)
        task = ContrastiveTask(model, cfg, data, RT)
        before = _bn_state(task.model)
        loss, _, grads = _gradients(task, *batch, K, bn_eval=False)
        results.append((loss, grads, _bn_state(task.model)))
    (loss, grads, bn), (loss_c, grads_c, bn_c) = results
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, g in grads.items():
        assert _rel(grads_c[name], g) <= 1e-4, name
    for name, b in bn.items():
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(bn_c[name]) == int(before[name]) + K, name
        else:
            assert _rel(bn_c[name], b) <= 1e-5, name


def test_memory_queue_takes_the_batch_keys_once_per_step(data, batch):
    """A whole optimisation step (train_step: update, EMA, queue) with BN in eval mode: K micro-batches
    leave the weights, the EMA and the queue of one pass; the 32 keys of the batch's views are
    queued once, in one pass's order."""
    tasks = {}
    for k in (1, K):
        task = tasks[k] = _pretrain_task(data, memory=True)
        _train(task, bn_eval=True)
        opt = build_optimizer(task.model, task.cfg)
        train_step(task, opt, RT, *batch, 0.05, step_generator(0, 0), accumulate=k)
    one, accumulated = tasks[1], tasks[K]
    assert int(accumulated.memory.queue_len) == int(accumulated.memory.queue_ptr) == 24 + 32
    for name, t in one.memory.state_dict().items():
        assert t.dtype == accumulated.memory.state_dict()[name].dtype
        assert _rel(accumulated.memory.state_dict()[name], t) <= RTOL if t.is_floating_point() \
            else torch.equal(accumulated.memory.state_dict()[name], t), name
    for name, p in one.model.state_dict().items():
        assert _rel(accumulated.model.state_dict()[name], p) <= RTOL, name


# ------------------------------------------------------------------ the classifier stages

def _classifier_task(data, kind: str):
    cfg = make_config("distill" if kind == "distill" else "finetune", out="unused", batch_size=16, **TINY)
    model = _model(CLASSIFIER)
    if kind == "supervised":
        task = SupervisedTask(model, cfg, data.image_size, RT)
    elif kind == "linear_eval":
        task = LinearEvalTask(model, cfg, data.image_size, RT)
    else:
        teacher = _model(CLASSIFIER.replace(width=0.25))
        task = DistillTask(model, cfg, data.image_size, RT, teacher=teacher, distill=DistillationLoss(1.0, alpha=0.5))
    task.augment = Float64(task.augment)
    return task


@pytest.mark.parametrize("kind", ["supervised", "linear_eval", "distill"])
def test_classifier_stages_in_micro_batches_give_the_batch_loss_and_gradients(data, batch, kind):
    """Cross-entropy (fine-tuning, the baseline), the linear classifier on a frozen encoder (its BNs in
    eval mode by design), distillation mixing the labels' cross-entropy (alpha 0.5: a mean over
    the labelled images, spread 4/1/0/0 over the micro-batches) with the teacher's soft targets."""
    images, labels = batch
    if kind != "distill":  # the labelled stages see labelled images only
        labels = labels.clone()
        labels[labels < 0] = torch.arange(int((labels < 0).sum())) % 10
    bn_eval = kind != "linear_eval"
    one = _gradients(_classifier_task(data, kind), images, labels, 1, bn_eval)
    accumulated = _gradients(_classifier_task(data, kind), images, labels, K, bn_eval)
    _assert_same(accumulated, one)
    if kind == "linear_eval":
        assert set(accumulated[2]) == {"fc.weight", "fc.bias"}


# ------------------------------------------------------------------ options

def test_accumulate_must_divide_the_batch():
    assert make_config("pretrain", out="x").accumulate == 1
    assert make_config("supervised", out="x", batch_size=64, accumulate=4).accumulate == 4
    with pytest.raises(ConfigError, match=r"^--accumulate 3 does not divide --batch-size 64 into equal micro-batches"):
        make_config("supervised", out="x", batch_size=64, accumulate=3)
    with pytest.raises(ConfigError, match=r"^--accumulate must be >= 1"):
        make_config("pretrain", out="x", accumulate=0)
    # under torchrun the micro-batches split each process's share: 32 images on 4 processes are 8 each
    cfg = make_config("supervised", out="x", batch_size=32, accumulate=16)
    with pytest.raises(ConfigError, match=r"^--accumulate 16 does not divide the 8 images per process"):
        Trainer(None, cfg, Runtime(torch.device("cpu"), None, world_size=4), None, "unused", CheckpointMeta("supervised", SPEC))


def test_the_option_reaches_the_config_from_the_command_line_and_presets():
    from simclrv2.cli import build_parser
    from simclrv2.config import auto_workers

    args = build_parser().parse_args(["pretrain", "--out", "x", "--accumulate", "8", "--workers", "auto"])
    assert args.accumulate == 8 and args.workers == "auto"
    cfg = make_config("pretrain", {"pretrain": {"accumulate": 4}, "workers": "auto"}, out="x")
    assert cfg.accumulate == 4 and cfg.workers == auto_workers() and isinstance(cfg.workers, int)
    assert 0 <= auto_workers() <= 8
