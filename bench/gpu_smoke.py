"""GPU smoke test: every stage for a few steps on CUDA, the CUDA-only code paths, and the step speed.

Usage (on a machine with a GPU; ``PYTHONPATH=src`` when the package is not installed)::

    python bench/gpu_smoke.py                      # all sections on cuda (a few minutes; budget 8)
    python bench/gpu_smoke.py --device cpu --quick   # the same sections on the CPU, tiny
                                                   # (CI: tests/test_gpu_smoke.py)
    python bench/gpu_smoke.py --section sync_bn --section augment_cuda_vs_cpu

Each section is independent: it prints ``PASS``/``FAIL``/``SKIP`` with one line of detail (a
failure's one-line reason; ``-v`` adds the traceback), and the script goes on. At the end a
summary table; the exit status is 1 if any section failed, else 0.

Sections:

* ``environment``: torch, CUDA and the device (name, memory, bf16);
* ``pretrain``, ``pretrain_compile``, ``finetune``, ``distill``, ``supervised``, ``linear_eval``,
  ``evaluate``, ``inference`` (embed, predict, ONNX export): the stage functions for a few steps
  on an RGB image folder written on the fly (PNG, ROOT/train/CLASS, ROOT/val/CLASS), bf16 where
  the device supports it, ``channels_last``, a small ResNet (18, width 1/4) through the
  ImageNet stem (64 px); compile only in ``pretrain_compile`` (skipped with ``--quick`` on the
  CPU, where inductor spends minutes compiling C++). Finetune, distill, linear_eval, evaluate
  and inference start from randomly initialised checkpoints, so they do not depend on the
  pretrain section;
* ``activation_checkpointing``: a pretraining step (ContrastiveTask, train_step) with and
  without ``activation_checkpointing`` gives the same loss, parameters and BN statistics on the
  device, bf16 included; on CUDA also the peak memory (``torch.cuda.max_memory_allocated``) of a
  ResNet-50 224 px step per image with and without, to compare with bench/activation_memory.py's
  CPU measurement that README's table extrapolates;
* ``sync_bn``: a 1-process group (NCCL on CUDA, gloo on the CPU), the model converted by
  ``simclrv2.distributed.convert_sync_batchnorm`` (``nn.SyncBatchNorm`` on CUDA) and a training
  forward/backward through it. With one process ``nn.SyncBatchNorm.forward`` falls back to plain
  BN (its ``need_sync`` requires world size > 1), so on CUDA the section also calls the autograd
  function that multi-GPU runs use (``torch.nn.modules._functions.SyncBatchNorm``: the stats,
  all-gather and gather-with-counts kernels, and the all-reduce of the backward) and compares
  its output, gradients and running statistics with ``nn.BatchNorm2d``. Cross-GPU traffic
  itself needs more than one GPU (torchrun; tests/test_distributed.py covers the math on CPU);
* ``augment_cuda_vs_cpu``: PretrainAugment's views of one uint8 224 px batch on CUDA and on the
  CPU from the same CPU generator state (its parameters are drawn on the CPU) agree to float
  tolerance; on the CPU only the determinism half runs;
* ``throughput``: images/s of OUR pretraining step (ContrastiveTask + engine.Trainer.step: views
  from uint8 images, LARS, probe) against the BARE step (forward + backward + SGD of the same
  network on a ready float batch), bench/run.py's harness, ResNet-50 224 px (CPU --quick: a
  tiny model), bf16 autocast, channels_last off/on, compile off/on (compile with channels_last);
* ``preset_gpu224``: the gpu-224 preset's pretraining step as the stage runs it (ResNet-50, 224 px,
  channels_last, batch 1024 in 8 micro-batches of 128 images: gradient accumulation's two passes):
  images/s, the time per epoch per 100k images that README estimates, and the peak GPU memory
  (--quick: batch 256 in 2 micro-batches of 128; CPU: a tiny model at 32 px, batch 16 in 4).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench/run.py
try:
    import simclrv2  # noqa: F401
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(HERE, "..", "src"))


class Skip(Exception):
    """A section (or part) that does not apply here; the message says why."""


# ----------------------------------------------------------------------------- shared inputs


class Context:
    """What sections share, made on first use: the image folder, random-init checkpoints, sizes."""

    def __init__(self, device: str, quick: bool, root: Path, precision: str = "auto"):
        self.device, self.quick, self.root = device, quick, root
        self.cuda = device.startswith("cuda")
        from simclrv2.runtime import bf16_supported

        if precision == "auto":
            precision = "bf16" if bf16_supported(torch.device(device)) else "fp32"
        self.precision = precision
        self.image_size = 64  # > 32: the ImageNet stem (7x7/2 conv, max-pool)
        self.width = 0.125 if (quick and not self.cuda) else 0.25
        self.classes, self.train_per_class, self.val_per_class = 4, 16, 4
        self._folder: Path | None = None
        self._checkpoints: dict[str, Path] | None = None

    def common(self, out: str) -> dict:
        """Options every stage call shares: a few steps (batch 16 of 64 images: 4 per epoch; no minimum)."""
        return dict(out=str(self.root / out), dataset="imagefolder", data_dir=str(self.folder()), image_size=self.image_size,
                    device=self.device, precision=self.precision, channels_last=True, workers=0, batch_size=16,
                    epochs=1, min_steps=0, label_fraction=0.5, log_every=1000, checkpoint_every=1000, eval_batch_size=32,
                    seed=0)

    def folder(self) -> Path:
        """ROOT/train/CLASS/*.png, ROOT/val/CLASS/*.png: smooth random colour images, 72 px."""
        if self._folder is None:
            from PIL import Image

            rng = np.random.default_rng(0)
            root = self.root / "images"
            for split, n in (("train", self.train_per_class), ("val", self.val_per_class)):
                for c in range(self.classes):
                    d = root / split / f"class{c}"
                    d.mkdir(parents=True, exist_ok=True)
                    for i in range(n):
                        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                        low[..., c % 3] = 255 - 40 * (c // 3)  # a class-dependent colour
                        Image.fromarray(low).resize((72, 72), Image.BILINEAR).save(d / f"{i:03d}.png")
            self._folder = root
        return self._folder

    def checkpoints(self) -> dict[str, Path]:
        """Randomly initialised 'pretrained' (simclr) and 'classifier' checkpoints of the stages' model."""
        if self._checkpoints is None:
            from simclrv2 import checkpoint as ckpt
            from simclrv2.models import build_model, model_spec

            common = dict(depth=18, width=self.width, sk=False, small_images=False, in_channels=3,
                          image_size=self.image_size)
            classes = [f"class{c}" for c in range(self.classes)]
            out = {}
            for name, spec in (("pretrained", model_spec("simclr", **common, num_classes=self.classes, probe_norm=True)),
                               ("classifier", model_spec("classifier", **common, head_layers=3, head_layer=1,
                                                         num_classes=self.classes))):
                torch.manual_seed(1)
                model = build_model(spec)
                tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
                ckpt.save_checkpoint(self.root / "start" / name / "final", tensors,
                                     ckpt.CheckpointMeta(name, spec, classes=classes, dataset="imagefolder", complete=True))
                out[name] = self.root / "start" / name
            self._checkpoints = out
        return self._checkpoints

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _finite(result: dict, key: str) -> str:
    value = result.get(key)
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise AssertionError(f"{key} = {value!r}, expected a finite number")
    return f"{key}={value:.4g}"


# ----------------------------------------------------------------------------- sections


def section_environment(ctx: Context) -> str:
    parts = [f"torch {torch.__version__}", f"device {ctx.device}", f"precision {ctx.precision}"]
    if ctx.cuda:
        if not torch.cuda.is_available():
            raise AssertionError("CUDA is not available to torch")
        props = torch.cuda.get_device_properties(0)
        parts += [f"{props.name}", f"{props.total_memory / 2**30:.0f} GiB", f"CUDA {torch.version.cuda}",
                  f"cuDNN {torch.backends.cudnn.version()}"]
    return ", ".join(parts)


def section_pretrain(ctx: Context, compile: bool = False) -> str:
    from simclrv2.config import make_config
    from simclrv2.stages import pretrain

    if compile and ctx.quick and not ctx.cuda:
        raise Skip("torch.compile on the CPU builds C++ kernels for minutes; run without --quick")
    cfg = make_config("pretrain", **ctx.common("pretrain_compile" if compile else "pretrain"), depth=18, width=ctx.width,
                      compile=compile, knn_every=1, knn_train_size=64, knn_k=5, memory_size=64)
    result = pretrain(cfg)
    return f"{_finite(result, 'final_loss')} {_finite(result, 'knn')} (memory queue, probe, kNN)"


def section_finetune(ctx: Context) -> str:
    from simclrv2.config import make_config
    from simclrv2.stages import finetune

    cfg = make_config("finetune", **ctx.common("finetune"), pretrained=str(ctx.checkpoints()["pretrained"]))
    return _finite(finetune(cfg), "top1")


def section_distill(ctx: Context) -> str:
    from simclrv2.config import make_config
    from simclrv2.stages import distill

    cfg = make_config("distill", **ctx.common("distill"), teacher=str(ctx.checkpoints()["classifier"]), alpha=0.5)
    return _finite(distill(cfg), "top1") + " (alpha 0.5: teacher + labels)"


def section_supervised(ctx: Context) -> str:
    from simclrv2.config import make_config
    from simclrv2.stages import supervised

    cfg = make_config("supervised", **ctx.common("supervised"), depth=18, width=ctx.width)
    return _finite(supervised(cfg), "top1")


def section_linear_eval(ctx: Context) -> str:
    from simclrv2.config import make_config
    from simclrv2.stages import linear_eval

    cfg = make_config("linear_eval", **ctx.common("linear_eval"), pretrained=str(ctx.checkpoints()["pretrained"]))
    return _finite(linear_eval(cfg), "top1")


def section_evaluate(ctx: Context) -> str:
    from simclrv2.stages import evaluate

    result = evaluate(str(ctx.checkpoints()["classifier"]), data_dir=str(ctx.folder()), split="test", device=ctx.device,
                      precision=ctx.precision, batch_size=8)
    if result["images"] != ctx.classes * ctx.val_per_class:
        raise AssertionError(f"evaluated {result['images']} images, expected {ctx.classes * ctx.val_per_class}")
    return f"{_finite(result, 'top1')} on {result['images']} images"


def section_inference(ctx: Context) -> str:
    from simclrv2 import inference

    images = [str(ctx.folder() / "val")]
    ck = ctx.checkpoints()
    feats = inference.embed(ck["pretrained"], images, head_layer=1, batch_size=8, device=ctx.device, precision=ctx.precision)
    n = ctx.classes * ctx.val_per_class
    if feats["features"].shape[0] != n or not np.isfinite(feats["features"]).all():
        raise AssertionError(f"embed: features {feats['features'].shape}, expected {n} finite rows")
    pred = inference.predict(ck["classifier"], images, batch_size=8, device=ctx.device, precision=ctx.precision)
    if not np.allclose(pred["probabilities"].sum(1), 1, atol=1e-3):
        raise AssertionError("predict: probabilities do not sum to 1")
    detail = f"embed {tuple(feats['features'].shape)}, predict {len(pred['rows'])} rows"
    try:
        import onnx  # noqa: F401
    except ImportError:
        return detail + "; export skipped (no onnx package)"
    exported = inference.export(ck["classifier"], ctx.root / "model.onnx")
    return detail + f", export {Path(exported['onnx']).name}"


def _task(ctx: Context, cfg, images: torch.Tensor):
    """A ContrastiveTask on an in-memory dataset of ``images`` (uint8), its model built as pretrain() does."""
    from simclrv2.data import TensorImageDataset
    from simclrv2.models import build_model, model_spec
    from simclrv2.runtime import init_runtime
    from simclrv2.stages.common import Data, to_device
    from simclrv2.stages.pretrain import ContrastiveTask

    rt = init_runtime(cfg.device, cfg.precision)
    classes = [str(c) for c in range(ctx.classes)]
    ds = TensorImageDataset(images, np.arange(len(images)) % ctx.classes, classes)
    size = images.shape[-1]
    data = Data(ds, ds, ds, ds, size, images.shape[1], classes)
    spec = model_spec("simclr", depth=cfg.depth, width=cfg.width, sk=cfg.sk, small_images=data.small_images,
                      in_channels=data.channels, head_layers=cfg.head_layers, proj_dim=cfg.proj_dim,
                      num_classes=len(classes), probe_norm=True)
    torch.manual_seed(0)
    model = to_device(build_model(spec), rt, cfg.channels_last)
    return ContrastiveTask(model, cfg, data, rt), rt, ds, spec


def section_activation_checkpointing(ctx: Context) -> str:
    from simclrv2.config import make_config
    from simclrv2.engine import build_optimizer, step_generator, train_step

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, ctx.image_size, ctx.image_size), dtype=torch.uint8, generator=gen)
    states = {}
    for on in (False, True):
        cfg = make_config("pretrain", out="unused", device=ctx.device, precision=ctx.precision, depth=50, width=0.125,
                          batch_size=16, activation_checkpointing=on, channels_last=ctx.cuda, sync_bn=False)
        task, rt, _, _ = _task(ctx, cfg, images)
        opt = build_optimizer(task.model, cfg, task.lars_excluded)
        task.train()
        x, y = images.to(rt.device), torch.arange(16, device=rt.device) % ctx.classes
        losses = [train_step(task, opt, rt, x, y, 0.1, step_generator(0, s))[0].item() for s in range(2)]
        states[on] = (losses, {k: v.detach().float().cpu() for k, v in task.model.state_dict().items()})
    (l0, s0), (l1, s1) = states[False], states[True]
    if not np.allclose(l0, l1, rtol=1e-5):
        raise AssertionError(f"losses differ: {l0} without, {l1} with checkpointing")
    worst = max(((s1[k] - s0[k]).abs().max() / s0[k].abs().max().clamp_min(1e-12)).item() for k in s0)
    if any(not torch.equal(s0[k], s1[k]) for k in s0 if k.endswith("num_batches_tracked")) or worst > 1e-4:
        raise AssertionError(f"state after 2 steps differs by {worst:.3g} of a tensor's scale")
    detail = f"2 steps equal (state to {worst:.1e})"
    if not ctx.cuda:
        return detail + "; peak memory: CUDA only (bench/activation_memory.py measures it on the CPU)"
    from simclrv2.models.resnet import build_resnet, set_activation_checkpointing

    # peak memory per image of a ResNet-50 224 px training step, from two batch sizes
    model = build_resnet(50).to(ctx.device).to(memory_format=torch.channels_last)
    peaks = {}
    for mode in (None, "block"):
        set_activation_checkpointing(model, mode)
        for b in (16, 32):
            model.zero_grad(set_to_none=True)
            x = torch.randn(b, 3, 224, 224, device=ctx.device).contiguous(memory_format=torch.channels_last)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.float16 if ctx.precision == "fp16" else torch.bfloat16,
                                enabled=ctx.precision in ("bf16", "fp16")):
                out = model(x)
            out.float().pow(2).mean().backward()
            torch.cuda.synchronize()
            peaks[(mode, b)] = torch.cuda.max_memory_allocated() - base
            del x, out
    per = {m: (peaks[(m, 32)] - peaks[(m, 16)]) / 16 / 2**20 for m in (None, "block")}
    return (detail + f"; ResNet-50 224 px {ctx.precision} peak per image: {per[None]:.1f} MiB off, "
            f"{per['block']:.1f} MiB per block ({per['block'] / per[None]:.2f}x)")


def section_sync_bn(ctx: Context) -> str:
    import torch.distributed as dist
    from torch import nn

    from simclrv2.distributed import GlobalBatchNorm, convert_sync_batchnorm
    from simclrv2.models.resnet import build_resnet
    from simclrv2.runtime import Runtime

    if dist.is_initialized():
        raise AssertionError("a process group is already initialised")
    backend = "nccl" if ctx.cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{ctx.root / 'pg_store'}", rank=0, world_size=1)
    try:
        rt = Runtime(torch.device(ctx.device), None)
        model = convert_sync_batchnorm(build_resnet(18, 0.25), rt).to(ctx.device)
        expected = nn.SyncBatchNorm if ctx.cuda else GlobalBatchNorm
        n_bn = sum(isinstance(m, expected) for m in model.modules())
        if n_bn == 0:
            raise AssertionError(f"no {expected.__name__} after conversion")
        x = torch.randn(8, 3, 64, 64, device=ctx.device)
        model(x).pow(2).mean().backward()
        if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
            raise AssertionError("non-finite gradients through the converted model")
        detail = f"{backend} group of 1, {n_bn} {expected.__name__} layers: forward/backward ok"
        if not ctx.cuda:
            return detail + "; the sync kernels are CUDA only (not exercised)"
        from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

        torch.manual_seed(0)
        ref = nn.BatchNorm2d(16).to(ctx.device)
        nn.init.uniform_(ref.weight, 0.5, 1.5)
        nn.init.uniform_(ref.bias, -0.5, 0.5)
        sync = copy.deepcopy(ref)
        x = (torch.randn(8, 16, 10, 10, device=ctx.device) * 3 + 1)
        w = torch.randn_like(x)
        xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ref = ref(xr)
        (y_ref * w).sum().backward()
        # what nn.SyncBatchNorm.forward calls when the world size is > 1
        y = SyncBatchNormFunction.apply(xs, sync.weight, sync.bias, sync.running_mean, sync.running_var, sync.eps,
                                        sync.momentum, dist.group.WORLD, 1)
        (y * w).sum().backward()
        errors = {
            "output": (y, y_ref), "grad_input": (xs.grad, xr.grad), "grad_weight": (sync.weight.grad, ref.weight.grad),
            "grad_bias": (sync.bias.grad, ref.bias.grad), "running_mean": (sync.running_mean, ref.running_mean),
            "running_var": (sync.running_var, ref.running_var),
        }
        worst = {k: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for k, (a, b) in errors.items()}
        bad = {k: v for k, v in worst.items() if not v <= 1e-4}
        if bad:
            raise AssertionError(f"SyncBatchNorm function vs BatchNorm2d: {bad}")
        return detail + f"; sync kernels (NCCL, 1 rank) = BatchNorm2d to {max(worst.values()):.1e}"
    finally:
        dist.destroy_process_group()


def section_augment_cuda_vs_cpu(ctx: Context) -> str:
    from simclrv2.data.augment import PretrainAugment

    gen = torch.Generator().manual_seed(0)
    n = 4 if ctx.quick else 32
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=gen)
    augment = PretrainAugment(224, color_strength=1.0, blur=True)

    def views(device):
        return augment.views(images.to(device), torch.Generator().manual_seed(123)).cpu()

    cpu = views("cpu")
    if not torch.equal(cpu, views("cpu")):
        raise AssertionError("the CPU views differ between two calls with the same generator state")
    if not ctx.cuda:
        return f"{2 * n} views deterministic on the CPU; the CUDA comparison needs CUDA"
    dev = views(ctx.device)
    diff = (dev - cpu).abs()
    worst, mean = diff.max().item(), diff.mean().item()
    if worst > 2e-3 or mean > 1e-5:
        raise AssertionError(f"CUDA vs CPU views differ: max {worst:.2e}, mean {mean:.2e}")
    return f"{2 * n} views of 224 px, CUDA vs CPU: max |diff| {worst:.1e}, mean {mean:.1e}"


def section_throughput(ctx: Context) -> str:
    import run as bench_run

    from simclrv2.config import make_config

    if ctx.cuda:
        depth, width, size, batch = 50, 1.0, 224, 64 if ctx.quick else 128
    else:
        depth, width, size, batch = 18, 0.125, 32, 16
    variants = [(False, False), (True, False)] + ([(True, True)] if ctx.cuda or not ctx.quick else [])
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8, generator=gen)
    lines = []
    for channels_last, compile in variants:
        cfg = make_config("pretrain", out="unused", device=ctx.device, precision=ctx.precision, depth=depth, width=width,
                          batch_size=batch, channels_last=channels_last, compile=compile, sync_bn=False, workers=0)
        task, rt, ds, spec = _task(ctx, cfg, images)
        bare_model = copy.deepcopy(task.model)
        if channels_last:
            bare_model = bare_model.to(memory_format=torch.channels_last)

        class Autocast(torch.nn.Module):  # the bare step under the same autocast as ours
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                with rt.autocast():
                    return self.m(x)

        bare_net = Autocast(bare_model)
        x = torch.rand(2 * batch, 3, size, size, device=rt.device)  # both views
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bare = bench_run.bare_step(torch.compile(bare_net) if compile else bare_net, x)
        ours = bench_run.our_step(task, cfg, rt, ds, "pretrain", spec)

        def synced(fn):
            return lambda: (fn(), ctx.sync())

        t0 = time.perf_counter()
        r = bench_run.compare(synced(ours), synced(bare), batch, quick=True)
        lines.append(f"channels_last={int(channels_last)} compile={int(compile)}: ours {r['ours_images_per_s']:,.0f} "
                     f"img/s, bare {r['bare_images_per_s']:,.0f} img/s, ratio {r['vs_bare']:.3f} "
                     f"({r['reps']} reps, {time.perf_counter() - t0:.0f} s)")
        print("    " + lines[-1], flush=True)
    if not ctx.cuda and ctx.quick:
        lines.append("compile skipped (--quick on the CPU)")
    return f"ResNet-{depth} x{width:g} {size} px, batch {batch} images ({2 * batch} views), {ctx.precision}: " + "; ".join(lines)


def section_preset_gpu224(ctx: Context) -> str:
    import run as bench_run

    from simclrv2.config import load_preset, make_config

    if ctx.cuda:
        size, options = 224, dict(batch_size=256, accumulate=2) if ctx.quick else {}
    else:
        size, options = 32, dict(depth=18, width=0.125, batch_size=16, accumulate=4)
    cfg = make_config("pretrain", load_preset("gpu-224"), out="unused", device=ctx.device, precision=ctx.precision,
                      workers=0, knn_every=0, **options)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * cfg.batch_size, 3, size, size), dtype=torch.uint8, generator=gen)
    task, rt, ds, spec = _task(ctx, cfg, images)
    step = bench_run.our_step(task, cfg, rt, ds, "pretrain", spec)
    step()  # warm-up: cuDNN's algorithm search, the allocator's pools
    ctx.sync()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(2 if ctx.quick else 5):
        t0 = time.perf_counter()
        step()
        ctx.sync()
        seconds.append(time.perf_counter() - t0)
    if not all(torch.isfinite(p).all() for p in task.model.parameters()):
        raise AssertionError("non-finite parameters after the steps")
    rate = cfg.batch_size / statistics.median(seconds)
    detail = (f"ResNet-{cfg.depth} x{cfg.width:g} {size} px {ctx.precision}, batch {cfg.batch_size} in {cfg.accumulate} "
              f"micro-batches: {rate:,.0f} images/s, {100_000 / rate:,.0f} s per epoch per 100k images")
    if ctx.cuda:
        detail += f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return detail


SECTIONS = {
    "environment": section_environment,
    "pretrain": section_pretrain,
    "pretrain_compile": lambda ctx: section_pretrain(ctx, compile=True),
    "finetune": section_finetune,
    "distill": section_distill,
    "supervised": section_supervised,
    "linear_eval": section_linear_eval,
    "evaluate": section_evaluate,
    "inference": section_inference,
    "activation_checkpointing": section_activation_checkpointing,
    "sync_bn": section_sync_bn,
    "augment_cuda_vs_cpu": section_augment_cuda_vs_cpu,
    "throughput": section_throughput,
    "preset_gpu224": section_preset_gpu224,
}


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (CPU: well under a minute)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="auto (default): bf16 where the device computes it natively, else fp32; "
                             "fp16 (with loss scaling) for GPUs without bf16")
    parser.add_argument("--section", action="append", choices=list(SECTIONS), help="only this section (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures, the stages' logs")
    args = parser.parse_args(argv)
    from simclrv2.runtime import setup_logging

    setup_logging(0 if args.verbose else -1)
    torch.manual_seed(0)
    results = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        ctx = Context(args.device, args.quick, Path(tmp), args.precision)
        for name in args.section or list(SECTIONS):
            t0 = time.perf_counter()
            try:
                detail, status = SECTIONS[name](ctx), "PASS"
            except Skip as e:
                detail, status = str(e), "SKIP"
            except Exception as e:  # noqa: BLE001 - every failure is reported, the next section runs
                detail, status = one_line(e), "FAIL"
                if args.verbose:
                    traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    import torch.distributed as dist

                    if dist.is_initialized():  # a section that failed mid-way must not leave a group behind
                        dist.destroy_process_group()
            seconds = time.perf_counter() - t0
            results.append((name, status, seconds, detail))
            print(f"{status} {name} ({seconds:.1f} s): {detail}", flush=True)
    total = time.perf_counter() - t_start
    print(f"\nsummary ({args.device}{', quick' if args.quick else ''}, {total:.0f} s)")
    print("| section | result | seconds |")
    print("|---|---|---:|")
    for name, status, seconds, _ in results:
        print(f"| {name} | {status} | {seconds:.1f} |")
    failed = [name for name, status, _, _ in results if status == "FAIL"]
    print(f"{len(results) - len(failed)} of {len(results)} sections passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
